"""Benchmark: phase-1 epochs with the views made by Ray Data on CPU (per image) vs on the training
device (per batch, kornia; here the CPU), same data, model and steps, in one run. Reported: the
trainer's images/s per epoch after the first (its own timer: steps plus waiting for data) and the
run's wall time (decode + epochs), for each path, and the ratios; each path runs twice,
alternating, and the second run of each counts (the first warms Ray's workers).

    python bench/phase1_views.py [--epochs 4] [--config experiments/configs/cifar10_50/base.yaml]
"""
from __future__ import annotations

import argparse
import shutil
import sys
import time
from pathlib import Path

import pandas as pd

from raypipe.cluster import ensure_ray
from raypipe.config import load_config
from raypipe.phase import pretrain

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository: bench.record
from bench.record import default_out, write_record  # noqa: E402

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "cifar10-50"


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--epochs", type=int, default=4)
    p.add_argument("--config", default="experiments/configs/cifar10_50/base.yaml")
    p.add_argument("--out", default=default_out(__file__))
    args = p.parse_args()
    ensure_ray(num_cpus=2)
    out_dir = Path("/tmp/raypipe_bench_views")
    shutil.rmtree(out_dir, ignore_errors=True)
    rows = {}
    for where in ("cpu", "device", "cpu", "device"):   # each twice, alternating: the second of each is kept
        shutil.rmtree(out_dir / f"views_{where}", ignore_errors=True)
        cfg = load_config(args.config, {"data.root": str(DATA), "data.augment_on": where, "output_dir": str(out_dir),
                                        "name": f"views_{where}", "teacher.epochs": args.epochs,
                                        "teacher.knn_every": args.epochs + 1, "resources.checkpoint_every": args.epochs,
                                        "teacher.warmup_epochs": 0})
        start = time.perf_counter()
        pretrain(cfg, print_epochs=False)
        wall = time.perf_counter() - start
        history = pd.read_csv(out_dir / f"views_{where}" / "metrics.csv")
        rows[where] = {"images_per_s": float(history["images_per_s"][1:].mean()), "wall_s": wall}
        print(f"{where:>6}: {rows[where]['images_per_s']:.1f} images/s (epochs 2-{args.epochs}), "
              f"{wall:.0f} s for {args.epochs} epochs incl. start-up", flush=True)
    ratio = rows["device"]["images_per_s"] / rows["cpu"]["images_per_s"]
    print(f"device / cpu: {ratio:.2f}x images/s, {rows['cpu']['wall_s'] / rows['device']['wall_s']:.2f}x wall")
    write_record(args.out, {**rows, "ratio": ratio})


if __name__ == "__main__":
    main()
