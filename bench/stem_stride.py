"""Benchmark: training and inference images/s of ResNet-18 with the small stem at stride 1
(the usual CIFAR stem) vs stride 2 (``stem_stride: 2``), 32 px, same batches, one run.

The CPU budget of docs/results.md rests on this ratio.

    python bench/stem_stride.py [--batch 32] [--steps 6] [--threads 2]
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from raypipe.models import build_backbone


def images_per_s(net: torch.nn.Module, x: torch.Tensor, steps: int, train: bool) -> float:
    net.train(train)
    opt = torch.optim.SGD(net.parameters(), lr=0.01)
    labels = torch.zeros(x.shape[0], dtype=torch.long)
    for i in range(steps + 1):  # the first step warms up
        if i == 1:
            start = time.perf_counter()
        if train:
            opt.zero_grad(set_to_none=True)
            torch.nn.functional.cross_entropy(net(x), labels).backward()
            opt.step()
        else:
            with torch.no_grad():
                net(x)
    return x.shape[0] * steps / (time.perf_counter() - start)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--resolution", type=int, default=32)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    x = torch.randn(args.batch, 3, args.resolution, args.resolution)
    out = {"batch": args.batch, "resolution": args.resolution, "threads": args.threads}
    for stride in (1, 2):
        net, _ = build_backbone("resnet18", small_stem=True, num_classes=10, stem_stride=stride)
        out[f"stride{stride}_train_img_s"] = round(images_per_s(net, x, args.steps, train=True), 1)
        out[f"stride{stride}_eval_img_s"] = round(images_per_s(net, x, args.steps, train=False), 1)
    out["train_speedup"] = round(out["stride2_train_img_s"] / out["stride1_train_img_s"], 2)
    out["eval_speedup"] = round(out["stride2_eval_img_s"] / out["stride1_eval_img_s"], 2)
    print(json.dumps(out, indent=2))
    Path(__file__).with_suffix(".json").write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
