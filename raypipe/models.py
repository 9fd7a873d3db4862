"""Models: torchvision backbones, MoCo v2 (phase 1), and the OFD student (phase 2)."""
from __future__ import annotations

import copy

import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision
from torchvision.models.resnet import BasicBlock, Bottleneck

from . import dist
from .losses import ofd_margins

STAGES = ("layer1", "layer2", "layer3", "layer4")


ARCH_KEYS = ("backbone", "small_stem", "stem_stride")


def arch_of(phase_cfg) -> dict:
    """The fields that fix a backbone's shape (stored in every exported model file)."""
    return {key: getattr(phase_cfg, key) for key in ARCH_KEYS}


def payload_arch(payload: dict) -> dict:
    """``arch_of`` read back from a model file (files without ``stem_stride`` used 1)."""
    return {"stem_stride": 1, **{k: payload[k] for k in ARCH_KEYS if k in payload}}


def build_backbone(backbone: str, small_stem: bool, num_classes: int = 0,
                   stem_stride: int = 1) -> tuple[nn.Module, int]:
    """A torchvision ResNet/ResNeXt with random weights. ``num_classes=0``: ``fc`` is Identity.

    ``small_stem`` swaps the 7x7/2 conv + max-pool for a 3x3 conv of stride ``stem_stride``
    (inputs of 32-64 px; stride 2 costs 4x fewer FLOPs). Returns the model and its feature width.
    """
    factory = getattr(torchvision.models, backbone, None)
    if factory is None:
        raise ValueError(f"unknown backbone {backbone!r}")
    model = factory(weights=None)
    if small_stem:
        model.conv1 = nn.Conv2d(3, 64, kernel_size=3, stride=stem_stride, padding=1, bias=False)
        model.maxpool = nn.Identity()
    dim = model.fc.in_features
    model.fc = nn.Linear(dim, num_classes) if num_classes else nn.Identity()
    return model, dim


def projection_head(dim: int, hidden: int, out: int) -> nn.Module:
    return nn.Sequential(nn.Linear(dim, hidden), nn.ReLU(inplace=True), nn.Linear(hidden, out))


class SplitBatchNorm2d(nn.BatchNorm2d):
    """BatchNorm whose training statistics are taken over ``num_splits`` groups of the batch
    (sample i in group i % num_splits): MoCo's single-GPU stand-in for per-GPU BN. Eval mode and
    the state_dict are plain BatchNorm2d's; running statistics are the groups' average."""

    def __init__(self, num_features: int, num_splits: int, **kwargs):
        super().__init__(num_features, **kwargs)
        self.num_splits = num_splits

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.num_splits == 1:
            return super().forward(x)
        n, c, h, w = x.shape
        s = self.num_splits
        if n % s:
            raise ValueError(f"batch of {n} does not split into {s} BatchNorm groups (teacher.bn_splits)")
        mean, var = self.running_mean.repeat(s), self.running_var.repeat(s)
        out = F.batch_norm(x.reshape(n // s, c * s, h, w), mean, var, self.weight.repeat(s), self.bias.repeat(s),
                           True, self.momentum, self.eps)
        with torch.no_grad():
            self.running_mean.copy_(mean.view(s, c).mean(0))
            self.running_var.copy_(var.view(s, c).mean(0))
            self.num_batches_tracked.add_(1)
        return out.view(n, c, h, w)


def split_batchnorm(module: nn.Module, num_splits: int) -> nn.Module:
    """Replace every BatchNorm2d in ``module`` (in place) by a SplitBatchNorm2d with its state."""
    for name, child in module.named_children():
        if isinstance(child, nn.BatchNorm2d) and not isinstance(child, SplitBatchNorm2d):
            split = SplitBatchNorm2d(child.num_features, num_splits, eps=child.eps, momentum=child.momentum)
            split.load_state_dict(child.state_dict())
            setattr(module, name, split)
        else:
            split_batchnorm(child, num_splits)
    return module


class MoCo(nn.Module):
    """Query encoder + momentum key encoder + queue of keys (buffers, so they checkpoint).

    ``bn_splits > 1`` (one worker): BOTH encoders normalise over groups of the batch, and keys are
    encoded from a shuffled batch, so a query and its key never share BN statistics (MoCo's
    shuffle-BN, as in its single-GPU CIFAR demo). With several workers BN is per worker and the
    keys are shuffled across workers instead; pass ``bn_splits=1`` there.
    """

    def __init__(self, arch: dict, proj_hidden: int, proj_dim: int,
                 queue_size: int, key_momentum: float, bn_splits: int = 1):
        super().__init__()
        net, dim = build_backbone(**arch)
        if bn_splits > 1:
            split_batchnorm(net, bn_splits)
        self.encoder_q = nn.Sequential(net, projection_head(dim, proj_hidden, proj_dim))
        self.encoder_k = copy.deepcopy(self.encoder_q)
        for p in self.encoder_k.parameters():
            p.requires_grad_(False)
        self.key_momentum = key_momentum
        self.register_buffer("queue", F.normalize(torch.randn(queue_size, proj_dim), dim=1))
        self.register_buffer("queue_ptr", torch.zeros((), dtype=torch.long))

    @property
    def backbone(self) -> nn.Module:
        return self.encoder_q[0]

    @torch.no_grad()
    def momentum_update(self) -> None:
        """theta_k = mu * theta_k + (1 - mu) * theta_q."""
        for pk, pq in zip(self.encoder_k.parameters(), self.encoder_q.parameters()):
            pk.mul_(self.key_momentum).add_(pq.detach(), alpha=1 - self.key_momentum)

    @torch.no_grad()
    def enqueue(self, keys: torch.Tensor) -> None:
        """Write globally gathered keys at the pointer (wrapping); every rank does the same."""
        n, size = keys.shape[0], self.queue.shape[0]
        if size % n:
            raise ValueError(f"queue size {size} is not a multiple of the global batch {n}")
        ptr = int(self.queue_ptr)
        self.queue[ptr:ptr + n] = keys.to(self.queue.dtype)
        self.queue_ptr.fill_((ptr + n) % size)

    @torch.no_grad()
    def encode_keys(self, im_k: torch.Tensor) -> torch.Tensor:
        """Keys with shuffled BN: across ranks when distributed, else a shuffled batch whose
        split-BN groups differ from the queries'. Returned in input order."""
        if dist.is_distributed():
            gathered = dist.all_gather_cat(im_k)
            perm = dist.broadcast(torch.randperm(gathered.shape[0], device=im_k.device))
            n = im_k.shape[0]
            mine = perm.view(dist.world_size(), n)[dist.rank()]
            k = F.normalize(self.encoder_k(gathered[mine]), dim=1)
            k_all = dist.all_gather_cat(k)
            unshuffled = torch.empty_like(k_all)
            unshuffled[perm] = k_all
            return unshuffled.view(dist.world_size(), n, -1)[dist.rank()]
        perm = torch.randperm(im_k.shape[0], device=im_k.device)
        k = F.normalize(self.encoder_k(im_k[perm]), dim=1)
        out = torch.empty_like(k)
        out[perm] = k
        return out

    def forward(self, im_q: torch.Tensor, im_k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        q = F.normalize(self.encoder_q(im_q), dim=1)
        with torch.no_grad():
            self.momentum_update()
            k = self.encode_keys(im_k)
        return q, k


# ---- pre-ReLU stage features for OFD ---------------------------------------------
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


class Student(nn.Module):
    """Classifier backbone + one connector per stage: the trainable part of phase 2 (goes into DDP)."""

    def __init__(self, net: nn.Module, with_connectors: bool):
        super().__init__()
        self.net = net
        self.taps = StageTaps(net)
        chans = [bn.num_features for bn in bn_before_stage_relu(net)]
        self.connectors = nn.ModuleList([connector(c) for c in chans]) if with_connectors else None

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        logits = self.net(x)
        feats = self.taps.pop()
        if self.connectors is None:
            return logits, []
        return logits, [c(f) for c, f in zip(self.connectors, feats)]


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
