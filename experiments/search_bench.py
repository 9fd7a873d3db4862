"""The search benchmark's table (docs/search.md): real phase-1 runs of a fixed, space-filling set
of configurations on CIFAR-10 x 50 per class, each with its k-NN curve (every epoch, on val), and
for the first ``--students`` of them the phase-2 student distilled from the teacher's best epoch
(val top-1 per epoch). Searchers are then replayed on the stored curves (bench/search_replay.py).

The runs are the phases' own worker loops (``raypipe.teacher.run``, ``raypipe.student.run``) over a
``raypipe.loop.MemorySession`` per process (no Ray: it runs on a GPU machine without it, many
configurations at once), fed whole batches of the packed uint8 images in a fresh order every
epoch, views made per batch on the device (``meta["device_views"]``), fp32. The recipe is
experiments/configs/cifar10_50/{base,distill}.yaml, with the k-NN monitor every epoch.

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

from raypipe import student, teacher  # noqa: E402
from raypipe.config import Config, get_dotted, load_config  # noqa: E402
from raypipe.data import decode_square, scan_split  # noqa: E402
from raypipe.loop import MemorySession, Runtime  # noqa: E402
from raypipe.transforms import center_crop  # noqa: E402

CONFIGS = ROOT / "experiments" / "configs" / "cifar10_50"
TABLE = ROOT / "bench" / "search"
# The searched space: the main job's (raypipe.search.teacher_space with the defaults of tune.*),
# plus teacher.lr over 1/4..4x the recipe's. Index 0 is the recipe itself (the search's start point).
SPACE = {"teacher.moco.margin": ("uniform", 0.0, 0.8), "teacher.moco.temperature": ("log", 0.07, 0.5),
         "teacher.moco.queue_size": ("choice", 32, 64, 128, 256, 480), "teacher.lr": ("log", 0.06, 0.96)}
# The tables' columns of the searched keys (named before MoCo's settings moved to teacher.moco).
COLUMNS = {"teacher.moco.margin": "teacher.margin", "teacher.moco.temperature": "teacher.temperature",
           "teacher.moco.queue_size": "teacher.queue_size", "teacher.lr": "teacher.lr"}
# fp32, the k-NN curve every epoch: what the table holds
RUN_OVERRIDES = {"teacher.knn_every": 1, "resources.amp": "off", "resources.channels_last": False}


def design(n: int, seed: int = 0) -> list[dict]:
    """The recipe's point, then ``n - 1`` scrambled-Sobol points of SPACE."""
    base = load_config(CONFIGS / "base.yaml").to_dict()
    points = [{k: get_dotted(base, k) for k in SPACE}]
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


class TimedSession(MemorySession):
    """A MemorySession whose reports also carry ``seconds``: since the first training batch."""

    start: float | None = None

    def batches(self, split: str, batch_size: int, shuffle_buffer: int = 0):
        if split == "train" and self.start is None:
            self.start = time.perf_counter()
        return super().batches(split, batch_size, shuffle_buffer)

    def report(self, metrics: dict, state: dict | None) -> None:
        super().report({**metrics, "seconds": time.perf_counter() - self.start}, state)


def train_batches(data: dict, batch_size: int):
    """Each call: one epoch of whole batches of the decoded training images (NHWC uint8), in a fresh order."""
    def epoch():
        n = len(data["train_label"])
        order = torch.randperm(n, device=data["train_label"].device)
        for i in range(n // batch_size):
            rows = order[i * batch_size:(i + 1) * batch_size]
            yield {"img": data["train_img"][rows], "label": data["train_label"][rows], "idx": rows}
    return epoch


def eval_batches(images: torch.Tensor, labels: torch.Tensor, resolution: int, batch: int = 250):
    crops = center_crop(images.permute(0, 3, 1, 2), resolution)
    return [{"image": crops[i:i + batch], "label": labels[i:i + batch],
             "idx": torch.arange(i, min(i + batch, len(labels)))} for i in range(0, len(labels), batch)]


def run_meta(data: dict, score_metric: str, **more) -> dict:
    labels = data["train_label"]
    return {"n_train": len(labels), "num_classes": int(labels.max()) + 1, "print_epochs": False,
            "score_metric": score_metric, "device_views": True, **more}


def run_teacher(cfg: Config, data: dict, device: torch.device) -> tuple[list[dict], dict]:
    """Phase 1's loop: the k-NN curve (epochs from 1) and the best epoch's backbone weights."""
    res = cfg.data.resolution
    session = TimedSession({"train": train_batches(data, cfg.teacher.batch_size),
                            "bank": eval_batches(data["train_img"], data["train_label"], res),
                            "val": eval_batches(data["val_img"], data["val_label"], res)}, device)
    teacher.run(cfg, run_meta(data, "knn_top1"), session)
    curve = [{"epoch": r["epoch"] + 1, "knn_top1": r["knn_top1"], "seconds": r["seconds"]} for r in session.reports]
    best = session.state["best"]
    method = teacher.build_method(cfg)
    method.model.load_state_dict(best["model"])
    return curve, {"knn_top1": best["score"], "epoch": best["epoch"] + 1, "state": method.backbone.state_dict()}


def run_student(cfg: Config, data: dict, device: torch.device, teacher_state: dict, test: bool = False) -> list[dict]:
    """Phase 2's loop: val top-1 per epoch; with ``test``, the final model's test top-1 on the last row
    (held out from every choice made on val)."""
    res = cfg.data.resolution
    session = TimedSession({"train": train_batches(data, cfg.student.batch_size),
                            "val": eval_batches(data["val_img"], data["val_label"], res)}, device)
    meta = run_meta(data, "val_top1", teacher=teacher_state)
    student.run(cfg, meta, session)
    curve = [{"epoch": r["epoch"] + 1, "val_top1": r["val_top1"], "seconds": r["seconds"]} for r in session.reports]
    if test:
        final = student.build_distiller(cfg, meta["num_classes"], teacher_state)
        final.student.load_state_dict(session.state["model"])
        final.student.to(device)
        test_set = eval_batches(data["test_img"], data["test_label"], res)
        curve[-1]["test_top1"] = student.validate_top(final, Runtime(device, None, False, 1, 0), test_set)[0]
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
    overrides = {**RUN_OVERRIDES, **point, "teacher.seed": cid, "student.seed": cid + 1000 * student_seed}
    if epochs:
        overrides["teacher.epochs"] = epochs
    if student_epochs:
        overrides["student.epochs"] = student_epochs
    cfg = load_config(CONFIGS / "distill.yaml", overrides)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    loaded = np.load(arrays)
    data = {k: torch.from_numpy(loaded[k]).to(device) for k in loaded.files}
    teacher_file, weights = out / f"teacher_{cid:03d}.csv", out / f"teacher_{cid:03d}.pt"
    student_csv = student_file(out, cid, student_seed)
    want_student = with_student and not (student_csv.exists() and (not test or has_test(student_csv)))
    columns = {COLUMNS[k]: v for k, v in point.items()}
    if not teacher_file.exists() or (want_student and not weights.exists()):
        # a student needs its teacher's weights: where only the curve was kept (a run elsewhere),
        # the teacher is trained again and its own best k-NN goes with the student's row
        curve, best = run_teacher(cfg, data, device)
        torch.save({"state": best["state"], "knn_top1": best["knn_top1"], "epoch": best["epoch"]}, weights)
        if not teacher_file.exists():
            write_atomic(pd.DataFrame([{"config": cid, **columns, **row} for row in curve]), teacher_file)
    if want_student:
        teacher_weights = torch.load(weights, map_location=device)
        curve = run_student(cfg, data, device, teacher_weights["state"], test)
        write_atomic(pd.DataFrame([{"config": cid, "student_seed": student_seed,
                                    "teacher_knn_top1": teacher_weights["knn_top1"],
                                    "teacher_epoch": teacher_weights["epoch"], **row} for row in curve]), student_csv)
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
