"""Image views: the recipes of random training views, made either one image at a time on CPU
(torchvision v2, in Ray Data tasks) or a whole batch at a time on the training device (kornia,
``data.augment_on``), with the same distributions (tests/test_augment.py); the deterministic
evaluation views (centre crop, 10-crop) and the normalisation both share.

A plug-in declares the views it trains on as a list of recipes (``SSLMethod.views``: MoCo's two
``MocoView``s; ``Distiller.views``: one ``CropView``); a recipe of its own only needs ``cpu()``,
``device()`` (or None where it cannot run per batch) and ``prefer_device``."""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import torch
import torch.nn as nn

MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)


def blur_kernel(resolution: int) -> int:
    """Gaussian blur kernel of the MoCo v2 views: ~10% of the image side, odd, >= 3."""
    return max(3, int(0.1 * resolution) // 2 * 2 + 1)


@dataclass(frozen=True)
class MocoView:
    """MoCo v2 "aug+" (its defaults: crop scale (0.2, 1), blur p 0.5). On GPUs it is made on the
    device by default: on CPU it costs 4 cores per 60 images/s and starves the GPU
    (docs/benchmarks.md, section 5)."""

    resolution: int
    min_scale: float = 0.2
    blur_prob: float = 0.5
    prefer_device: ClassVar[bool] = True

    def cpu(self):
        from torchvision.transforms import v2

        return v2.Compose([
            v2.RandomResizedCrop(self.resolution, scale=(self.min_scale, 1.0), antialias=True),
            v2.RandomApply([v2.ColorJitter(0.4, 0.4, 0.4, 0.1)], p=0.8),
            v2.RandomGrayscale(p=0.2),
            v2.RandomApply([v2.GaussianBlur(blur_kernel(self.resolution), sigma=(0.1, 2.0))], p=self.blur_prob),
            v2.RandomHorizontalFlip(),
        ])

    def device(self) -> nn.Module:
        import kornia.augmentation as K

        r = self.resolution
        return K.AugmentationSequential(
            K.RandomResizedCrop((r, r), scale=(self.min_scale, 1.0), align_corners=False),
            K.ColorJitter(0.4, 0.4, 0.4, 0.1, p=0.8),   # torchvision's formulas, in a random order per call
            K.RandomGrayscale(p=0.2),
            K.RandomGaussianBlur(blur_kernel(r), (0.1, 2.0), p=self.blur_prob),
            K.RandomHorizontalFlip(),
        )


@dataclass(frozen=True)
class CropView:
    """Random-resized crop + flip (+ AutoAugment): the supervised view. Made on CPU by default:
    there it keeps up, while on the device it costs the GPU a quarter of its speed; AutoAugment
    only on CPU (kornia draws its sub-policy once per batch)."""

    resolution: int
    min_scale: float = 0.08
    autoaugment: str = "none"
    prefer_device: ClassVar[bool] = False

    def cpu(self):
        from torchvision.transforms import v2

        steps = [v2.RandomResizedCrop(self.resolution, scale=(self.min_scale, 1.0), antialias=True),
                 v2.RandomHorizontalFlip()]
        if self.autoaugment != "none":
            steps.append(v2.AutoAugment(v2.AutoAugmentPolicy(self.autoaugment)))
        return v2.Compose(steps)

    def device(self) -> nn.Module | None:
        if self.autoaugment != "none":
            return None
        import kornia.augmentation as K

        r = self.resolution
        return K.AugmentationSequential(K.RandomResizedCrop((r, r), scale=(self.min_scale, 1.0), align_corners=False),
                                        K.RandomHorizontalFlip())


def views_on_device(recipes: list, augment_on: str, use_gpu: bool) -> bool:
    """Whether the training views are made on the training device (``data.augment_on``): ``device``
    where every recipe can, ``auto`` on GPUs where every recipe prefers it, else on CPU."""
    if any(r.device() is None for r in recipes):
        return False
    return augment_on == "device" or (augment_on == "auto" and use_gpu and all(r.prefer_device for r in recipes))


def view_columns(recipes: list) -> tuple[str, ...]:
    return tuple(f"view{i}" for i in range(len(recipes)))


def fresh_rng() -> None:
    # Ray Data reuses worker processes and forks them with equal RNG states: reseed from the OS
    # so views differ across batches, workers and epochs.
    torch.manual_seed(int.from_bytes(os.urandom(8), "little") & (2**63 - 1))


def chw(batch_img: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.array(batch_img, copy=True)).permute(0, 3, 1, 2)


def make_views(batch: dict, recipes: list) -> dict:
    """A Ray Data batch of decoded images -> one uint8 column per recipe (``view0``, ``view1``...)."""
    fresh_rng()
    images = chw(batch["img"])
    out = {"label": batch["label"], "idx": batch["idx"]}
    for column, recipe in zip(view_columns(recipes), recipes):
        t = recipe.cpu()
        out[column] = torch.stack([t(im) for im in images]).numpy()
    return out


def center_crop(images: torch.Tensor, resolution: int) -> torch.Tensor:
    from torchvision.transforms.v2 import functional as F

    return F.center_crop(images, [resolution, resolution])


def ten_crop(image: torch.Tensor, resolution: int) -> torch.Tensor:
    """(C,H,W) -> (10,C,r,r): 4 corners + centre (tl, tr, bl, br, c), then the flip of each."""
    from torchvision.transforms.v2 import functional as F

    five = list(F.five_crop(image, [resolution, resolution]))
    return torch.stack(five + [F.horizontal_flip(c) for c in five])


def eval_view(batch: dict, resolution: int) -> dict:
    return {"image": center_crop(chw(batch["img"]), resolution).numpy(), "label": batch["label"],
            "idx": batch["idx"]}


def eval_ten_crop(batch: dict, resolution: int) -> dict:
    views = torch.stack([ten_crop(im, resolution) for im in chw(batch["img"])])
    return {"views": views.numpy(), "label": batch["label"], "idx": batch["idx"]}


def normalize(images: torch.Tensor, channels_last: bool = False) -> torch.Tensor:
    """uint8 (N,3,H,W) on any device -> normalised float32."""
    mean = torch.tensor(MEAN, device=images.device).view(1, 3, 1, 1) * 255
    std = torch.tensor(STD, device=images.device).view(1, 3, 1, 1) * 255
    out = (images.float() - mean) / std
    return out.contiguous(memory_format=torch.channels_last) if channels_last else out


class BatchViews:
    """The normalised training views of one batch, on the device: made on CPU by Ray Data (uint8
    columns ``view0``...), or, ``on_device``, from the decoded uint8 images (``img``, NHWC) by each
    recipe's device module."""

    def __init__(self, recipes: list, device: torch.device, channels_last: bool, on_device: bool = False):
        self.columns, self.device, self.channels_last = view_columns(recipes), device, channels_last
        self.augs = [r.device().to(device) for r in recipes] if on_device else None

    def __call__(self, batch: dict) -> list[torch.Tensor]:
        if self.augs is None:
            return [normalize(batch[c].to(self.device), self.channels_last) for c in self.columns]
        images = batch["img"].to(self.device).permute(0, 3, 1, 2).float() / 255
        with torch.no_grad():
            return [normalize(aug(images) * 255, self.channels_last) for aug in self.augs]
