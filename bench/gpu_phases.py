"""Benchmark: both phases' training images/s on one accelerator with each way of making the views,
and the cost of the views alone, in one run (no Ray: it measures what the trainer's own loop and
the two augmentation paths can do on one GPU node; Ray Data's overhead is bench/data_path.py's).

Rows, all with the phases' own worker loops (``raypipe.teacher.run``, ``raypipe.student.run``: their
models, steps, optimizer, AMP and per-epoch report) over a ``raypipe.loop.MemorySession``: a warm-up
epoch of a few batches, then an epoch of ``--seconds`` whose own timer (``images_per_s``) is the row:
- ``premade``: views already on the device (the model step alone: the ceiling of any data path);
- ``device``: decoded uint8 images on the device, views made per batch by kornia (``meta["device_views"]``,
  ``data.augment_on: device``);
- ``cpu``: views made per image by the CPU path's own function (``raypipe.transforms.make_views``, the
  plug-in's recipes) in ``--workers`` DataLoader processes, as Ray Data's tasks would on a node;
- ``premade + compile``: the premade row with the trained module through ``torch.compile`` (not a config
  option: no gain measured yet, docs/benchmarks.md);
- the augmentation alone: kornia per batch on the device; the CPU per-image path per core.

    python bench/gpu_phases.py [--batch 256] [--resolution 224] [--seconds 12] [--workers 15]
    python bench/gpu_phases.py --tiny    # a CPU smoke of every row (32 px, ResNet-18, seconds)
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

from raypipe import loop, student, teacher
from raypipe.config import load_config
from raypipe.transforms import make_views

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository: bench.record
from bench.loops import second_epoch_rate  # noqa: E402
from bench.record import default_out, write_record  # noqa: E402


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


@contextlib.contextmanager
def compiled():
    """The loops' trained module through ``torch.compile`` (where the loop would wrap it in DDP)."""
    wrap = loop.wrap_ddp
    loop.wrap_ddp = lambda module, rt: torch.compile(wrap(module, rt))
    try:
        yield
    finally:
        loop.wrap_ddp = wrap


class PhaseBench:
    """One phase's worker loop (``run``) and what it needs; ``rate(make_batch)`` times its training
    epochs on batches from ``make_batch()``."""

    def __init__(self, run, cfg, meta: dict, eval_batch: dict, args):
        self.run, self.cfg, self.meta, self.eval_batch, self.args = run, cfg, meta, eval_batch, args

    def rate(self, make_batch, device_views: bool = False, warmup: int = 3) -> float:
        """images/s of the loop's second epoch: ``--seconds`` of batches, after a first of ``warmup`` batches."""
        def timed_epoch():
            start, n = time.perf_counter(), 0
            while time.perf_counter() - start < self.args.seconds or n < 2:
                yield make_batch()
                n += 1
        return second_epoch_rate(self.run, self.cfg, {**self.meta, "device_views": device_views},
                                 lambda: (make_batch() for _ in range(warmup)), timed_epoch,
                                 {"bank": [self.eval_batch], "val": [self.eval_batch]}, self.eval_batch["image"].device)


def phase_rows(name, bench, premade, device, images, recipes, args, record):
    """images/s of one phase with views premade on the device, made on the device, made on CPU."""
    n = args.batch
    gpu_images = torch.from_numpy(images).to(device)
    labels = torch.randint(0, bench.meta["num_classes"], (n,), device=device)
    idx = torch.arange(n, device=device)
    record(name, "premade", bench.rate(lambda: premade))
    record(name, "device", bench.rate(
        lambda: {"img": gpu_images[torch.randint(0, gpu_images.shape[0], (n,), device=device)], "label": labels,
                 "idx": idx}, device_views=True))
    made_on_cpu = cpu_batches(images, n, lambda b: make_views(b, recipes), args.workers)
    # the first batches wait for the workers to start: one warm-up step per worker
    record(name, "cpu", bench.rate(lambda: to_device(next(made_on_cpu), device), warmup=max(3, args.workers)))


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--resolution", type=int, default=224)
    p.add_argument("--backbone", default="resnet50")
    p.add_argument("--seconds", type=float, default=12)
    p.add_argument("--workers", type=int, default=max(1, (os.cpu_count() or 2) - 1))
    p.add_argument("--no-compile", dest="compile", action="store_false")
    p.add_argument("--tiny", action="store_true", help="CPU smoke: 32 px, ResNet-18, batch 16, 1 s per row")
    p.add_argument("--out", default=default_out(__file__))
    args = p.parse_args()
    if args.tiny:
        args.batch, args.resolution, args.backbone, args.seconds, args.workers = 16, 32, "resnet18", 1, 1
    small = args.resolution < 96
    stored = int(round(args.resolution * 8 / 7))
    cfg = load_config(overrides=[
        f"data.resolution={args.resolution}", f"data.decode_size={stored}",
        f"teacher.backbone={args.backbone}", f"teacher.small_stem={small}", f"teacher.batch_size={args.batch}",
        f"teacher.moco.queue_size={max(args.batch, 65536 // args.batch * args.batch)}",
        f"student.backbone={args.backbone}", f"student.small_stem={small}", f"student.batch_size={args.batch}",
        "teacher.epochs=2", "teacher.warmup_epochs=0", "student.epochs=2", "student.warmup_epochs=0",
        "student.ofd.ce_only_epochs=0",   # distillation from the first step
        "resources.checkpoint_every=2"])
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    gpu = device.type == "cuda"
    amp = "bf16" if gpu else "fp32"    # the loop's runtime: bf16 (resources.amp: auto) and channels_last on GPU
    channels_last = gpu and cfg.resources.channels_last
    print(f"device {torch.cuda.get_device_name() if gpu else 'cpu'}, torch {torch.__version__}, "
          f"{args.backbone} {args.resolution} px, batch {args.batch}, {amp}, "
          f"channels_last {channels_last}, {args.workers} CPU workers", flush=True)
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (max(4 * args.batch, 512), stored, stored, 3), dtype=np.uint8)
    out = {"device": torch.cuda.get_device_name() if gpu else "cpu", "torch": torch.__version__,
           "backbone": args.backbone, "resolution": args.resolution, "batch": args.batch,
           "cpu_workers": args.workers}

    # the views alone
    moco = teacher.method_class(cfg).views(cfg)
    two_views = moco[0].device().to(device)
    batch_u8 = torch.from_numpy(images[:args.batch]).to(device).permute(0, 3, 1, 2).float() / 255
    with torch.no_grad():
        out["aug_device_two_view"] = timed(lambda: (two_views(batch_u8), two_views(batch_u8)), args.seconds,
                                           args.batch, device)
    torch.set_num_threads(1)
    chunk = {"img": images[:32], "label": np.zeros(32, np.int64), "idx": np.arange(32)}
    out["aug_cpu_two_view_per_core"] = timed(lambda: make_views(chunk, moco), args.seconds, 32,
                                             torch.device("cpu"), warmup=1)
    torch.set_num_threads(os.cpu_count() or 1)
    print(f"views alone: device {out['aug_device_two_view']:.0f} two-view images/s; CPU per image "
          f"{out['aug_cpu_two_view_per_core']:.1f} images/s per core", flush=True)

    def record(phase, row, value):
        out.setdefault(phase, {})[row] = value
        print(f"{phase:>8} {row:<18} {value:9.1f} images/s", flush=True)
        write_record(args.out, out)  # kept row by row: a cut-off run keeps its rows

    def uint8_batch(*columns: str) -> dict:
        """A batch of random uint8 images in ``columns`` (NCHW), on the device."""
        shape = (args.batch, 3, args.resolution, args.resolution)
        return {**{c: torch.randint(0, 256, shape, dtype=torch.uint8, device=device) for c in columns},
                "label": torch.randint(0, 1000, (args.batch,), device=device),
                "idx": torch.arange(args.batch, device=device)}

    premade1, premade2 = uint8_batch("view0", "view1"), uint8_batch("view0")
    eval_batch = uint8_batch("image")   # the k-NN / validation pass after each epoch
    meta = {"n_train": 10 * args.batch, "num_classes": 1000, "print_epochs": False, "score_metric": None}

    # phase 1: MoCo v2 + margin
    phase1 = PhaseBench(teacher.run, cfg, meta, eval_batch, args)
    phase_rows("phase1", phase1, premade1, device, images, moco, args, record)

    # phase 2: OFD distillation from a (random) frozen teacher of the same architecture
    phase2 = PhaseBench(student.run, cfg, {**meta, "teacher": teacher.build_method(cfg).backbone.state_dict()},
                        eval_batch, args)
    phase_rows("phase2", phase2, premade2, device, images, student.distiller_class(cfg).views(cfg), args, record)

    if args.compile:  # last: compiling may take minutes; the rows above are kept whatever happens here
        with compiled():
            record("phase1", "premade + compile", phase1.rate(lambda: premade1, warmup=5))
            record("phase2", "premade + compile", phase2.rate(lambda: premade2, warmup=5))
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
