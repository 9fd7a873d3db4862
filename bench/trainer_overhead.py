"""Benchmark: phase-1 epochs through Ray Train's TorchTrainer (1 CPU worker) vs the same model,
data and steps in a plain PyTorch loop in this process, in one run.

Both consume the same Ray Data two-view dataset (so the data path is not what is compared),
build the same MoCo model, and run the same number of steps; the Train side also reports
metrics and writes a checkpoint every epoch, as `raypipe pretrain` does. Reported: seconds per
epoch after the first (steady state), the whole wall time including start-up, and the ratios.

    python bench/trainer_overhead.py [--epochs 4] [--images-per-class 20]
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from raypipe import plugins
from raypipe.checkpoints import final_state
from raypipe.cluster import ensure_ray
from raypipe.config import load_config
from raypipe.data import decode_split, normalize, scan_dataset, with_view
from raypipe.loop import make_runtime, make_sgd, scaled_lr
from raypipe.phase import prepare_run, run_trainer
from raypipe.teacher import build_method, train_loop


def plain_loop(cfg, dataset, epochs):
    torch.manual_seed(0)
    t = cfg.teacher
    method = build_method(cfg)
    model = method.model
    rt = make_runtime(cfg.resources, t.seed)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = make_sgd(params, t, scaled_lr(t, 1))
    times = []
    for _ in range(epochs):
        start = time.perf_counter()
        model.train()
        for batch in dataset.iter_torch_batches(batch_size=t.batch_size, drop_last=True):
            loss, _ = method.training_step(model, normalize(batch["view1"]), normalize(batch["view2"]), rt)  # the phase's own step
            opt.zero_grad()
            loss.backward()
            opt.step()
        times.append(time.perf_counter() - start)
    return times


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--epochs", type=int, default=4)
    p.add_argument("--images-per-class", type=int, default=20)
    p.add_argument("--out", default="bench/trainer_overhead.json")
    args = p.parse_args()
    from raypipe.demo import make_demo_data
    root = Path(f"/tmp/raypipe_bench_trainer_{args.images_per_class}")
    if not (root / "train").is_dir():
        make_demo_data(root, {"train": args.images_per_class, "val": 4, "test": 1}, size=32)
    cfg = load_config(overrides=[
        f"data.root={root}", "data.resolution=32", "data.decode_size=36", "resources.num_workers=1",
        "resources.cpus_per_worker=1", "teacher.backbone=resnet18", f"teacher.epochs={args.epochs}",
        "teacher.batch_size=32", "teacher.queue_size=128", f"teacher.knn_every={args.epochs + 1}",
        "name=bench_trainer", "output_dir=/tmp/raypipe_bench_runs"])
    ensure_ray(num_cpus=2)
    index = scan_dataset(cfg.data, ("train", "val"))
    decoded = {s: decode_split(index[s], cfg.data) for s in ("train", "val")}
    train = with_view(decoded["train"], "moco", cfg.data, shuffle=True)
    torch.set_num_threads(1)  # the Train worker holds 1 CPU: give the plain loop the same
    start = time.perf_counter()
    plain = plain_loop(cfg, train, args.epochs)
    plain_wall = time.perf_counter() - start
    import shutil
    shutil.rmtree("/tmp/raypipe_bench_runs", ignore_errors=True)
    run = prepare_run(cfg)
    datasets = {"train": train, "bank": with_view(decoded["train"], "eval", cfg.data),
                "val": with_view(decoded["val"], "eval", cfg.data)}
    meta = {"n_train": decoded["train"].count, "num_classes": len(index["train"].classes)}
    start = time.perf_counter()
    result = run_trainer(train_loop, cfg, {"cfg": cfg.to_dict(), "meta": meta, "plugins": plugins.selected(cfg)},
                         datasets, run)
    train_wall = time.perf_counter() - start
    history = final_state(result)["history"]
    n = decoded["train"].count
    train_epoch = [n / h["images_per_s"] for h in history]  # each epoch's own timer (train steps)
    steady_plain = sum(plain[1:]) / len(plain[1:])
    steady_train = sum(train_epoch[1:]) / len(train_epoch[1:])
    out = {"images": n, "epochs": args.epochs, "plain_epoch_s": plain, "train_epoch_s": train_epoch,
           "plain_wall_s": plain_wall, "train_wall_s": train_wall,
           "steady_ratio": steady_train / steady_plain, "wall_ratio": train_wall / plain_wall}
    print(f"{n} images x {args.epochs} epochs: plain loop {steady_plain:.2f} s/epoch, TorchTrainer "
          f"{steady_train:.2f} s/epoch -> steady ratio {out['steady_ratio']:.2f}x; whole run incl. start-up "
          f"{plain_wall:.1f} s vs {train_wall:.1f} s -> {out['wall_ratio']:.2f}x", flush=True)
    Path(args.out).write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
