"""Benchmark: the MoCo v2 two-view augmentation path, Ray Data (raypipe) vs a torch DataLoader.

Same folder, same torchvision v2 transforms (raypipe.transforms.MocoView(...).cpu()), same decode
(raypipe.data.decode_square), same number of worker processes, same batch size, in one run.
The DataLoader decodes every epoch (the obvious alternative); raypipe decodes once into Ray's
object store and re-runs only the augmentation each epoch. Reported: images/s of the first
(cold) epoch and of the following (steady) epochs, and the ratio Ray Data / DataLoader.

    python bench/data_path.py [--workers 2] [--epochs 3] [--resolution 64]
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

from raypipe import data as D
from raypipe.config import load_config
from raypipe.transforms import MocoView

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository: bench.record
from bench.record import default_out, write_record  # noqa: E402

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "cifar10-50"


class FolderTwoViews(torch.utils.data.Dataset):
    def __init__(self, paths, size, resolution):
        self.paths, self.size, self.t = paths, size, MocoView(resolution).cpu()

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, i):
        img = torch.from_numpy(D.decode_square(Path(self.paths[i]).read_bytes(), self.size)).permute(2, 0, 1)
        return self.t(img), self.t(img)


def bench_dataloader(paths, size, resolution, workers, epochs, batch):
    loader = torch.utils.data.DataLoader(FolderTwoViews(paths, size, resolution), batch_size=batch,
                                         shuffle=True, num_workers=workers, persistent_workers=True)
    rates = []
    for _ in range(epochs):
        start, n = time.perf_counter(), 0
        for v1, _ in loader:
            n += v1.shape[0]
        rates.append(n / (time.perf_counter() - start))
    return rates


def bench_ray(root, split, size, resolution, workers, epochs, batch):
    cfg = load_config(overrides=[f"data.root={root}", f"data.resolution={resolution}", f"data.decode_size={size}",
                                 f"data.cpus_per_task={2 / workers:g}" if workers else "data.cpus_per_task=1",
                                 f"data.aug_batch_size={batch}"]).data
    rates = []
    start = time.perf_counter()
    decoded = D.decode_split(D.scan_split(root, split), cfg)       # cold epoch includes the decode
    ds = D.with_views(decoded, [MocoView(resolution)] * 2, cfg)
    for e in range(epochs):
        n = 0
        for b in ds.iter_torch_batches(batch_size=batch):
            n += b["view0"].shape[0]
        rates.append(n / (time.perf_counter() - start))
        start = time.perf_counter()
    return rates


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--resolution", type=int, default=64)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--demo-per-class", type=int, default=50, help="demo images per class (10 classes)")
    p.add_argument("--out", default=default_out(__file__))
    args = p.parse_args()
    from raypipe.demo import make_demo_data
    from raypipe.cluster import ensure_ray

    demo = Path(f"/tmp/raypipe_bench_demo_{args.demo_per_class}")
    if not (demo / "train").is_dir():
        make_demo_data(demo, {"train": args.demo_per_class, "val": 1, "test": 1}, size=64)
    sets = [(f"demo ({10 * args.demo_per_class} x 64 px)", demo)]
    if SHARED.is_dir():
        sets.insert(0, ("cifar10-50 train (500 x 32 px -> 64)", SHARED))
    else:
        print(f"skipping cifar10-50: {SHARED} not found")
    ensure_ray(num_cpus=args.workers)
    size = int(round(args.resolution * 8 / 7))
    results = []
    for name, root in sets:
        paths = D.scan_split(root, "train").paths
        dl = bench_dataloader(paths, size, args.resolution, args.workers, args.epochs, args.batch)
        rd = bench_ray(root, "train", size, args.resolution, args.workers, args.epochs, args.batch)
        steady_dl, steady_rd = sum(dl[1:]) / len(dl[1:]), sum(rd[1:]) / len(rd[1:])
        row = {"set": name, "dataloader_img_s": dl, "ray_data_img_s": rd,
               "cold_ratio": rd[0] / dl[0], "steady_ratio": steady_rd / steady_dl}
        results.append(row)
        print(f"{name}: DataLoader {dl[0]:.0f} / {steady_dl:.0f} img/s (cold / steady), "
              f"Ray Data {rd[0]:.0f} / {steady_rd:.0f} img/s -> ratio cold {row['cold_ratio']:.2f}x, "
              f"steady {row['steady_ratio']:.2f}x", flush=True)
    write_record(args.out, {"args": vars(args), "results": results})


if __name__ == "__main__":
    main()
