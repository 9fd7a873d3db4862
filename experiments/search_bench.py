"""The search benchmark's table (docs/search.md): real phase-1 runs of a fixed, space-filling set
of configurations on CIFAR-10 x 50 per class, each with its k-NN curve (every epoch, on val), and
for the first ``--students`` of them the phase-2 student distilled from the teacher's best epoch
(val top-1 per epoch). Searchers are then replayed on the stored curves (bench/search_replay.py).

The runs use the phases' own modules and steps (``MoCoMargin.training_step``, ``OFD.training_step``),
lr schedule, optimizer step, k-NN and validation, in a plain loop per process (no Ray: it runs on a
GPU machine without it, many configurations at once), views made per batch on the device
(``data.augment_on: device``), fp32. The recipe is experiments/configs/cifar10_50/{base,distill}.yaml.

    python experiments/search_bench.py pack ../shared/data/cifar10-50 --out runs/cifar10_50.npz
    python experiments/search_bench.py generate --arrays runs/cifar10_50.npz --configs 48 --students 16 \\
        --procs 12 --runs runs/search_bench     # resumable: finished configurations are skipped
    python experiments/search_bench.py merge --runs runs/search_bench    # -> bench/search/*.csv
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from raypipe.augment import BatchViews, moco_views, supervised_view  # noqa: E402
from raypipe.config import Config, load_config  # noqa: E402
from raypipe.data import center_crop, decode_square, scan_split  # noqa: E402
from raypipe.evaluate import backbone_features, gather_outputs, knn_top1  # noqa: E402
from raypipe.loop import Runtime, lr_at, make_sgd, optimizer_step, scaled_lr, set_lr  # noqa: E402
from raypipe.student import build_distiller, mixed_batch, validate_top  # noqa: E402
from raypipe.teacher import build_method  # noqa: E402

CONFIGS = ROOT / "experiments" / "configs" / "cifar10_50"
TABLE = ROOT / "bench" / "search"
# The searched space: the main job's (raypipe.search.teacher_space with the defaults of tune.*),
# plus teacher.lr over 1/4..4x the recipe's. Index 0 is the recipe itself (the search's start point).
SPACE = {"teacher.margin": ("uniform", 0.0, 0.8), "teacher.temperature": ("log", 0.07, 0.5),
         "teacher.queue_size": ("choice", 32, 64, 128, 256, 480), "teacher.lr": ("log", 0.06, 0.96)}


def design(n: int, seed: int = 0) -> list[dict]:
    """The recipe's point, then ``n - 1`` scrambled-Sobol points of SPACE."""
    base = load_config(CONFIGS / "base.yaml")
    points = [{k: getattr(base.teacher, k.split(".")[1]) for k in SPACE}]
    sobol = torch.quasirandom.SobolEngine(len(SPACE), scramble=True, seed=seed).draw(max(0, n - 1)).double()
    for u in sobol.tolist():
        point = {}
        for x, (key, (kind, *args)) in zip(u, SPACE.items()):
            if kind == "uniform":
                point[key] = args[0] + x * (args[1] - args[0])
            elif kind == "log":
                point[key] = math.exp(math.log(args[0]) + x * (math.log(args[1]) - math.log(args[0])))
            else:
                point[key] = args[min(int(x * len(args)), len(args) - 1)]
        points.append(point)
    return points


def pack(data_root: str, out: str, size: int = 36) -> None:
    """train, val and test of an image folder, decoded once to uint8 (N, size, size, 3) + labels."""
    arrays = {}
    for split in ("train", "val", "test"):
        index = scan_split(data_root, split)
        arrays[f"{split}_img"] = np.stack([decode_square(Path(p).read_bytes(), size) for p in index.paths])
        arrays[f"{split}_label"] = np.asarray(index.labels, np.int64)
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    np.savez(out, **arrays)
    print(f"{out}: " + ", ".join(f"{k} {v.shape}" for k, v in arrays.items()))


def train_plain(model, opt, rt: Runtime, n_train: int, step, end_epoch, frozen=lambda epoch: ()) -> None:
    """The phases' schedule in a plain loop: per-step lr, SGD, ``opt.epochs`` epochs of whole batches."""
    params = [p for p in model.parameters() if p.requires_grad]
    base_lr = scaled_lr(opt, 1)
    optimizer, scaler = make_sgd(params, opt, base_lr), rt.scaler()
    steps = n_train // opt.batch_size
    for epoch in range(opt.epochs):
        model.train()
        order = torch.randperm(n_train, device=rt.device)
        for i in range(steps):
            set_lr(optimizer, lr_at(opt, base_lr, epoch + i / steps))
            loss = step(order[i * opt.batch_size:(i + 1) * opt.batch_size], epoch)
            optimizer_step(loss, optimizer, scaler, params, opt.grad_clip, frozen(epoch))
        end_epoch(epoch)


def eval_batches(images: torch.Tensor, labels: torch.Tensor, resolution: int, batch: int = 250):
    crops = center_crop(images.permute(0, 3, 1, 2), resolution)
    return [{"image": crops[i:i + batch], "label": labels[i:i + batch],
             "idx": torch.arange(i, min(i + batch, len(labels)))} for i in range(0, len(labels), batch)]


def run_teacher(cfg: Config, data: dict, rt: Runtime) -> tuple[list[dict], dict]:
    t = cfg.teacher
    method = build_method(cfg)
    model = method.model.to(rt.device)
    views = BatchViews(("view1", "view2"), rt.device, False, moco_views(cfg.data.resolution, t.crop_min_scale,
                                                                         t.blur_prob))
    bank, val = (eval_batches(data[f"{s}_img"], data[f"{s}_label"], cfg.data.resolution) for s in ("train", "val"))
    curve, best, start = [], {"knn_top1": -1.0}, time.perf_counter()

    def step(rows, epoch):
        v1, v2 = views({"img": data["train_img"][rows]})
        return method.training_step(model, v1, v2, rt)[0]

    @torch.no_grad()
    def end_epoch(epoch):
        model.eval()
        fn = backbone_features(method.backbone)
        b, v = gather_outputs(fn, bank, rt.device), gather_outputs(fn, val, rt.device)
        knn = knn_top1(b["out"], b["label"], v["out"], v["label"], t.knn_k, t.knn_t, 10)
        curve.append({"epoch": epoch + 1, "knn_top1": knn, "seconds": time.perf_counter() - start})
        if knn > best["knn_top1"]:
            best.update(knn_top1=knn, epoch=epoch + 1,
                        state={k: x.detach().clone() for k, x in method.backbone.state_dict().items()})

    train_plain(model, t, rt, len(data["train_label"]), step, end_epoch)
    return curve, best


def run_student(cfg: Config, data: dict, rt: Runtime, teacher_state: dict, test: bool = False) -> list[dict]:
    """Val top-1 per epoch; with ``test``, the final model's test top-1 on the last row (held out from
    every choice made on val)."""
    s = cfg.student
    distiller = build_distiller(cfg, 10, teacher_state)
    student = distiller.student.to(rt.device)
    distiller.teacher.to(rt.device)
    views = BatchViews(("image",), rt.device, False, supervised_view(cfg.data.resolution, s.crop_min_scale))
    val = eval_batches(data["val_img"], data["val_label"], cfg.data.resolution)
    curve, start = [], time.perf_counter()

    def step(rows, epoch):
        distiller.train()
        (x,) = views({"img": data["train_img"][rows]})
        x, ce = mixed_batch(x, data["train_label"][rows], cfg)
        return distiller.training_step(student, x, ce, epoch, rt)[0]

    def end_epoch(epoch):
        top1, _, _ = validate_top(distiller, rt, val)
        curve.append({"epoch": epoch + 1, "val_top1": top1, "seconds": time.perf_counter() - start})

    train_plain(student, s, rt, len(data["train_label"]), step, end_epoch, distiller.frozen_parameters)
    if test:
        curve[-1]["test_top1"] = validate_top(distiller, rt, eval_batches(data["test_img"], data["test_label"],
                                                                           cfg.data.resolution))[0]
    return curve


def write_atomic(table: pd.DataFrame, path: Path) -> None:
    table.to_csv(str(path) + ".tmp", index=False)
    os.replace(str(path) + ".tmp", path)


def student_file(runs: Path, cid: int, seed: int) -> Path:
    """Seed 0 is the configuration's student; seeds 1.. are repeats from the same teacher (the noise floor)."""
    return runs / (f"student_{cid:03d}.csv" if seed == 0 else f"student_{cid:03d}_s{seed}.csv")


def has_test(student_csv: Path) -> bool:
    return "test_top1" in pd.read_csv(student_csv, nrows=0).columns


def run_config(job: tuple) -> str:
    """One configuration: its teacher curve, and its student's if asked; files written last (atomic)."""
    cid, point, with_student, arrays, runs, epochs, student_epochs, student_seed, test = job
    torch.set_num_threads(1)
    out = Path(runs)
    overrides = {**point, "teacher.seed": cid, "student.seed": cid + 1000 * student_seed}
    if epochs:
        overrides["teacher.epochs"] = epochs
    if student_epochs:
        overrides["student.epochs"] = student_epochs
    cfg = load_config(CONFIGS / "distill.yaml", overrides)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(cid)
    rt = Runtime(device, None, False, 1, 0)
    loaded = np.load(arrays)
    data = {k: torch.from_numpy(loaded[k]).to(device) for k in loaded.files}
    teacher_file, weights = out / f"teacher_{cid:03d}.csv", out / f"teacher_{cid:03d}.pt"
    student_csv = student_file(out, cid, student_seed)
    want_student = with_student and not (student_csv.exists() and (not test or has_test(student_csv)))
    if not teacher_file.exists() or (want_student and not weights.exists()):
        # a student needs its teacher's weights: where only the curve was kept (a run elsewhere),
        # the teacher is trained again and its own best k-NN goes with the student's row
        curve, best = run_teacher(cfg, data, rt)
        torch.save({"state": best["state"], "knn_top1": best["knn_top1"], "epoch": best["epoch"]}, weights)
        if not teacher_file.exists():
            write_atomic(pd.DataFrame([{"config": cid, **point, **row} for row in curve]), teacher_file)
    if want_student:
        torch.manual_seed(cfg.student.seed)  # the student's own stream, whether or not a teacher was trained first
        teacher = torch.load(weights, map_location=device)
        curve = run_student(cfg, data, rt, teacher["state"], test)
        write_atomic(pd.DataFrame([{"config": cid, "student_seed": student_seed,
                                    "teacher_knn_top1": teacher["knn_top1"], "teacher_epoch": teacher["epoch"],
                                    **row} for row in curve]), student_csv)
    return f"config {cid:3d}" + (f" student seed {student_seed}" if student_seed else "") + f" done ({device.type})"


def generate(args) -> None:
    runs = Path(args.runs)
    runs.mkdir(parents=True, exist_ok=True)
    points = design(args.configs, args.seed)
    (runs / "design.json").write_text(json.dumps(points, indent=1))
    ids = args.ids or list(range(len(points)))
    students = set(args.ids[:args.students] if args.ids else range(args.students))
    def missing(cid: int, seed: int) -> bool:
        f = student_file(runs, cid, seed)
        return not f.exists() or (args.test and not has_test(f))

    jobs = [(cid, points[cid], cid in students, args.arrays, str(runs), args.epochs, args.student_epochs, 0,
             args.test)
            for cid in ids if not (runs / f"teacher_{cid:03d}.csv").exists() or (cid in students and missing(cid, 0))]
    # repeats come after every first student: they measure the noise the objective has to beat
    jobs += [(cid, points[cid], True, args.arrays, str(runs), args.epochs, args.student_epochs, seed, args.test)
             for seed in range(1, args.student_seeds) for cid in args.repeat_ids or [] if missing(cid, seed)]
    print(f"{len(points)} configurations, {len(jobs)} to run, {args.procs} at a time", flush=True)
    if args.procs <= 1:
        for job in jobs:
            print(run_config(job), flush=True)
        return
    import multiprocessing as mp
    with mp.get_context("spawn").Pool(args.procs) as pool:
        for message in pool.imap_unordered(run_config, jobs):
            print(message, flush=True)


def merge(args) -> None:
    """Per-configuration files -> bench/search/teachers.csv and students.csv; student files moved to
    ``<runs>/earlier/`` (runs replaced by ``--test`` reruns) -> students_earlier.csv."""
    runs = Path(args.runs)
    TABLE.mkdir(parents=True, exist_ok=True)
    for folder, kind, name in ((runs, "teacher", "teachers"), (runs, "student", "students"),
                               (runs / "earlier", "student", "students_earlier")):
        files = sorted(folder.glob(f"{kind}_*.csv"))
        if files:
            table = pd.concat([pd.read_csv(f) for f in files]).round(4)
            table.to_csv(TABLE / f"{name}.csv", index=False)
            print(f"{TABLE / f'{name}.csv'}: {table['config'].nunique()} configurations, {len(table)} rows")


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    pk = sub.add_parser("pack")
    pk.add_argument("data_root")
    pk.add_argument("--out", default="runs/cifar10_50.npz")
    g = sub.add_parser("generate")
    g.add_argument("--arrays", default="runs/cifar10_50.npz")
    g.add_argument("--configs", type=int, default=48)
    g.add_argument("--students", type=int, default=16, help="distil a student from the first N teachers (of --ids where given)")
    g.add_argument("--ids", type=int, nargs="*", help="these configurations, in this order (default: all)")
    g.add_argument("--epochs", type=int, default=0, help="teacher epochs (0 = the recipe's)")
    g.add_argument("--student-epochs", type=int, default=0, help="student epochs (0 = the recipe's)")
    g.add_argument("--student-seeds", type=int, default=1,
                   help="students per teacher of --repeat-ids (seeds 1.. are repeats: the noise floor)")
    g.add_argument("--repeat-ids", type=int, nargs="*", help="teachers whose student is repeated")
    g.add_argument("--test", action="store_true",
                   help="score each student's final model on test too (students without it run again)")
    g.add_argument("--procs", type=int, default=1)
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--runs", default="runs/search_bench")
    m = sub.add_parser("merge")
    m.add_argument("--runs", default="runs/search_bench")
    args = p.parse_args()
    {"pack": lambda: pack(args.data_root, args.out), "generate": lambda: generate(args),
     "merge": lambda: merge(args)}[args.command]()


if __name__ == "__main__":
    main()
