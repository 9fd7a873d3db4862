"""The typed settings every phase shares, as pydantic models: one section per concern (``data``,
``resources``, the optimiser fields both phases inherit, ``tune``). Each field states its type,
bounds or choices and what it means; pydantic checks them. The plug-ins (``raypipe.methods``,
``raypipe.distillers``) declare their own sections the same way, and ``raypipe.config``
assembles the whole config from these and the registered plug-ins."""
from __future__ import annotations

import importlib.util
from typing import Literal, Union

from pydantic import BaseModel, ConfigDict, Field, field_validator

from .errors import ConfigError


class Section(BaseModel):
    """A config section: unknown keys are errors; numbers given for text fields are kept as text
    (``name: 007`` in YAML). A plug-in's settings model subclasses it."""

    model_config = ConfigDict(extra="forbid", coerce_numbers_to_str=True, validate_assignment=True)


def opt(default, doc: str = "", **bounds):
    """A field with its default, meaning and bounds (``ge``, ``gt``, ``le``): ``Field`` in short."""
    if isinstance(default, list):
        return Field(default_factory=lambda: list(default), description=doc, **bounds)
    return Field(default, description=doc, **bounds)


AVERAGES = ("logits", "probs")            # what 10-crop views and ensemble members average
PROBE_LRS = (0.1, 1.0, 10.0, 30.0)        # linear-probe learning rates tried, chosen on val
BACKBONES = Literal["resnet18", "resnet34", "resnet50", "resnext50_32x4d", "resnext101_32x8d"]
AUTOAUGMENT = Literal["none", "imagenet", "cifar10", "svhn"]
SCHEDULES = Literal["cosine", "step", "constant"]


class DataConfig(Section):
    root: str = opt("", "data set root (folder layout) or folder of Parquet files")
    train_split: str = opt("train", "train split; 'train+val' joins splits (image folders)")
    val_split: str = opt("val")
    test_split: str = opt("test")
    resolution: int = opt(64, "training/eval crop size in pixels", ge=8, le=1024)
    decode_size: int = opt(0, "stored square size after decode; 0 = 8/7 x resolution", ge=0, le=2048)
    per_class: int = opt(0, "keep N images per class of the train split (0 = all)", ge=0)
    subsample_seed: int = opt(0, ge=0)
    strict: bool = opt(False, "raise on unreadable images instead of skipping them")
    cpus_per_task: float = opt(0.25, "CPUs each Ray Data decode/augment task asks for", ge=0.01, le=64)
    aug_batch_size: int = opt(64, "images per Ray Data augmentation batch", ge=1)
    augment_on: Literal["auto", "cpu", "device"] = opt(
        "auto", "where training views are made: Ray Data CPU tasks per image, or the training device per batch "
                "(kornia); auto = on GPUs the views whose recipe prefers the device (phase 1's), others on CPU")
    shuffle_buffer: int = opt(1024, "local shuffle buffer (rows) when iterating train batches", ge=0)

    def stored_size(self) -> int:
        return self.decode_size or int(round(self.resolution * 8 / 7))


class ResourcesConfig(Section):
    num_workers: int = opt(1, "Ray Train workers; 0 = Train local mode (in-process)", ge=0)
    use_gpu: Union[Literal["auto"], bool] = opt("auto", "auto = GPUs when the cluster has or can launch them")
    cpus_per_worker: float = opt(1.0, ge=0.01)
    gpus_per_worker: float = opt(1.0, ge=0.0)
    amp: Literal["auto", "bf16", "fp16", "off"] = opt("auto", "mixed precision on GPU (auto = bf16; off/false = none)")
    channels_last: bool = opt(True, "channels_last memory format on GPU")
    max_failures: int = opt(0, "Ray Train FailureConfig.max_failures (-1 = forever)", ge=-1)
    checkpoint_every: int = opt(1, "checkpoint every N epochs (and always at the end)", ge=1)
    keep_checkpoints: int = opt(2, ge=1)
    placement_strategy: Literal["PACK", "SPREAD", "STRICT_SPREAD", "STRICT_PACK"] = opt(
        "PACK", "how Train workers are placed on nodes")

    @field_validator("use_gpu", mode="before")
    @classmethod
    def _gpu_text(cls, value):   # "true" / "false" typed on a command line are booleans
        if isinstance(value, str):
            if value.lower() not in ("auto", "true", "false"):
                raise ValueError(f"{value!r} is not allowed; choose one of auto, true, false")
            return {"true": True, "false": False}.get(value.lower(), "auto")
        return value

    @field_validator("amp", mode="before")
    @classmethod
    def _amp_off(cls, value):    # YAML 1.1 reads `amp: off` as false
        return "off" if value is False else value


class OptimConfig(Section):
    """Fields every phase trains with (one place, both phases inherit it)."""

    backbone: BACKBONES = opt("resnet18")
    small_stem: bool = opt(True, "3x3 stem conv, no max-pool: for 32-64 px inputs")
    stem_stride: int = opt(1, "small stem's stride (2: 4x fewer FLOPs, e.g. 32 px on CPUs)", ge=1, le=2)
    epochs: int = opt(10, ge=1)
    batch_size: int = opt(64, "per worker", ge=1)
    lr: float = opt(0.03, "for a global batch of 256 (scaled linearly)", gt=0.0)
    momentum: float = opt(0.9, ge=0.0, le=1.0)
    weight_decay: float = opt(1e-4, ge=0.0)
    nesterov: bool = opt(False)
    schedule: SCHEDULES = opt("cosine")
    step_epochs: int = opt(30, "step schedule: decay every N epochs", ge=1)
    step_gamma: float = opt(0.1, gt=0.0, le=1.0)
    warmup_epochs: int = opt(0, ge=0)
    grad_clip: float = opt(0.0, "max grad norm; 0 = off", ge=0.0)
    seed: int = opt(0, ge=0)


class TeacherConfig(OptimConfig):
    """Phase 1: the self-supervised method ``method`` (its own settings in ``teacher.<its section>``)
    and the k-NN monitor the trainer ranks epochs by. Extra keys are the plug-ins' sections,
    checked by ``raypipe.config``."""

    model_config = ConfigDict(extra="allow")
    method: str = opt("moco", "phase-1 method, a name in the method registry (moco: MoCo v2 + margin loss)")
    epochs: int = opt(200, ge=1)
    knn_k: int = opt(200, ge=1)
    knn_t: float = opt(0.1, gt=0.0)
    knn_every: int = opt(1, "k-NN monitor every N epochs (and the last)", ge=1)


class StudentConfig(OptimConfig):
    """Phase 2: the distiller ``mode`` (its own settings in ``student.<its section>``) and the
    classifier's training recipe every distiller shares."""

    model_config = ConfigDict(extra="allow")
    mode: str = opt("distill", "phase-2 distiller, a name in the distiller registry: distill (OFD), "
                               "finetune (CE from the teacher's weights), supervised (CE from random weights)")
    epochs: int = opt(100, ge=1)
    lr: float = opt(0.1, gt=0.0)
    nesterov: bool = opt(True)
    schedule: SCHEDULES = opt("step")
    label_smoothing: float = opt(0.0, ge=0.0, le=1.0)
    autoaugment: AUTOAUGMENT = opt("none")
    crop_min_scale: float = opt(0.08, "random-resized-crop scale (x, 1)", gt=0.0, le=1.0)
    mixup_alpha: float = opt(0.0, "mixup Beta(alpha, alpha); 0 = off", ge=0.0)
    export_final: bool = opt(False, "also export the last epoch's weights as student_final.pt (student.pt holds "
                                    "the epoch with the best val)")


# stage 2's choice of teacher, a searched parameter beside the config: 1 = stage 1's best k-NN, 2 = its
# second, ... (docs/search.md)
TEACHER_CHOICE = "teacher_rank"
TRACKERS = {"mlflow": "mlflow", "wandb": "wandb"}  # tune.loggers value -> the package it needs


class TuneConfig(Section):
    """The main job (experiments/tune_margin.py): budgets, searcher, scheduler and final models.
    What each plug-in searches is its own (``teacher.moco.*_range``, ``student.ofd.*_range``)."""

    experiment: str = opt("tune_margin", "experiment folder name; re-running it resumes")
    teacher_trials: int = opt(8, ge=1)
    student_trials: int = opt(6, ge=1)
    stage2_teachers: int = opt(1, "stage 2 distils from stage 1's N best teachers (at most the trials of either "
                                  "stage): the teacher is a choice of the student search, and stage 3 takes the one "
                                  "whose student wins on val. 1: k-NN's best (docs/search.md: a small val set does "
                                  "not rank students)", ge=1)
    baselines: list[str] = opt(["supervised", "finetune"], "distillers (student.mode) trained in stage 3 beside the "
                                                           "searched one, as rows of the test table")
    max_concurrent_trials: int = opt(0, "0 = from the cluster's resources", ge=0)
    driver_cpus: float = opt(0.01, "CPU held by each trial's driver", ge=0.001, le=1.0)
    loggers: list[str] = opt([], "experiment trackers besides TensorBoard: mlflow, wandb (configured by their "
                                 "environment variables, e.g. MLFLOW_TRACKING_URI, WANDB_API_KEY)")
    sync_period: int = opt(30, "seconds between uploads of Tune's experiment state to remote storage (what a "
                               "resumed run restores from)", ge=1)
    grace_period: int = opt(0, "ASHA: epochs before a trial can be stopped; 0 = half of the trial's epochs "
                               "(docs/search.md: early k-NN does not rank teachers)", ge=0)
    reduction_factor: int = opt(2, ge=2)
    asha_max_t: int = opt(0, "ASHA max epochs per trial; 0 = the phase's epochs", ge=0)
    seed: int = opt(0, "Optuna TPE sampler seed", ge=0)
    lr_range: list[float] = opt([], "[lo, hi] to search teacher.lr log-uniformly; [] = fixed")
    student_lr_range: list[float] = opt([], "[lo, hi] to search student.lr log-uniformly; [] = fixed")
    final_members: int = opt(2, "ensemble members (students of the searched distiller) in stage 3", ge=1)
    final_seeds: list[int] = opt([], "[] = 0..members-1")
    final_backbones: list[str] = opt([], "per member; [] = the teacher's backbone")
    final_train_split: str = opt("", "stage-3 train split, e.g. train+val; '' = data.train_split")
    retrain_teacher_epochs: int = opt(0, "stage 3: retrain the best teacher this long (0 = reuse)", ge=0)
    eval_gpus: float = opt(0.0, "GPUs for the test evaluation task (0 = auto)", ge=0.0)

    @field_validator("loggers")
    @classmethod
    def _trackers_installed(cls, loggers: list[str]) -> list[str]:
        for logger in loggers:
            if logger not in TRACKERS:
                raise ValueError(f"{logger!r} is not one of {sorted(TRACKERS)}")
            if importlib.util.find_spec(TRACKERS[logger]) is None:
                raise ValueError(f"{logger} needs the {TRACKERS[logger]} package: pip install 'raypipe[{logger}]'")
        return loggers


def check_range(key: str, bounds: list) -> None:
    """A searched ``[lo, hi]`` range (empty = not searched)."""
    if bounds and (len(bounds) != 2 or bounds[0] > bounds[1]):
        raise ConfigError(f"{key} must be [lo, hi] with lo <= hi (or [] to not search it), got {bounds}")


def start_point(value: float, bounds: list) -> float:
    """A config value clipped into a searched ``[lo, hi]``: where the search starts (the paper's
    values, with the default config)."""
    return min(max(value, bounds[0]), bounds[1])
