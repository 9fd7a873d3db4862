"""What makes a 500-image MoCo teacher learn (CIFAR-10, 50 images per class) -> docs/teacher_study.md.

    python experiments/teacher_study.py                # run every arm not yet done, then write the table
    python experiments/teacher_study.py --table-only   # rewrite the table from the kept records only
    python experiments/teacher_study.py --only study_e400   # some arms

Each arm is the phase-1 recipe of experiments/configs/cifar10_50/base.yaml with a few overrides,
trained on `train`, then probed with `raypipe linear-probe` (weighted k-NN, and MoCo's linear
probe with its lr chosen on val); `random` probes the same backbone with random weights, the
baseline every teacher's gain is measured against. The step engine (experiments/steps.py), logs, run
folders and kept records (experiments/records/cifar10_50) are shared with experiments/cifar10_50.py:
a finished arm is not rerun. Models are not kept: a probe whose arm's teacher is gone from runs/
re-makes it by running the arm's pretrain step again.
"""
from __future__ import annotations

import sys
from pathlib import Path
from typing import ClassVar

if __package__ in (None, ""):  # `python experiments/teacher_study.py`: import from the repository
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from experiments.steps import Runner, Step, fmt, gain, runner_args  # noqa: E402

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


class TeacherStudy(Runner):
    NAME = "cifar10_50"  # the CIFAR-10 runner's folders: its run folders, records and configs
    RESULTS = Path("docs/teacher_study.md")
    BEGIN: ClassVar[str] = "<!-- study:begin (written by experiments/teacher_study.py) -->"
    END: ClassVar[str] = "<!-- study:end -->"
    TITLE: ClassVar[str] = "Teacher study"

    def steps(self, data: str) -> list[Step]:
        config = f"{self.configs}/base.yaml"
        out = [Step(f"probe_{RANDOM}", ["linear-probe", data, "--random-init", "--split", "val", "test",
                                        "--out", str(self.probe_file(RANDOM)), "--config", config],
                    self.probe_file(RANDOM))]
        for arm, overrides in ARMS.items():
            out += [Step(f"pretrain_{arm}", ["pretrain", data, *overrides, "--config", config,
                                             "--name", f"teacher_{arm}"], self.teacher_file(arm)),
                    Step(f"probe_{arm}", ["linear-probe", data, "--teacher", str(self.teacher_file(arm)),
                                          "--split", "val", "test", "--out", str(self.probe_file(arm)),
                                          "--config", config], self.probe_file(arm))]
        return out

    def table(self, data: str | None = None) -> str:
        random = self.load(self.probe_file(RANDOM)) or {}
        rows = [f"| random weights | - | - | {fmt(random.get('val_knn_top1'))} | - | "
                f"{fmt(random.get('test_knn_top1'))} | - | {fmt(random.get('val_top1'))} | "
                f"{fmt(random.get('test_top1'))} | {random.get('probe_lr', '-')} | - |"]
        for arm, overrides in ARMS.items():
            probe = self.load(self.probe_file(arm)) or {}
            gains = {s: gain(probe, random, f"{s}_knn_top1") for s in ("val", "test")}
            rows.append(f"| `{arm}` | {' '.join(overrides) or '(base.yaml)'} | {self.knn_curve(arm)} | "
                        f"{fmt(probe.get('val_knn_top1'))} | {fmt(gains['val'])} | {fmt(probe.get('test_knn_top1'))} | "
                        f"{fmt(gains['test'])} | {fmt(probe.get('val_top1'))} | {fmt(probe.get('test_top1'))} | "
                        f"{probe.get('probe_lr', '-')} | "
                        f"{fmt(self.wall_min(f'pretrain_{arm}', f'probe_{arm}'), '.1f')} |")
        return "\n".join([
            self.BEGIN, "",
            "| arm | overrides of base.yaml | k-NN val by epoch (monitor) | k-NN val | gain over random | "
            "k-NN test | gain over random | linear val | linear test | probe lr (val) | min |",
            "|---|---|---|---|---|---|---|---|---|---|---|", *rows, "",
            "k-NN: k = 50, t = 0.1, bank = train. Linear: MoCo's protocol on frozen features (fc N(0, 0.01), "
            "SGD momentum 0.9, no weight decay, 100 epochs, x0.1 at 60 and 80), lr from "
            "0.1 / 1 / 10 / 30 (x10 beyond the edge, twice at most, while the best sits on it) chosen on val. "
            "2 CPU cores.", "",
            "Every command, in the order run:", "",
            "```", *self.commands_block(self.steps(data or self.DATA)), "```", "", self.END])

    def block(self, data: str | None = None) -> str:
        return self.table(data)

    def write_table(self) -> None:
        self.write_block(self.table())


def main(argv: list[str] | None = None) -> int:
    args = runner_args(argv, __doc__, TeacherStudy.RESULTS, "run just these arms (e.g. study_e400)")
    runner = TeacherStudy()
    if not args.table_only:
        only = {f"{kind}_{arm}" for arm in args.only for kind in ("pretrain", "probe")} if args.only else None
        runner.run_all(runner.steps(args.data), only)
    runner.write_block(runner.block(args.data))
    return 0


if __name__ == "__main__":
    sys.exit(main())
