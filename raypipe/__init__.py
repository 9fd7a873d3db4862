"""raypipe: a Ray-based trainer and tuner for "Distilling Visual Priors from Self-Supervised
Learning" (Zhao & Wen, 2020): phase 1 (a self-supervised teacher, MoCo v2 + margin loss), phase 2
(OFD self-distillation into a student) and the main job's Ray Tune search
(``experiments/tune_margin.py``).

    import raypipe
    cfg = raypipe.load_config("experiments/configs/demo.yaml", ["teacher.epochs=5"])
    teacher = raypipe.pretrain(cfg)                      # -> metrics, incl. the teacher file
    student = raypipe.train_student(cfg, teacher["teacher"])

The built-in plug-ins (``teacher.method: moco``; ``student.mode: distill | finetune | supervised``)
register themselves on first use of the registries (``raypipe.registry``); ``register_method`` /
``register_distiller`` add your own. The trainers, plug-in base classes and torch are imported on
first use, so ``import raypipe`` (and ``raypipe --help``) stays light.
"""
from importlib import import_module

from .config import Config, load_config
from .errors import CheckpointError, ConfigError, DataError, StorageError

__all__ = ["Config", "load_config", "SSLMethod", "register_method", "Distiller", "register_distiller",
           "pretrain", "train_student", "ConfigError", "DataError", "StorageError", "CheckpointError"]

_LAZY = {"pretrain": "raypipe.phase", "train_student": "raypipe.phase", "SSLMethod": "raypipe.methods",
         "register_method": "raypipe.methods", "Distiller": "raypipe.distillers",
         "register_distiller": "raypipe.distillers"}


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'raypipe' has no attribute {name!r}")
