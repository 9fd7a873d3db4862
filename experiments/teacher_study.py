"""What makes a 500-image MoCo teacher learn (CIFAR-10, 50 images per class) -> docs/teacher_study.md.

    python experiments/teacher_study.py                # run every arm not yet done, then write the table
    python experiments/teacher_study.py --table-only   # rewrite the table from the kept records only
    python experiments/teacher_study.py --only study_e400   # some arms

Each arm is the phase-1 recipe of experiments/configs/cifar10_50/base.yaml with a few overrides,
trained on `train`, then probed with `raypipe linear-probe` (weighted k-NN, and MoCo's linear
probe with its lr chosen on val); `random` probes the same backbone with random weights, the
baseline every teacher's gain is measured against. Steps, logs, run folders and kept records
(experiments/records/cifar10_50) are shared with experiments/cifar10_50.py: a finished arm is not rerun.
"""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path


REPO = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("cifar10_50", REPO / "experiments" / "cifar10_50.py")
repro = importlib.util.module_from_spec(_spec)
sys.modules["cifar10_50"] = repro  # dataclasses look their module up
_spec.loader.exec_module(repro)

CONFIG = f"{repro.CONFIGS}/base.yaml"
RESULTS = Path("docs/teacher_study.md")
# arm -> overrides of base.yaml (stride-2 stem, m = 0.4, K = 128, t = 0.2, 100 epochs, batch 32)
ARMS = {
    "study_e100": [],
    "study_e400": ["teacher.epochs=400", "teacher.knn_every=20"],
    "study_e100_t0.1": ["teacher.temperature=0.1"],
    "study_e400_t0.1_noblur": ["teacher.epochs=400", "teacher.knn_every=20", "teacher.temperature=0.1",
                               "teacher.blur_prob=0"],
    "study_e100_noblur": ["teacher.blur_prob=0"],
    "study_e100_crop0.4": ["teacher.crop_min_scale=0.4"],
    "study_e100_b64": ["teacher.batch_size=64"],
}
RANDOM = "study_random"
BEGIN, END = "<!-- study:begin (written by experiments/teacher_study.py) -->", "<!-- study:end -->"


def steps(data: str) -> list:
    out = [repro.Step(f"probe_{RANDOM}", ["linear-probe", data, "--random-init", "--split", "val", "test",
                                           "--out", str(repro.probe_file(RANDOM)), "--config", CONFIG],
                      repro.probe_file(RANDOM))]
    for arm, overrides in ARMS.items():
        out += [repro.Step(f"pretrain_{arm}", ["pretrain", data, *overrides, "--config", CONFIG,
                                               "--name", f"teacher_{arm}"], repro.teacher_file(arm)),
                repro.Step(f"probe_{arm}", ["linear-probe", data, "--teacher", str(repro.teacher_file(arm)),
                                            "--split", "val", "test", "--out", str(repro.probe_file(arm)),
                                            "--config", CONFIG], repro.probe_file(arm))]
    return out


def table() -> str:
    fmt = repro.fmt
    random = repro.load(repro.probe_file(RANDOM)) or {}
    rows = [f"| random weights | - | - | {fmt(random.get('val_knn_top1'))} | - | {fmt(random.get('test_knn_top1'))} | "
            f"- | {fmt(random.get('val_top1'))} | {fmt(random.get('test_top1'))} | {random.get('probe_lr', '-')} | - |"]
    for arm, overrides in ARMS.items():
        probe = repro.load(repro.probe_file(arm)) or {}
        gain = {s: repro.gain(probe, random, f"{s}_knn_top1") for s in ("val", "test")}
        rows.append(f"| `{arm}` | {' '.join(overrides) or '(base.yaml)'} | {repro.knn_curve(arm)} | "
                    f"{fmt(probe.get('val_knn_top1'))} | {fmt(gain['val'])} | {fmt(probe.get('test_knn_top1'))} | "
                    f"{fmt(gain['test'])} | "
                    f"{fmt(probe.get('val_top1'))} | {fmt(probe.get('test_top1'))} | {probe.get('probe_lr', '-')} | "
                    f"{fmt(repro.wall_min(f'pretrain_{arm}', f'probe_{arm}'), '.1f')} |")
    return "\n".join([
        BEGIN, "",
        "| arm | overrides of base.yaml | k-NN val by epoch (monitor) | k-NN val | gain over random | "
        "k-NN test | gain over random | linear val | linear test | probe lr (val) | min |",
        "|---|---|---|---|---|---|---|---|---|---|---|", *rows, "",
        "k-NN: k = 50, t = 0.1, bank = train. Linear: MoCo's protocol on frozen features (fc N(0, 0.01), "
        "SGD momentum 0.9, no weight decay, 100 epochs, x0.1 at 60 and 80), lr from "
        "0.1 / 1 / 10 / 30 (x10 beyond the edge, twice at most, while the best sits on it) chosen on val. "
        "2 CPU cores.", "",
        "Every command, in the order run:", "",
        "```", *repro.commands_block(steps("../shared/data/cifar10-50")), "```", "", END])


def write_table() -> None:
    repro.write_block(RESULTS, table(), BEGIN, END, title="Teacher study")


def main(argv: list[str] | None = None) -> int:
    args = repro.runner_args(argv, __doc__, RESULTS, "run just these arms (e.g. study_e400)")
    if not args.table_only:
        only = {f"{kind}_{arm}" for arm in args.only for kind in ("pretrain", "probe")} if args.only else None
        repro.run_all(steps(args.data), only)
    write_table()
    return 0


if __name__ == "__main__":
    sys.exit(main())
