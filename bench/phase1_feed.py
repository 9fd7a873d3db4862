"""Benchmark: is a phase-1 epoch fed? The same phase-1 run (the trainer's own loop and step, Ray
Train) fed three ways, in one run:
- ``premade``: views made once before training and materialised (no augmentation work while it
  trains: the reference an epoch cannot beat);
- ``cpu``: Ray Data tasks make fresh views every epoch (``data.augment_on: cpu``);
- ``device``: Ray Data streams the decoded images, the trainer makes the views (``device``).
While each trains, a sampler reads every 0.2 s how many CPUs Ray has handed out; the Train
workers' own share is known, the rest went to Ray Data's tasks. Reported: images/s of epochs
2..N (the trainer's timer) and the ratio to ``premade``, and the mean CPUs Ray Data held.

    python bench/phase1_feed.py [--epochs 4] [--workers 0 1] [--nodes 1]
    python bench/phase1_feed.py --nodes 2 --workers 2   # a simulated 2-node cluster (1 CPU each)
"""
from __future__ import annotations

import argparse
import shutil
import sys
import threading
import time
from pathlib import Path

import numpy as np

from raypipe import teacher
from raypipe.cluster import ensure_ray
from raypipe.config import load_config
from raypipe.data import decode_split, scan_dataset

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository: bench.record
from bench.loops import fit_on_ray_train, phase1_datasets  # noqa: E402
from bench.record import default_out, write_record  # noqa: E402

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "cifar10-50"


class CpuSampler:
    """Mean CPUs Ray has handed out (all holders) while the block runs."""

    def __enter__(self):
        import ray
        self.samples, self.stop = [], threading.Event()

        def sample():
            total = ray.cluster_resources().get("CPU", 0)
            while not self.stop.wait(0.2):
                self.samples.append(total - ray.available_resources().get("CPU", 0))
        self.thread = threading.Thread(target=sample, daemon=True)
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        self.thread.join()

    @property
    def mean(self) -> float:
        return float(np.mean(self.samples)) if self.samples else 0.0


def run_one(cfg, feed: str, decoded, index, epochs: int) -> dict:
    datasets = phase1_datasets(cfg, decoded, on_device=feed == "device", premade=feed == "premade")
    meta = {"n_train": decoded["train"].count, "num_classes": len(index["train"].classes), "print_epochs": False,
            "device_views": feed == "device"}
    with CpuSampler() as cpus:
        history = fit_on_ray_train(cfg, teacher.run, meta, datasets)
    res = cfg.resources
    train_cpus = res.num_workers * res.cpus_per_worker
    return {"images_per_s": float(np.mean([h["images_per_s"] for h in history[1:]])),
            "ray_cpus_held": cpus.mean, "train_cpus": train_cpus, "data_cpus": max(0.0, cpus.mean - train_cpus)}


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--epochs", type=int, default=4)
    p.add_argument("--workers", type=int, nargs="+", default=[0, 1])
    p.add_argument("--nodes", type=int, default=1, help="simulated nodes of 1 CPU each (ray.cluster_utils)")
    p.add_argument("--config", default="experiments/configs/cifar10_50/base.yaml")
    p.add_argument("--out", default=default_out(__file__))
    args = p.parse_args()
    cluster = None
    if args.nodes > 1:
        from ray.cluster_utils import Cluster
        cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0})
        for _ in range(args.nodes):
            cluster.add_node(num_cpus=1)
        ensure_ray(address=cluster.address)
    else:
        ensure_ray(num_cpus=2)
    out_dir = Path("/tmp/raypipe_bench_feed")
    rows = {}
    for workers in args.workers:
        cfg = load_config(args.config, {
            "data.root": str(DATA), "output_dir": str(out_dir), "name": "feed", "resources.num_workers": workers,
            "resources.cpus_per_worker": 1.0 if workers <= 1 else 0.5, "teacher.epochs": args.epochs,
            "teacher.knn_every": args.epochs + 1, "resources.checkpoint_every": args.epochs,
            "teacher.warmup_epochs": 0})
        index = scan_dataset(cfg.data, ("train", "val"))
        decoded = {s: decode_split(index[s], cfg.data) for s in ("train", "val")}
        for feed in ("premade", "cpu", "device"):
            shutil.rmtree(out_dir, ignore_errors=True)
            start = time.perf_counter()
            row = run_one(cfg, feed, decoded, index, args.epochs)
            row["wall_s"] = time.perf_counter() - start
            rows[f"workers{workers}_{feed}"] = row
            ref = rows[f"workers{workers}_premade"]["images_per_s"]
            print(f"{args.nodes} node(s), {workers} Train worker(s), {feed:>7}: {row['images_per_s']:6.1f} images/s "
                  f"({row['images_per_s'] / ref:.2f}x premade), Ray CPUs held {row['ray_cpus_held']:.2f} "
                  f"(Train {row['train_cpus']:.1f}, data ~{row['data_cpus']:.2f})", flush=True)
    write_record(args.out, {"nodes": args.nodes, **rows})
    if cluster is not None:
        import ray
        ray.shutdown()
        cluster.shutdown()


if __name__ == "__main__":
    main()
