"""Benchmark: training and inference images/s of ResNet-18 with the small stem at stride 1
(the usual CIFAR stem) vs stride 2 (``stem_stride: 2``), 32 px, same batches, one run. Training is
the phase-2 worker loop (``raypipe.student.run``, ``student.mode: supervised``) over a
``raypipe.loop.MemorySession``: a warm-up epoch of one step, then ``--steps`` steps whose epoch
timer is the figure; inference is the backbone's forward pass alone.

The CPU budget of docs/results.md rests on this ratio.

    python bench/stem_stride.py [--batch 32] [--steps 6] [--threads 2]
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from raypipe import student
from raypipe.config import load_config
from raypipe.models import build_backbone

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository: bench.record
from bench.loops import second_epoch_rate  # noqa: E402
from bench.record import default_out, write_record  # noqa: E402


def train_images_per_s(stride: int, images: torch.Tensor, steps: int) -> float:
    """The supervised phase-2 loop on the same uint8 batch every step: its second epoch's images/s."""
    n = images.shape[0]
    cfg = load_config(overrides=[
        "student.mode=supervised", "student.backbone=resnet18", "student.small_stem=true",
        f"student.stem_stride={stride}", f"student.batch_size={n}", "student.epochs=2", "student.warmup_epochs=0",
        f"data.resolution={images.shape[-1]}"])
    batch = {"view0": images, "label": torch.zeros(n, dtype=torch.long), "idx": torch.arange(n)}
    val = {"image": images, "label": batch["label"], "idx": batch["idx"]}
    meta = {"n_train": n * steps, "num_classes": 10, "print_epochs": False}
    return second_epoch_rate(student.run, cfg, meta, lambda: [batch], lambda: [batch] * steps, {"val": [val]}, "cpu")


def eval_images_per_s(net: torch.nn.Module, x: torch.Tensor, steps: int) -> float:
    net.eval()
    for i in range(steps + 1):  # the first step warms up
        if i == 1:
            start = time.perf_counter()
        with torch.no_grad():
            net(x)
    return x.shape[0] * steps / (time.perf_counter() - start)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--resolution", type=int, default=32)
    p.add_argument("--out", default=default_out(__file__))
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    images = torch.randint(0, 256, (args.batch, 3, args.resolution, args.resolution), dtype=torch.uint8)
    x = torch.randn(args.batch, 3, args.resolution, args.resolution)
    out = {"batch": args.batch, "resolution": args.resolution, "threads": args.threads}
    for stride in (1, 2):
        net, _ = build_backbone("resnet18", small_stem=True, num_classes=10, stem_stride=stride)
        out[f"stride{stride}_train_img_s"] = round(train_images_per_s(stride, images, args.steps), 1)
        out[f"stride{stride}_eval_img_s"] = round(eval_images_per_s(net, x, args.steps), 1)
    out["train_speedup"] = round(out["stride2_train_img_s"] / out["stride1_train_img_s"], 2)
    out["eval_speedup"] = round(out["stride2_eval_img_s"] / out["stride1_eval_img_s"], 2)
    print(json.dumps(out, indent=2))
    write_record(args.out, out)


if __name__ == "__main__":
    main()
