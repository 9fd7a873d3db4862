"""Phase-2 distillers, selected by ``student.mode``: how the student learns from the frozen
phase-1 teacher (or without it, for the baselines).

A distiller is a thin class (mdistiller's shape): it builds the student (``student``: a module
with the torchvision classifier as ``net``; trained and wrapped in DDP) and, if it needs one, a
frozen teacher (``teacher``: moved to the device, never into DDP), and does one training step
returning the loss and its parts. The epoch loop, mixup and label smoothing (the ``ce``
function a step receives), validation, checkpoints and export are the trainer's
(``raypipe.student``)."""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn as nn

from ..checkpoints import CheckpointError
from ..config import Config
from ..models import arch_of, build_backbone
from ..plugins import Registry


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

    uses_teacher = True                      # starts from (and may distil) a phase-1 teacher file
    metric_names: tuple[str, ...] = ("ce", "distill")

    def __init__(self, cfg: Config, num_classes: int, teacher_state: dict | None):
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


DISTILLERS = Registry("student.mode", Distiller)
register_distiller = DISTILLERS.register
DISTILLERS["finetune"] = Distiller
DISTILLERS["supervised"] = Supervised

from . import ofd  # noqa: E402,F401  (registers OFD as "distill")
