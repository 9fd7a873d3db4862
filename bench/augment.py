"""Benchmark: MoCo v2 two-view augmentation, images/s on ONE CPU core, per-image CPU path (Ray Data's
map function, torchvision v2) vs the batched path that runs on the training device (kornia), here
run on the CPU, in one run, at several resolutions. Real CIFAR-10 images from ../shared/data,
upscaled to each size (the decoded size is 8/7 of the resolution, as data.decode_size's default).

    python bench/augment.py [--sizes 64 224] [--images 256] [--repeats 3]
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from raypipe import data as D
from raypipe.transforms import BatchViews, MocoView, make_views

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository: bench.record
from bench.record import default_out, write_record  # noqa: E402

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "cifar10-50" / "train"


def images_at(size: int, n: int) -> np.ndarray:
    files = sorted(p for c in sorted(SHARED.iterdir()) for p in sorted(c.iterdir()))[:n]
    small = torch.from_numpy(np.stack([D.decode_square(p.read_bytes(), 32) for p in files])).permute(0, 3, 1, 2)
    big = F.interpolate(small.float(), size=(size, size), mode="bilinear", align_corners=False)
    return big.clamp(0, 255).round().to(torch.uint8).permute(0, 2, 3, 1).contiguous().numpy()


def best_rate(fn, n: int, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return n / min(times)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--sizes", type=int, nargs="+", default=[64, 224])
    p.add_argument("--images", type=int, default=256)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out", default=default_out(__file__))
    args = p.parse_args()
    torch.set_num_threads(1)   # per core: each Ray Data task holds a fraction of one core
    rows = []
    for res in args.sizes:
        decoded = images_at(round(res * 8 / 7), args.images)
        batch = {"img": decoded, "label": np.zeros(len(decoded)), "idx": np.arange(len(decoded))}
        recipes = [MocoView(res)] * 2
        cpu = best_rate(lambda: make_views(batch, recipes), len(decoded), args.repeats)
        views = BatchViews(recipes, torch.device("cpu"), False, on_device=True)
        tensor_batch = {"img": torch.from_numpy(decoded)}
        device = best_rate(lambda: views(tensor_batch), len(decoded), args.repeats)
        rows.append({"resolution": res, "per_image_cpu": cpu, "batched_kornia_cpu": device, "ratio": device / cpu})
        print(f"{res:>4} px two views: per-image torchvision {cpu:7.1f} img/s/core, batched kornia on CPU "
              f"{device:7.1f} img/s/core -> {device / cpu:.2f}x", flush=True)
    write_record(args.out, rows)


if __name__ == "__main__":
    main()
