"""torchvision backbones and the shape facts stored with them; the methods' and distillers'
modules live with them (raypipe.methods, raypipe.distillers)."""
from __future__ import annotations

import torch.nn as nn
import torchvision

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
