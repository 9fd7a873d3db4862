"""Benchmark: both phases' training images/s on one accelerator with each way of making the views,
and the cost of the views alone, in one run (no Ray: it measures what the trainer's own step and
the two augmentation paths can do on one GPU node; Ray Data's overhead is bench/data_path.py's).

Rows, all with the phases' real modules and steps (``MoCoMargin.training_step``, ``OFD.training_step``):
- ``premade``: views already on the device (the model step alone: the ceiling of any data path);
- ``device``: decoded uint8 images on the device, views made per batch by kornia (``data.augment_on: device``);
- ``cpu``: views made per image by the CPU path's own functions (``raypipe.data.augment_two_views`` /
  ``augment_supervised``) in ``--workers`` DataLoader processes, as Ray Data's tasks would on a node;
- ``premade + compile``: the premade row with the trained module through ``torch.compile`` (not a config
  option: no gain measured yet, docs/benchmarks.md);
- the augmentation alone: kornia per batch on the device; the CPU per-image path per core.

    python bench/gpu_phases.py [--batch 256] [--resolution 224] [--seconds 12] [--workers 15]
    python bench/gpu_phases.py --tiny    # a CPU smoke of every row (32 px, ResNet-18, seconds)
"""
from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import numpy as np
import torch

from raypipe.augment import BatchViews, moco_views, supervised_view
from raypipe.config import load_config
from raypipe.data import augment_supervised, augment_two_views
from raypipe.loop import Runtime, make_sgd, optimizer_step, scaled_lr
from raypipe.student import build_distiller, mixed_batch
from raypipe.teacher import build_method


def timed(step, seconds: float, images_per_call: int, device: torch.device, warmup: int = 3) -> float:
    """images/s of ``step()`` over at least ``seconds`` after ``warmup`` calls."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for _ in range(warmup):
        step()
    sync()
    start, calls = time.perf_counter(), 0
    while time.perf_counter() - start < seconds or calls < 2:
        step()
        calls += 1
        if calls % 4 == 0:
            sync()
    sync()
    return calls * images_per_call / (time.perf_counter() - start)


class DecodedImages(torch.utils.data.Dataset):
    """Each item is one training batch made by the CPU path from the decoded uint8 images."""

    def __init__(self, images: np.ndarray, batch: int, make):
        self.images, self.batch, self.make = images, batch, make

    def __len__(self):
        return 10**6

    def __getitem__(self, i):
        torch.set_num_threads(1)
        rows = np.random.default_rng(i).choice(len(self.images), self.batch, replace=False)
        return self.make({"img": self.images[rows], "label": np.zeros(self.batch, np.int64),
                          "idx": rows.astype(np.int64)})


def cpu_batches(images, batch, make, workers):
    loader = torch.utils.data.DataLoader(DecodedImages(images, batch, make), batch_size=None, num_workers=workers,
                                         pin_memory=torch.cuda.is_available(), prefetch_factor=4,
                                         persistent_workers=True)
    return iter(loader)


def to_device(batch: dict, device) -> dict:
    return {k: torch.as_tensor(v).to(device, non_blocking=True) for k, v in batch.items()}


class PhaseBench:
    """One phase's model, optimizer and step; ``rate(views)`` times training on views from ``views()``."""

    def __init__(self, phase_cfg, rt, model, step_fn, args):
        self.rt, self.model, self.step_fn, self.args = rt, model, step_fn, args
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.opt = make_sgd(self.params, phase_cfg, scaled_lr(phase_cfg, 1))
        self.scaler = rt.scaler()

    def rate(self, views, net=None, warmup=3) -> float:
        net = self.model if net is None else net

        def train_once():
            loss = self.step_fn(net, views())
            optimizer_step(loss, self.opt, self.scaler, self.params, 0.0)
        return timed(train_once, self.args.seconds, self.args.batch, self.rt.device, warmup)


def phase_rows(name, bench, premade, view_names, device_aug, images, cpu_make, args, record):
    """images/s of one phase with views premade on the device, made on the device, made on CPU."""
    rt, n = bench.rt, args.batch
    gpu_images = torch.from_numpy(images).to(rt.device)
    on_device = BatchViews(view_names, rt.device, rt.channels_last, device_aug)
    on_cpu = BatchViews(view_names, rt.device, rt.channels_last)
    record(name, "premade", bench.rate(lambda: premade))
    record(name, "device", bench.rate(
        lambda: on_device({"img": gpu_images[torch.randint(0, gpu_images.shape[0], (n,), device=rt.device)]})))
    made_on_cpu = cpu_batches(images, n, cpu_make, args.workers)
    # the first batches wait for the workers to start: one warm-up step per worker
    record(name, "cpu", bench.rate(lambda: on_cpu(to_device(next(made_on_cpu), rt.device)), warmup=args.workers))


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--resolution", type=int, default=224)
    p.add_argument("--backbone", default="resnet50")
    p.add_argument("--seconds", type=float, default=12)
    p.add_argument("--workers", type=int, default=max(1, (os.cpu_count() or 2) - 1))
    p.add_argument("--no-compile", dest="compile", action="store_false")
    p.add_argument("--tiny", action="store_true", help="CPU smoke: 32 px, ResNet-18, batch 16, 1 s per row")
    p.add_argument("--out", default="bench/gpu_phases.json")
    args = p.parse_args()
    if args.tiny:
        args.batch, args.resolution, args.backbone, args.seconds, args.workers = 16, 32, "resnet18", 1, 1
    small = args.resolution < 96
    stored = int(round(args.resolution * 8 / 7))
    cfg = load_config(overrides=[
        f"data.resolution={args.resolution}", f"data.decode_size={stored}",
        f"teacher.backbone={args.backbone}", f"teacher.small_stem={small}", f"teacher.batch_size={args.batch}",
        f"teacher.queue_size={max(args.batch, 65536 // args.batch * args.batch)}",
        f"student.backbone={args.backbone}", f"student.small_stem={small}", f"student.batch_size={args.batch}"])
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    gpu = device.type == "cuda"
    if gpu:
        torch.backends.cudnn.benchmark = True
    rt = Runtime(device, torch.bfloat16 if gpu else None, gpu, 1, 0)
    print(f"device {torch.cuda.get_device_name() if gpu else 'cpu'}, torch {torch.__version__}, "
          f"{args.backbone} {args.resolution} px, batch {args.batch}, {'bf16' if gpu else 'fp32'}, "
          f"channels_last {rt.channels_last}, {args.workers} CPU workers", flush=True)
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (max(4 * args.batch, 512), stored, stored, 3), dtype=np.uint8)
    out = {"device": torch.cuda.get_device_name() if gpu else "cpu", "torch": torch.__version__,
           "backbone": args.backbone, "resolution": args.resolution, "batch": args.batch,
           "cpu_workers": args.workers}

    # the views alone
    two_views = moco_views(args.resolution).to(device)
    batch_u8 = torch.from_numpy(images[:args.batch]).to(device).permute(0, 3, 1, 2).float() / 255
    with torch.no_grad():
        out["aug_device_two_view"] = timed(lambda: (two_views(batch_u8), two_views(batch_u8)), args.seconds,
                                           args.batch, device)
    torch.set_num_threads(1)
    chunk = {"img": images[:32], "label": np.zeros(32, np.int64), "idx": np.arange(32)}
    out["aug_cpu_two_view_per_core"] = timed(lambda: augment_two_views(chunk, args.resolution), args.seconds, 32,
                                             torch.device("cpu"), warmup=1)
    torch.set_num_threads(os.cpu_count() or 1)
    print(f"views alone: device {out['aug_device_two_view']:.0f} two-view images/s; CPU per image "
          f"{out['aug_cpu_two_view_per_core']:.1f} images/s per core", flush=True)

    def record(phase, row, value):
        out.setdefault(phase, {})[row] = value
        print(f"{phase:>8} {row:<18} {value:9.1f} images/s", flush=True)
        Path(args.out).write_text(json.dumps(out, indent=2))  # kept row by row: a cut-off run keeps its rows

    # phase 1: MoCo v2 + margin
    method = build_method(cfg)
    model = method.model.to(device)
    if rt.channels_last:
        model.to(memory_format=torch.channels_last)
    model.train()
    premade = [torch.randn(args.batch, 3, args.resolution, args.resolution, device=device) for _ in range(2)]
    if rt.channels_last:
        premade = [v.contiguous(memory_format=torch.channels_last) for v in premade]
    teacher = PhaseBench(cfg.teacher, rt, model, lambda net, v: method.training_step(net, v[0], v[1], rt)[0], args)
    phase_rows("phase1", teacher, premade, ("view1", "view2"), two_views, images,
               lambda b: augment_two_views(b, args.resolution), args, record)

    # phase 2: OFD distillation from a (random) frozen teacher of the same architecture
    distiller = build_distiller(cfg, 1000, build_method(cfg).backbone.state_dict())
    distiller.teacher.to(device)
    student = distiller.student.to(device)
    if rt.channels_last:
        student.to(memory_format=torch.channels_last)
        distiller.teacher.to(memory_format=torch.channels_last)
    distiller.train()
    labels = torch.randint(0, 1000, (args.batch,), device=device)

    def ofd_step(net, views):
        x, ce = mixed_batch(views[0], labels, cfg)
        return distiller.training_step(net, x, ce, epoch=cfg.student.ce_only_epochs, rt=rt)[0]
    pupil = PhaseBench(cfg.student, rt, student, ofd_step, args)
    phase_rows("phase2", pupil, premade[:1], ("image",), supervised_view(args.resolution), images,
               lambda b: augment_supervised(b, args.resolution, "none", 0.08), args, record)

    if args.compile:  # last: compiling may take minutes; the rows above are kept whatever happens here
        record("phase1", "premade + compile", teacher.rate(lambda: premade, torch.compile(model), warmup=5))
        record("phase2", "premade + compile", pupil.rate(lambda: premade[:1], torch.compile(student), warmup=5))
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
