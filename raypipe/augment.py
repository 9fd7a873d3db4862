"""Random training views made on the training device from whole batches (``data.augment_on:
device``): Ray Data streams the decoded uint8 images once, and kornia draws independent random
parameters for every image and every view, on the GPU (or the CPU) that trains. The recipes are
those of the CPU path (``raypipe.data``, torchvision v2, one image at a time); tests compare the
two distributions (tests/test_augment.py)."""
from __future__ import annotations

import torch
import torch.nn as nn

from .config import Config
from .data import blur_kernel, normalize


def moco_views(resolution: int, min_scale: float = 0.2, blur_prob: float = 0.5) -> nn.Module:
    """MoCo v2 "aug+" as ``data.moco_view_transform``, per sample on a float [0, 1] batch."""
    import kornia.augmentation as K

    return K.AugmentationSequential(
        K.RandomResizedCrop((resolution, resolution), scale=(min_scale, 1.0), align_corners=False),
        K.ColorJitter(0.4, 0.4, 0.4, 0.1, p=0.8),   # torchvision's formulas, in a random order per call
        K.RandomGrayscale(p=0.2),
        K.RandomGaussianBlur(blur_kernel(resolution), (0.1, 2.0), p=blur_prob),
        K.RandomHorizontalFlip(),
    )


def supervised_view(resolution: int, min_scale: float = 0.08) -> nn.Module:
    """Random-resized crop + flip, as ``data.supervised_transform`` without AutoAugment."""
    import kornia.augmentation as K

    return K.AugmentationSequential(
        K.RandomResizedCrop((resolution, resolution), scale=(min_scale, 1.0), align_corners=False),
        K.RandomHorizontalFlip(),
    )


def on_device(cfg: Config, phase: str, use_gpu: bool) -> bool:
    """Whether ``phase``'s training views are made on the training device: ``data.augment_on``;
    ``auto`` = phase 1's views on GPUs, phase 2's on CPU. Measured on one H200 with 16 cores at
    224 px (docs/benchmarks.md, section 5): MoCo's two views cost 4 CPU cores per 60 images/s
    and starve the GPU, while phase 2's crop + flip keeps up on CPU and costs the GPU a quarter of
    its speed. AutoAugment stays on CPU (kornia draws its sub-policy once per batch)."""
    if phase == "student" and cfg.student.autoaugment != "none":
        return False
    return cfg.data.augment_on == "device" or (cfg.data.augment_on == "auto" and use_gpu and phase == "teacher")


class BatchViews:
    """The normalised training views of one batch, on the device. ``device_aug`` None: Ray Data made
    them on CPU (uint8 columns ``view1``/``view2`` or ``image``); else the batch holds the decoded
    uint8 images (``img``, NHWC) and ``device_aug`` makes each view."""

    def __init__(self, names: tuple[str, ...], device: torch.device, channels_last: bool,
                 device_aug: nn.Module | None = None):
        self.names, self.device, self.channels_last = names, device, channels_last
        self.aug = device_aug.to(device) if device_aug is not None else None

    def __call__(self, batch: dict) -> list[torch.Tensor]:
        if self.aug is None:
            return [normalize(batch[n].to(self.device), self.channels_last) for n in self.names]
        images = batch["img"].to(self.device).permute(0, 3, 1, 2).float() / 255
        with torch.no_grad():
            return [normalize(self.aug(images) * 255, self.channels_last) for _ in self.names]
