"""The base of a phase-2 distiller (``student.mode``): how the student learns from the frozen
phase-1 teacher (or without it, for the baselines).

A distiller is one file plus its registration, a thin class (mdistiller's shape) that owns what is
its own: ``Settings`` (its config section ``student.<section>``, with ``moved`` old keys), the
``views`` it trains on, ``validate`` and its Tune ``search_space`` (the main job's stage 2). It
builds the student (``student``: a module with the torchvision classifier as ``net``; trained and
wrapped in DDP) and, if it needs one, a frozen teacher (``teacher``: moved to the device, never
into DDP), and does one training step returning the loss and its parts. The epoch loop, mixup and
label smoothing (the ``ce`` function a step receives), validation, checkpoints and export are the
trainer's (``raypipe.student``)."""
from __future__ import annotations

from typing import Any, Callable, ClassVar, TypeVar

import torch
import torch.nn as nn

from ..errors import CheckpointError
from ..models import arch_of, build_backbone
from ..registry import DISTILLERS
from ..settings import Section
from ..transforms import CropView

T = TypeVar("T", bound=type)


class Classifier(nn.Module):
    """The student as trained: ``net`` is the torchvision classifier that is validated and exported."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class Distiller:
    """Base: a classifier trained with CE from the teacher's weights (``student.mode: finetune``).

    Subclasses override ``build`` (to add parts or a frozen ``self.teacher``), ``training_step``
    (their loss), and where they need it ``weight_at`` (the distillation weight at an epoch),
    ``frozen_parameters`` (trainable parameters left untouched at an epoch) and ``predict``."""

    class Settings(Section):
        """No settings of its own."""

    section: ClassVar[str | None] = None       # its config section (default: the name it is registered under)
    moved: ClassVar[dict[str, str]] = {}        # old dotted key -> field of Settings
    label: ClassVar[str] = "phase 1 + fine-tune"  # its row in the main job's test table
    uses_teacher = True                      # starts from (and may distil) a phase-1 teacher file
    metric_names: tuple[str, ...] = ("ce", "distill")

    # ---- what the distiller declares (class-level: used before anything is built) --------
    @classmethod
    def settings(cls, cfg) -> Any:
        """This distiller's section of ``cfg``."""
        return getattr(cfg.student, cls.section)

    @classmethod
    def views(cls, cfg) -> list:
        """The random view of every training image (one: ``training_step`` gets that batch): a
        random-resized crop (+ AutoAugment) by default."""
        s = cfg.student
        return [CropView(cfg.data.resolution, s.crop_min_scale, s.autoaugment)]

    @classmethod
    def validate(cls, cfg) -> None:
        """Cross-field checks of a config that selects this distiller (raise ConfigError)."""

    @classmethod
    def search_space(cls, cfg) -> tuple[dict, dict]:
        """(Tune domains at dotted keys, the config's own point to start from); {} = nothing."""
        return {}, {}

    def __init__(self, cfg, num_classes: int, teacher_state: dict | None):
        self.cfg, self.arch = cfg, arch_of(cfg.student)
        self.teacher: nn.Module | None = None
        net, _ = build_backbone(**self.arch, num_classes=num_classes)
        if teacher_state is not None:
            missing, unexpected = net.load_state_dict(teacher_state, strict=False)
            if unexpected or set(missing) - {"fc.weight", "fc.bias"}:
                raise CheckpointError(f"teacher weights do not fit {cfg.student.backbone}: missing {missing}, "
                                      f"unexpected {unexpected}")
        self.student = self.build(net, teacher_state)

    def build(self, net: nn.Module, teacher_state: dict | None) -> nn.Module:
        return Classifier(net)

    def weight_at(self, epoch: int) -> float:
        return 0.0

    def frozen_parameters(self, epoch: int) -> list:
        return []

    def train(self) -> None:
        self.student.train()
        if self.teacher is not None:
            self.teacher.train()

    def predict(self, x: torch.Tensor) -> torch.Tensor:
        """Logits of the classifier alone (validation)."""
        return self.student.net(x)

    def training_step(self, net: nn.Module, x: torch.Tensor, ce: Callable[[torch.Tensor], torch.Tensor],
                      epoch: int, rt) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """One step on a normalised batch. ``net`` is ``self.student`` as trained (DDP-wrapped with
        several workers); ``ce(logits)`` the classification loss with the batch's targets."""
        with rt.autocast():
            loss = ce(net(x).float())
        return loss, {"ce": loss, "distill": torch.zeros((), device=x.device)}


class Supervised(Distiller):
    """The baseline: the same classifier from random weights, CE only (``student.mode: supervised``)."""

    uses_teacher = False
    label = "supervised from scratch"


def register_distiller(name: str) -> Callable[[T], T]:
    """Class decorator: ``@register_distiller("kd")`` makes ``student.mode: kd`` select it."""
    return DISTILLERS.register(name, Distiller)


register_distiller("finetune")(Distiller)
register_distiller("supervised")(Supervised)
