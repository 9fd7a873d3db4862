"""Benchmark: phase-1 epochs through Ray Train's TorchTrainer (1 CPU worker) vs the same loop in
this process, in one run.

Both run the phase's own worker loop (``raypipe.teacher.run``: the same model, steps, k-NN monitor
and per-epoch report) on the same Ray Data two-view dataset (so neither the data path nor the loop
is what is compared): once over a ``raypipe.loop.MemorySession`` in this process, once on Ray Train
(``raypipe.raytrain.run_trainer``), which also writes a checkpoint every epoch, as `raypipe pretrain`
does. Reported: seconds per epoch after the first (steady state; each epoch's own timer of its
training steps), the whole wall time including start-up, and the ratios.

    python bench/trainer_overhead.py [--epochs 4] [--images-per-class 20]
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

from raypipe import teacher
from raypipe.cluster import ensure_ray
from raypipe.config import load_config
from raypipe.data import decode_split, scan_dataset
from raypipe.loop import MemorySession

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository: bench.record
from bench.loops import fit_on_ray_train, phase1_datasets  # noqa: E402
from bench.record import default_out, write_record  # noqa: E402


def in_process(cfg, datasets: dict, meta: dict) -> list[dict]:
    """The same loop over a MemorySession that iterates the same Ray datasets -> its reports."""
    bs = cfg.teacher.batch_size
    session = MemorySession({"train": lambda: datasets["train"].iter_torch_batches(batch_size=bs, drop_last=True),
                             **{s: (lambda ds=datasets[s]: ds.iter_torch_batches(batch_size=bs)) for s in ("bank", "val")}},
                            device="cpu")
    teacher.run(cfg, meta, session)
    return session.reports


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--epochs", type=int, default=4)
    p.add_argument("--images-per-class", type=int, default=20)
    p.add_argument("--out", default=default_out(__file__))
    args = p.parse_args()
    from raypipe.demo import make_demo_data
    root = Path(f"/tmp/raypipe_bench_trainer_{args.images_per_class}")
    if not (root / "train").is_dir():
        make_demo_data(root, {"train": args.images_per_class, "val": 4, "test": 1}, size=32)
    cfg = load_config(overrides=[
        f"data.root={root}", "data.resolution=32", "data.decode_size=36", "resources.num_workers=1",
        "resources.cpus_per_worker=1", "teacher.backbone=resnet18", f"teacher.epochs={args.epochs}",
        "teacher.batch_size=32", "teacher.moco.queue_size=128", f"teacher.knn_every={args.epochs + 1}",
        "name=bench_trainer", "output_dir=/tmp/raypipe_bench_runs"])
    ensure_ray(num_cpus=2)
    index = scan_dataset(cfg.data, ("train", "val"))
    decoded = {s: decode_split(index[s], cfg.data) for s in ("train", "val")}
    datasets = phase1_datasets(cfg, decoded)
    n = decoded["train"].count
    meta = {"n_train": n, "num_classes": len(index["train"].classes), "print_epochs": False}
    torch.set_num_threads(1)  # the Train worker holds 1 CPU: give the in-process loop the same
    start = time.perf_counter()
    plain = [n / r["images_per_s"] for r in in_process(cfg, datasets, meta)]  # each epoch's own timer (train steps)
    plain_wall = time.perf_counter() - start
    import shutil
    shutil.rmtree("/tmp/raypipe_bench_runs", ignore_errors=True)
    start = time.perf_counter()
    history = fit_on_ray_train(cfg, teacher.run, meta, datasets)
    train_wall = time.perf_counter() - start
    train_epoch = [n / h["images_per_s"] for h in history]
    steady_plain = sum(plain[1:]) / len(plain[1:])
    steady_train = sum(train_epoch[1:]) / len(train_epoch[1:])
    out = {"images": n, "epochs": args.epochs, "plain_epoch_s": plain, "train_epoch_s": train_epoch,
           "plain_wall_s": plain_wall, "train_wall_s": train_wall,
           "steady_ratio": steady_train / steady_plain, "wall_ratio": train_wall / plain_wall}
    print(f"{n} images x {args.epochs} epochs: in-process loop {steady_plain:.2f} s/epoch, TorchTrainer "
          f"{steady_train:.2f} s/epoch -> steady ratio {out['steady_ratio']:.2f}x; whole run incl. start-up "
          f"{plain_wall:.1f} s vs {train_wall:.1f} s -> {out['wall_ratio']:.2f}x", flush=True)
    write_record(args.out, out)


if __name__ == "__main__":
    main()
