"""One typed config for every phase: YAML -> dataclasses -> validated -> plain dict.

The plain nested dict (``Config.to_dict()``) is what Ray Train gets as
``train_loop_config`` and what Tune's ``param_space`` is built from; ``Config.from_dict``
turns it back into a validated config inside workers and trial drivers.
"""
from __future__ import annotations

import dataclasses
import importlib.util
import os
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml


VERBOSE_ENV = "RAYPIPE_VERBOSE"


def verbose() -> bool:
    """``--verbose`` (or RAYPIPE_VERBOSE=1): Ray's and Tune's own output as well."""
    return os.environ.get(VERBOSE_ENV) == "1"


def set_verbose(on: bool) -> None:
    if on:
        os.environ[VERBOSE_ENV] = "1"


class ConfigError(ValueError):
    """A config key is unknown, of the wrong type or out of range."""


def opt(default, *, lo=None, hi=None, choices=None, lo_open=False, doc=""):
    """A config field with its allowed range or choices (checked by ``validate``)."""
    meta = {"lo": lo, "hi": hi, "choices": choices, "lo_open": lo_open, "doc": doc}
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=meta)
    return field(default=default, metadata=meta)


AVERAGES = ("logits", "probs")            # what 10-crop views and ensemble members average
PROBE_LRS = (0.1, 1.0, 10.0, 30.0)        # linear-probe learning rates tried, chosen on val
BACKBONES = ("resnet18", "resnet34", "resnet50", "resnext50_32x4d", "resnext101_32x8d")
AUTOAUGMENT = ("none", "imagenet", "cifar10", "svhn")


@dataclass
class DataConfig:
    root: str = opt("", doc="data set root (folder layout) or folder of Parquet files")
    train_split: str = opt("train")
    val_split: str = opt("val")
    test_split: str = opt("test")
    resolution: int = opt(64, lo=8, hi=1024, doc="training/eval crop size in pixels")
    decode_size: int = opt(0, lo=0, hi=2048, doc="stored square size after decode; 0 = 8/7 x resolution")
    per_class: int = opt(0, lo=0, doc="keep N images per class of the train split (0 = all)")
    subsample_seed: int = opt(0, lo=0)
    strict: bool = opt(False, doc="raise on unreadable images instead of skipping them")
    cpus_per_task: float = opt(0.25, lo=0.01, hi=64, doc="CPUs each Ray Data decode/augment task asks for")
    aug_batch_size: int = opt(64, lo=1, doc="images per Ray Data augmentation batch")
    augment_on: str = opt("auto", choices=("auto", "cpu", "device"),
                          doc="where training views are made: Ray Data CPU tasks per image, or the training "
                              "device per batch (kornia); auto = phase 1's on GPUs, phase 2's on CPU")
    shuffle_buffer: int = opt(1024, lo=0, doc="local shuffle buffer (rows) when iterating train batches")

    def stored_size(self) -> int:
        return self.decode_size or int(round(self.resolution * 8 / 7))


@dataclass
class ResourcesConfig:
    num_workers: int = opt(1, lo=0, doc="Ray Train workers; 0 = Train local mode (in-process)")
    use_gpu: str = opt("auto", choices=("auto", "true", "false"))
    cpus_per_worker: float = opt(1.0, lo=0.01)
    gpus_per_worker: float = opt(1.0, lo=0.0)
    amp: str = opt("auto", choices=("auto", "bf16", "fp16", "off"), doc="mixed precision on GPU")
    channels_last: bool = opt(True, doc="channels_last memory format on GPU")
    max_failures: int = opt(0, lo=-1, doc="Ray Train FailureConfig.max_failures (-1 = forever)")
    checkpoint_every: int = opt(1, lo=1, doc="checkpoint every N epochs (and always at the end)")
    keep_checkpoints: int = opt(2, lo=1)
    storage_path: str = opt("", doc="folder or s3:// / gs:// URI for Train/Tune outputs (default: run dir)")
    placement_strategy: str = opt("PACK", choices=("PACK", "SPREAD", "STRICT_SPREAD", "STRICT_PACK"),
                                  doc="how Train workers are placed on nodes")


@dataclass
class OptimConfig:
    """Fields every phase trains with (one place, both phases inherit it)."""

    backbone: str = opt("resnet18", choices=BACKBONES)
    small_stem: bool = opt(True, doc="3x3 stem conv, no max-pool: for 32-64 px inputs")
    stem_stride: int = opt(1, lo=1, hi=2, doc="small stem's stride (2: 4x fewer FLOPs, e.g. 32 px on CPUs)")
    epochs: int = opt(10, lo=1)
    batch_size: int = opt(64, lo=1, doc="per worker")
    lr: float = opt(0.03, lo=0.0, lo_open=True, doc="for a global batch of 256 (scaled linearly)")
    momentum: float = opt(0.9, lo=0.0, hi=1.0)
    weight_decay: float = opt(1e-4, lo=0.0)
    nesterov: bool = opt(False)
    schedule: str = opt("cosine", choices=("cosine", "step", "constant"))
    step_epochs: int = opt(30, lo=1, doc="step schedule: decay every N epochs")
    step_gamma: float = opt(0.1, lo=0.0, hi=1.0, lo_open=True)
    warmup_epochs: int = opt(0, lo=0)
    grad_clip: float = opt(0.0, lo=0.0, doc="max grad norm; 0 = off")
    seed: int = opt(0, lo=0)


@dataclass
class TeacherConfig(OptimConfig):
    """Phase 1: MoCo v2 with the margin loss."""

    method: str = opt("moco", doc="phase-1 method, a name in raypipe.methods.METHODS (moco: MoCo v2 + margin loss)")
    epochs: int = opt(200, lo=1)
    lr: float = opt(0.03, lo=0.0, lo_open=True)
    margin: float = opt(0.4, lo=0.0, hi=2.0, doc="subtracted from the positive logit")
    temperature: float = opt(0.2, lo=0.0, hi=10.0, lo_open=True)
    queue_size: int = opt(4096, lo=1, doc="K; a multiple of the global batch, <= train images")
    key_momentum: float = opt(0.999, lo=0.0, hi=1.0)
    proj_hidden: int = opt(2048, lo=1)
    proj_dim: int = opt(128, lo=1)
    bn_splits: int = opt(2, lo=1, doc="one worker: BN of both encoders over this many groups of the batch, "
                         "keys shuffled (MoCo's split BN; its CIFAR demo: 8 groups of 64)")
    crop_min_scale: float = opt(0.2, lo=0.0, hi=1.0, lo_open=True, doc="views' random-resized-crop scale (x, 1)")
    blur_prob: float = opt(0.5, lo=0.0, hi=1.0, doc="views' Gaussian blur probability")
    knn_k: int = opt(200, lo=1)
    knn_t: float = opt(0.1, lo=0.0, lo_open=True)
    knn_every: int = opt(1, lo=1, doc="k-NN monitor every N epochs (and the last)")


@dataclass
class StudentConfig(OptimConfig):
    """Phase 2: OFD self-distillation (or its supervised / fine-tune baselines)."""

    mode: str = opt("distill", doc="phase-2 distiller, a name in raypipe.distillers.DISTILLERS: distill (OFD), "
                    "finetune (CE from the teacher's weights), supervised (CE from random weights)")
    epochs: int = opt(100, lo=1)
    lr: float = opt(0.1, lo=0.0, lo_open=True)
    nesterov: bool = opt(True)
    schedule: str = opt("step", choices=("cosine", "step", "constant"))
    distill_weight: float = opt(1e-4, lo=0.0, doc="lambda in CE + lambda * distill")
    ce_only_epochs: int = opt(4, lo=0, doc="epochs of CE only before distillation starts")
    teacher_bn_train: bool = opt(True, doc="frozen teacher's BN in train mode (paper code) or eval")
    label_smoothing: float = opt(0.0, lo=0.0, hi=1.0)
    autoaugment: str = opt("none", choices=AUTOAUGMENT)
    crop_min_scale: float = opt(0.08, lo=0.0, hi=1.0, lo_open=True)
    mixup_alpha: float = opt(0.0, lo=0.0, doc="mixup Beta(alpha, alpha); 0 = off")


@dataclass
class TuneConfig:
    """The main job (experiments/tune_margin.py): search spaces, budgets and final models."""

    experiment: str = opt("tune_margin", doc="experiment folder name; re-running it resumes")
    storage: str = opt("runs", doc="local folder or s3:// / gs:// URI for all Tune and Train outputs")
    teacher_trials: int = opt(8, lo=1)
    student_trials: int = opt(6, lo=1)
    stage2_teachers: int = opt(1, lo=1, doc="stage 2 distils from stage 1's N best teachers (at most the trials "
                                            "of either stage): the teacher is a choice of the student search, "
                                            "and stage 3 takes the one whose student wins on val. 1: k-NN's best "
                                            "(docs/search.md: a small val set does not rank students)")
    max_concurrent_trials: int = opt(0, lo=0, doc="0 = from the cluster's resources")
    driver_cpus: float = opt(0.01, lo=0.001, hi=1.0, doc="CPU held by each trial's driver")
    loggers: list[str] = opt([], doc="experiment trackers besides TensorBoard: mlflow, wandb (configured by their "
                                     "environment variables, e.g. MLFLOW_TRACKING_URI, WANDB_API_KEY)")
    sync_period: int = opt(30, lo=1, doc="seconds between uploads of Tune's experiment state to remote storage "
                                         "(what a resumed run restores from)")
    grace_period: int = opt(0, lo=0, doc="ASHA: epochs before a trial can be stopped; 0 = half of the "
                                         "trial's epochs (docs/search.md: early k-NN does not rank teachers)")
    reduction_factor: int = opt(2, lo=2)
    asha_max_t: int = opt(0, lo=0, doc="ASHA max epochs per trial; 0 = the phase's epochs")
    seed: int = opt(0, lo=0, doc="Optuna TPE sampler seed")
    margin_range: list[float] = opt([0.0, 0.8])
    temperature_range: list[float] = opt([0.07, 0.5])
    queue_sizes: list[int] = opt([],
                                 doc="candidates for K; [] = multiples of the global batch the data can fill")
    lr_range: list[float] = opt([],
                                doc="[lo, hi] to search teacher.lr log-uniformly; [] = fixed")
    distill_weight_range: list[float] = opt([1e-5, 1e-3])
    ce_only_range: list[int] = opt([],
                                   doc="[lo, hi] to search student.ce_only_epochs; [] = fixed")
    student_lr_range: list[float] = opt([])
    final_members: int = opt(2, lo=1, doc="ensemble members (distilled students) in stage 3")
    final_seeds: list[int] = opt([], doc="[] = 0..members-1")
    final_backbones: list[str] = opt([],
                                     doc="per member; [] = the teacher's backbone")
    final_train_split: str = opt("", doc="stage-3 train split, e.g. train+val; '' = data.train_split")
    retrain_teacher_epochs: int = opt(0, lo=0, doc="stage 3: retrain the best teacher this long (0 = reuse)")
    eval_gpus: float = opt(0.0, lo=0.0, doc="GPUs for the test evaluation task (0 = auto)")


@dataclass
class Config:
    name: str = opt("run", doc="run name: the run folder; re-running a name resumes it")
    output_dir: str = opt("runs", doc="where run folders are created")
    data: DataConfig = field(default_factory=DataConfig)
    resources: ResourcesConfig = field(default_factory=ResourcesConfig)
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    student: StudentConfig = field(default_factory=StudentConfig)
    tune: TuneConfig = field(default_factory=TuneConfig)

    def global_batch(self, phase: str = "teacher") -> int:
        """Images per optimiser step over all workers (the queue and lr rules are stated in it)."""
        return getattr(self, phase).batch_size * max(1, self.resources.num_workers)

    def max_queue_size(self, n_train: int) -> int:
        """The longest queue (K) ``n_train`` images fill without duplicates: whole global batches."""
        return n_train // self.global_batch("teacher") * self.global_batch("teacher")

    # ---- conversions -------------------------------------------------------------
    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, raw: dict | None) -> "Config":
        cfg = _build(cls, raw or {}, prefix="")
        validate(cfg)
        return cfg

    def with_overrides(self, overrides: dict[str, Any]) -> "Config":
        raw = self.to_dict()
        for key, value in overrides.items():
            set_dotted(raw, key, value)
        return Config.from_dict(raw)

    def dump(self, path: str | Path) -> None:
        Path(path).write_text(yaml.safe_dump(self.to_dict(), sort_keys=False))


# ---- loading --------------------------------------------------------------------
def parse_overrides(items: list[str]) -> dict[str, Any]:
    """``["teacher.margin=0.3", "data.strict=true"]`` -> dict of values. The text of a string
    key is kept as typed (``name=007`` stays "007"); other values are read as YAML."""
    out = {}
    for item in items:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form key=value (e.g. teacher.margin=0.3)")
        key, text = (part.strip() for part in item.split("=", 1))
        out[key] = text if field_type(key) is str or not text else yaml.safe_load(text)
    return out


def field_type(key: str):
    """The declared type of a dotted config key, or None if there is no such key."""
    node = Config
    for part in key.split("."):
        hints = typing.get_type_hints(node) if dataclasses.is_dataclass(node) else {}
        if part not in hints:
            return None
        node = hints[part]
    return node


def get_dotted(raw: dict, key: str, default: Any = None) -> Any:
    """``raw["teacher"]["margin"]`` for ``key="teacher.margin"`` (``default`` where missing)."""
    node = raw
    for part in key.split("."):
        if not isinstance(node, dict) or part not in node:
            return default
        node = node[part]
    return node


def nest(dotted: dict[str, Any]) -> dict:
    """``{"teacher.margin": 0.3}`` -> ``{"teacher": {"margin": 0.3}}``."""
    out: dict = {}
    for key, value in dotted.items():
        *sections, name = key.split(".")
        node = out
        for section in sections:
            node = node.setdefault(section, {})
        node[name] = value
    return out


def flat_key(key: str) -> str:
    """A dotted key as Tune spells it in flattened configs and ``points_to_evaluate``: teacher/margin."""
    return key.replace(".", "/")


def set_dotted(raw: dict, key: str, value: Any) -> None:
    parts = key.split(".")
    node = raw
    for i, part in enumerate(parts[:-1]):
        child = node.get(part)
        if not isinstance(child, dict):
            where = ".".join(parts[: i + 1])
            raise ConfigError(f"unknown config key {key!r}: {where!r} is not a section")
        node = child
    node[parts[-1]] = value


PRESETS = Path(__file__).with_name("presets")   # named configs shipped with the package (smoke, laptop)


def preset(name: str) -> dict:
    """A preset under raypipe/presets/ as dotted overrides, e.g. {"teacher.epochs": 2}."""
    path = PRESETS / f"{name}.yaml"
    loaded = yaml.safe_load(path.read_text()) or {}
    _merge(Config().to_dict(), loaded, prefix="", source=str(path))  # unknown keys: an error naming the file
    return dict(_dotted(loaded))


def _dotted(node: dict, prefix: str = ""):
    for key, value in node.items():
        if isinstance(value, dict):
            yield from _dotted(value, f"{prefix}{key}.")
        else:
            yield prefix + key, value


def load_config(path: str | Path | None = None, overrides: list[str] | dict | None = None) -> Config:
    """YAML file (optional) + dotted overrides -> validated Config. No Ray is touched."""
    raw: dict = Config().to_dict()
    if path is not None:
        _merge_file(raw, Path(path), chain=())
    if overrides:
        items = overrides if isinstance(overrides, dict) else parse_overrides(list(overrides))
        for key, value in items.items():
            set_dotted(raw, key, value)
    return Config.from_dict(raw)


def _merge_file(raw: dict, path: Path, chain: tuple) -> None:
    """Merge a YAML file into ``raw``; ``extends: other.yaml`` (relative to it) is merged first."""
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}" + (f" (extended by {chain[-1]})" if chain else ""))
    if path.resolve() in chain:
        raise ConfigError(f"{path}: 'extends' loops back to itself")
    loaded = yaml.safe_load(path.read_text()) or {}
    if not isinstance(loaded, dict):
        raise ConfigError(f"{path}: top level must be a mapping of sections")
    parent = loaded.pop("extends", None)
    if parent is not None:
        if not isinstance(parent, str):
            raise ConfigError(f"{path}: 'extends' must be a file name, got {parent!r}")
        _merge_file(raw, path.parent / parent, chain + (path.resolve(),))
    _merge(raw, loaded, prefix="", source=str(path))


def _merge(base: dict, update: dict, prefix: str, source: str) -> None:
    for key, value in update.items():
        dotted = f"{prefix}{key}"
        if key not in base:
            raise ConfigError(f"{source}: unknown config key {dotted!r}; allowed: {sorted(base)}")
        if isinstance(base[key], dict):
            if not isinstance(value, dict):
                raise ConfigError(f"{source}: {dotted!r} must be a mapping")
            _merge(base[key], value, prefix=f"{dotted}.", source=source)
        else:
            base[key] = value


def _build(cls, raw: dict, prefix: str):
    if not isinstance(raw, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'!r} must be a mapping, got {raw!r}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - names)
    if unknown:
        raise ConfigError(f"unknown config key {prefix + unknown[0]!r}; allowed in "
                          f"{prefix.rstrip('.') or 'top level'}: {sorted(names)}")
    kwargs = {}
    for f in dataclasses.fields(cls):
        if f.name not in raw:
            continue
        hint, value, key = hints[f.name], raw[f.name], prefix + f.name
        if dataclasses.is_dataclass(hint):
            kwargs[f.name] = _build(hint, value, key + ".")
        else:
            kwargs[f.name] = _coerce(key, hint, value)
    return cls(**kwargs)


def _coerce(key: str, hint, value):
    if typing.get_origin(hint) is list:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"config key {key!r} must be a list, got {value!r}")
        (item,) = typing.get_args(hint)
        return [_coerce(f"{key}[{i}]", item, v) for i, v in enumerate(value)]
    if hint is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false"):
            return value.lower() == "true"
    elif hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
    elif hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads exponents without a dot (1e-4) as text
            try:
                return float(value)
            except ValueError:
                pass
    elif hint is str:
        if isinstance(value, bool):  # YAML's true/false for keys such as resources.use_gpu
            return str(value).lower()
        if isinstance(value, (str, int, float)):
            return str(value)
    raise ConfigError(f"config key {key!r} must be of type {hint.__name__}, got {value!r}")


TRACKERS = {"mlflow": "mlflow", "wandb": "wandb"}  # tune.loggers value -> the package it needs


def validate(cfg: Config) -> None:
    """Range/choice checks on every field, then the cross-field rules."""
    _check_fields(cfg, prefix="")
    t, r = cfg.teacher, cfg.resources
    global_batch = cfg.global_batch("teacher")
    if t.queue_size % global_batch:
        raise ConfigError(
            f"teacher.queue_size={t.queue_size} must be a multiple of the global batch "
            f"(teacher.batch_size {t.batch_size} x resources.num_workers {max(1, r.num_workers)} "
            f"= {global_batch}); e.g. {max(1, t.queue_size // global_batch) * global_batch}")
    if r.num_workers <= 1 and t.batch_size % t.bn_splits:
        raise ConfigError(f"teacher.batch_size={t.batch_size} must be a multiple of teacher.bn_splits="
                          f"{t.bn_splits} (split BatchNorm groups on one worker)")
    if t.warmup_epochs >= t.epochs and t.warmup_epochs:
        raise ConfigError(f"teacher.warmup_epochs={t.warmup_epochs} must be < teacher.epochs={t.epochs}")
    if cfg.student.warmup_epochs >= cfg.student.epochs and cfg.student.warmup_epochs:
        raise ConfigError(f"student.warmup_epochs={cfg.student.warmup_epochs} must be < "
                          f"student.epochs={cfg.student.epochs}")
    for logger in cfg.tune.loggers:
        if logger not in TRACKERS:
            raise ConfigError(f"tune.loggers: {logger!r} is not one of {sorted(TRACKERS)}")
        if importlib.util.find_spec(TRACKERS[logger]) is None:
            raise ConfigError(f"tune.loggers: {logger} needs the {TRACKERS[logger]} package: "
                              f"pip install 'raypipe[{logger}]'")
    from . import plugins
    plugins.check(cfg)
    if "/" in cfg.name or not cfg.name:
        raise ConfigError(f"name={cfg.name!r} must be a non-empty folder name without '/'")


def _check_fields(node, prefix: str) -> None:
    for f in dataclasses.fields(node):
        value, key, meta = getattr(node, f.name), prefix + f.name, f.metadata
        if dataclasses.is_dataclass(value):
            _check_fields(value, key + ".")
            continue
        choices, lo, hi = meta.get("choices"), meta.get("lo"), meta.get("hi")
        if choices is not None and value not in choices:
            raise ConfigError(f"config key {key!r} = {value!r} is not allowed; choose one of {list(choices)}")
        if lo is not None and (value < lo or (meta.get("lo_open") and value == lo)):
            bound = f"> {lo}" if meta.get("lo_open") else f">= {lo}"
            raise ConfigError(f"config key {key!r} = {value!r} is out of range; allowed: {bound}"
                              + (f" and <= {hi}" if hi is not None else ""))
        if hi is not None and value > hi:
            raise ConfigError(f"config key {key!r} = {value!r} is out of range; allowed: <= {hi}")


def describe() -> list[tuple[str, Any, str]]:
    """(dotted key, default, doc) for every field: what ``raypipe config --keys`` prints."""
    rows = []

    def walk(node, prefix):
        for f in dataclasses.fields(node):
            value = getattr(node, f.name)
            if dataclasses.is_dataclass(value):
                walk(value, prefix + f.name + ".")
            else:
                rows.append((prefix + f.name, value, f.metadata.get("doc", "")))

    walk(Config(), "")
    return rows
