"""OFD (Heo et al. 2019) feature distillation from the frozen phase-1 teacher, the paper's phase 2
(``student.mode: distill``): pre-ReLU stage features, connectors, margins and the training step."""
from __future__ import annotations

import torch
import torch.nn as nn
from torchvision.models.resnet import BasicBlock, Bottleneck

from ..losses import ofd_distill_loss, ofd_margins
from ..models import STAGES, build_backbone
from ..settings import Section, check_range, opt, start_point
from .base import Classifier, Distiller, register_distiller


def _relu_calls(block: nn.Module) -> int:
    if isinstance(block, Bottleneck):
        return 3
    if isinstance(block, BasicBlock):
        return 2
    raise TypeError(f"unsupported residual block {type(block).__name__}")


def bn_before_stage_relu(model: nn.Module) -> list[nn.BatchNorm2d]:
    """The BatchNorm that feeds each stage's output ReLU (bn3 / bn2 of the last block)."""
    out = []
    for stage in STAGES:
        block = getattr(model, stage)[-1]
        out.append(block.bn3 if isinstance(block, Bottleneck) else block.bn2)
    return out


class StageTaps:
    """Forward hooks that record each stage's output BEFORE its final ReLU.

    torchvision's blocks call one shared in-place ``relu`` 2 (BasicBlock) or 3 (Bottleneck)
    times; the last call's input is ``bn(out) + identity``. A pre-hook on that ReLU clones it
    before the in-place op overwrites it. torchvision's code is neither edited nor copied.
    """

    def __init__(self, model: nn.Module):
        self.features: list[torch.Tensor | None] = [None] * len(STAGES)
        self._calls = [0] * len(STAGES)
        self.handles = []
        for i, stage in enumerate(STAGES):
            block = getattr(model, stage)[-1]
            n = _relu_calls(block)
            self.handles.append(block.register_forward_pre_hook(self._reset(i)))
            self.handles.append(block.relu.register_forward_pre_hook(self._capture(i, n)))

    def _reset(self, i):
        def hook(module, args):
            self._calls[i] = 0
        return hook

    def _capture(self, i, n):
        def hook(module, args):
            self._calls[i] += 1
            if self._calls[i] == n:
                self.features[i] = args[0].clone()
        return hook

    def pop(self) -> list[torch.Tensor]:
        feats, self.features = self.features, [None] * len(STAGES)
        return feats


def connector(channels: int) -> nn.Module:
    conv = nn.Conv2d(channels, channels, kernel_size=1, bias=False)
    nn.init.kaiming_normal_(conv.weight, mode="fan_out", nonlinearity="relu")
    return nn.Sequential(conv, nn.BatchNorm2d(channels))


class Student(Classifier):
    """Classifier + one connector per stage: the trainable part of OFD's phase 2 (goes into DDP)."""

    def __init__(self, net: nn.Module):
        super().__init__(net)
        self.taps = StageTaps(net)
        self.connectors = nn.ModuleList([connector(bn.num_features) for bn in bn_before_stage_relu(net)])

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        logits = self.net(x)
        return logits, [c(f) for c, f in zip(self.connectors, self.taps.pop())]


class FrozenTeacher(nn.Module):
    """The phase-1 backbone, frozen; its stage margins are buffers computed once from its BN."""

    def __init__(self, net: nn.Module, bn_train_mode: bool):
        super().__init__()
        self.net = net
        self.bn_train_mode = bn_train_mode
        for p in self.net.parameters():
            p.requires_grad_(False)
        self.taps = StageTaps(net)
        for i, bn in enumerate(bn_before_stage_relu(net)):
            self.register_buffer(f"margin{i}", ofd_margins(bn.weight, bn.bias))

    @property
    def margins(self) -> list[torch.Tensor]:
        return [getattr(self, f"margin{i}") for i in range(len(STAGES))]

    def train(self, mode: bool = True):
        # The switch: OFD's code keeps the frozen teacher's BN in train mode (batch statistics).
        return super().train(mode and self.bn_train_mode)

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        self.net(x)
        return self.taps.pop()


class OFDSettings(Section):
    """``student.ofd``: OFD's loss weight and schedule, its teacher policy and its search space."""

    distill_weight: float = opt(1e-4, "lambda in CE + lambda * distill; OFD sums over feature-map elements, so "
                                      "divide it by f when the feature-map area grows by f", ge=0.0)
    ce_only_epochs: int = opt(4, "epochs of CE only before distillation starts", ge=0)
    teacher_bn_train: bool = opt(True, "frozen teacher's BN in train mode (paper code) or eval")
    distill_weight_range: list[float] = opt([1e-5, 1e-3], "main job, stage 2: lambda searched log-uniformly")
    ce_only_range: list[int] = opt([], "main job, stage 2: [lo, hi] to search ce_only_epochs; [] = fixed")


@register_distiller("distill")
class OFD(Distiller):
    """CE + lambda x OFD's distillation loss; lambda is 0 for the first ``ce_only_epochs`` (the
    connectors then stay exactly as built: no gradient, weight decay or momentum)."""

    Settings = OFDSettings
    section = "ofd"
    moved = {**{f"student.{k}": k for k in ("distill_weight", "ce_only_epochs", "teacher_bn_train")},
             **{f"tune.{k}": k for k in ("distill_weight_range", "ce_only_range")}}
    label = "phase 1 + phase 2 (distill)"

    @classmethod
    def validate(cls, cfg) -> None:
        o = cls.settings(cfg)
        check_range("student.ofd.distill_weight_range", o.distill_weight_range)
        check_range("student.ofd.ce_only_range", o.ce_only_range)

    @classmethod
    def search_space(cls, cfg) -> tuple[dict, dict]:
        """lambda (log-uniform) and, where asked, the CE-only warm-up, from the config's values."""
        from ray import tune

        o = cls.settings(cfg)
        space = {"student.ofd.distill_weight": tune.loguniform(*o.distill_weight_range)}
        point = {"student.ofd.distill_weight": start_point(o.distill_weight, o.distill_weight_range)}
        if o.ce_only_range:
            space["student.ofd.ce_only_epochs"] = tune.randint(o.ce_only_range[0], o.ce_only_range[1] + 1)
            point["student.ofd.ce_only_epochs"] = start_point(o.ce_only_epochs, o.ce_only_range)
        return space, point

    def build(self, net: nn.Module, teacher_state: dict | None) -> nn.Module:
        frozen, _ = build_backbone(**self.arch)
        frozen.load_state_dict(teacher_state)
        self.teacher = FrozenTeacher(frozen, self.settings(self.cfg).teacher_bn_train)
        return Student(net)

    def weight_at(self, epoch: int) -> float:
        o = self.settings(self.cfg)
        return o.distill_weight if epoch >= o.ce_only_epochs else 0.0
    def frozen_parameters(self, epoch: int) -> list:
        return list(self.student.connectors.parameters()) if self.weight_at(epoch) == 0 else []

    def predict(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.student.net(x)
        self.student.taps.pop()
        return logits

    def training_step(self, net, x, ce, epoch, rt):
        weight = self.weight_at(epoch)
        with rt.autocast():
            logits, feats = net(x)
            ce_loss = ce(logits.float())
            if weight > 0:
                distill = ofd_distill_loss(feats, self.teacher(x), self.teacher.margins)
            else:  # keeps connectors in the graph (DDP) at zero cost to the gradient
                distill = sum((f.float().sum() for f in feats), torch.zeros((), device=x.device)) * 0.0
        return ce_loss + weight * distill, {"ce": ce_loss, "distill": distill}
