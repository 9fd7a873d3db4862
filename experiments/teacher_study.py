"""What makes a 500-image MoCo teacher learn (CIFAR-10, 50 images per class) -> docs/teacher_study.md.

    python experiments/teacher_study.py                # run every arm not yet done, then write the table
    python experiments/teacher_study.py --table-only   # rewrite the table from the kept records only
    python experiments/teacher_study.py --only study_e400   # some arms
    python experiments/teacher_study.py --only choice      # the teacher choice: 2 recipes x 2 seeds

Each arm is the phase-1 recipe of experiments/configs/cifar10_50/base.yaml with a few overrides,
trained on `train`, then probed with `raypipe linear-probe` (weighted k-NN, and MoCo's linear
probe with its lr chosen on val); `random` probes the same backbone with random weights, the
baseline every teacher's gain is measured against. The step engine (experiments/steps.py), logs, run
folders and kept records (experiments/records/cifar10_50) are shared with experiments/cifar10_50.py:
a finished arm is not rerun. Models are not kept: a probe whose arm's teacher is gone from runs/
re-makes it by running the arm's pretrain step again.

The teacher choice (its own block in the doc): the two 400-epoch recipes the study compared with one
run each - t = 0.2 with blur (`study_e400`) and t = 0.1 without (teacher.yaml) - each trained with
seeds 0 and 1 and probed alike; the recipe with the higher mean linear-probe val is the phase-2
teacher. Seed 0 of teacher.yaml is the CIFAR-10 runner's own teacher (the same step).
"""
from __future__ import annotations

import statistics
import sys
from pathlib import Path
from typing import ClassVar

if __package__ in (None, ""):  # `python experiments/teacher_study.py`: import from the repository
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from experiments.steps import Runner, Step, fmt, gain, runner_args, seeds_cell  # noqa: E402

# arm -> overrides of base.yaml (stride-2 stem, m = 0.4, K = 128, t = 0.2, 100 epochs, batch 32)
ARMS = {
    "study_e100": [],
    "study_e400": ["teacher.epochs=400", "teacher.knn_every=20"],
    "study_e100_t0.1": ["teacher.moco.temperature=0.1"],
    "study_e400_t0.1_noblur": ["teacher.epochs=400", "teacher.knn_every=20", "teacher.moco.temperature=0.1",
                               "teacher.moco.blur_prob=0"],
    "study_e100_noblur": ["teacher.moco.blur_prob=0"],
    "study_e100_crop0.4": ["teacher.moco.crop_min_scale=0.4"],
    "study_e100_b64": ["teacher.batch_size=64"],
}
# the teacher choice: recipe -> (its teacher name at seed 0, the study arm whose recipe it is); seed s > 0
# adds teacher.seed=s and _seed<s> to the name. Seed 0 of each is that arm's step (not trained twice).
CHOICE = {"t0.2_blur": ("study_e400", "study_e400"), "t0.1_noblur": ("m0.4_k128_t0.1_e400", "study_e400_t0.1_noblur")}
CHOICE_SEEDS = (0, 1)
IN_USE = "t0.1_noblur"   # the recipe experiments/configs/cifar10_50/teacher.yaml holds: the phase-2 teacher
ARM_RECIPE = {arm: recipe for recipe, (_, arm) in CHOICE.items()}


def recipe_config(recipe: str) -> tuple[str, list[str]]:
    """(config file, overrides) of a choice recipe's commands: teacher.yaml for the one in use (its seed 0 is the
    CIFAR-10 runner's teacher, the same step), base.yaml + its arm's overrides for the others. The step
    engine knows a run by the config it resolved to, so moving a recipe between the two forms (when the
    choice changes teacher.yaml) keeps its runs; a test checks that both forms resolve alike."""
    return ("teacher.yaml", []) if recipe == IN_USE else ("base.yaml", ARMS[CHOICE[recipe][1]])


def arm_step(arm: str) -> tuple[str, str, list[str]]:
    """(teacher name, config file, overrides) of a study arm's steps; a choice recipe's arm is its seed 0."""
    if arm in ARM_RECIPE:
        return (CHOICE[ARM_RECIPE[arm]][0], *recipe_config(ARM_RECIPE[arm]))
    return arm, "base.yaml", ARMS[arm]


class TeacherStudy(Runner):
    NAME = "cifar10_50"  # the CIFAR-10 runner's folders: its run folders, records and configs
    RESULTS = Path("docs/teacher_study.md")
    BEGIN: ClassVar[str] = "<!-- study:begin (written by experiments/teacher_study.py) -->"
    END: ClassVar[str] = "<!-- study:end -->"
    TITLE: ClassVar[str] = "Teacher study"

    def steps(self, data: str) -> list[Step]:
        out = [self.random_probe(data)]
        for arm in ARMS:
            name, config, overrides = arm_step(arm)
            out += self.pretrain_steps(data, name, f"{self.configs}/{config}", overrides)
        return out

    @staticmethod
    def choice_name(recipe: str, seed: int) -> str:
        return CHOICE[recipe][0] + (f"_seed{seed}" if seed else "")

    def choice_steps(self, data: str) -> list[Step]:
        """The teacher choice: each recipe x CHOICE_SEEDS, seed 0 of both first."""
        out = []
        for seed in CHOICE_SEEDS:
            for recipe in CHOICE:
                config, overrides = recipe_config(recipe)
                seeded = [*overrides, f"teacher.seed={seed}"] if seed else list(overrides)
                out += self.pretrain_steps(data, self.choice_name(recipe, seed), f"{self.configs}/{config}", seeded)
        return out

    def table(self, data: str | None = None) -> str:
        random = self.load(self.probe_file("random")) or {}
        rows = [f"| random weights | - | - | {fmt(random.get('val_knn_top1'))} | - | "
                f"{fmt(random.get('test_knn_top1'))} | - | {fmt(random.get('val_top1'))} | "
                f"{fmt(random.get('test_top1'))} | {random.get('probe_lr', '-')} | - |"]
        for arm, overrides in ARMS.items():
            name, config, _ = arm_step(arm)
            probe = self.load(self.probe_file(name)) or {}
            gains = {s: gain(probe, random, f"{s}_knn_top1") for s in ("val", "test")}
            same = f" (= `{config}`, step `pretrain_{name}`)" if config != "base.yaml" else ""
            rows.append(f"| `{arm}` | {' '.join(overrides) or '(base.yaml)'}{same} | {self.knn_curve(name)} | "
                        f"{fmt(probe.get('val_knn_top1'))} | {fmt(gains['val'])} | {fmt(probe.get('test_knn_top1'))} | "
                        f"{fmt(gains['test'])} | {fmt(probe.get('val_top1'))} | {fmt(probe.get('test_top1'))} | "
                        f"{probe.get('probe_lr', '-')} | "
                        f"{fmt(self.wall_min(f'pretrain_{name}', f'probe_{name}'), '.1f')} |")
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


class TeacherChoice(TeacherStudy):
    """The teacher choice's block of docs/teacher_study.md: 2 recipes x 2 seeds and the decision."""
    BEGIN: ClassVar[str] = "<!-- choice:begin (written by experiments/teacher_study.py) -->"
    END: ClassVar[str] = "<!-- choice:end -->"

    def steps(self, data: str) -> list[Step]:
        return self.choice_steps(data)

    def winner(self) -> tuple[str | None, dict[str, list[float]]]:
        """The recipe with the higher mean linear val over CHOICE_SEEDS (None until every probe is in), and
        each recipe's linear vals so far."""
        vals = {recipe: [p["val_top1"] for seed in CHOICE_SEEDS
                         if (p := self.load(self.probe_file(self.choice_name(recipe, seed))))]
                for recipe in CHOICE}
        complete = all(len(v) == len(CHOICE_SEEDS) for v in vals.values())
        return (max(vals, key=lambda r: statistics.mean(vals[r])) if complete else None), vals

    def table(self, data: str | None = None) -> str:
        keys = ("val_knn_top1", "test_knn_top1", "val_top1", "test_top1")
        rows = []
        for recipe in CHOICE:
            config, overrides = recipe_config(recipe)
            probes = []
            for seed in CHOICE_SEEDS:
                name = self.choice_name(recipe, seed)
                probe = self.load(self.probe_file(name)) or {}
                probes.append(probe)
                edge = {True: "at its edge", False: "inside"}.get(probe.get("probe_lr_at_edge"), "-")
                grid = "/".join(format(float(lr), "g") for lr in probe.get("probe_val_top1_by_lr", {})) or "-"
                rows.append(f"| {recipe} | `{config}` {' '.join(overrides)} | {seed} | "
                            f"{' | '.join(fmt(probe.get(k)) for k in keys)} | {probe.get('probe_lr', '-')} "
                            f"({grid}; {edge}) | {fmt(self.wall_min(f'pretrain_{name}', f'probe_{name}'), '.1f')} |")
            rows.append(f"| **{recipe}: mean ± sd** | | {len([p for p in probes if p])} | "
                        f"{' | '.join(seeds_cell([p.get(k) for p in probes]) for k in keys)} | | |")
        winner, vals = self.winner()
        if winner is None:
            missing = [self.choice_name(r, s) for r in CHOICE for s in CHOICE_SEEDS
                       if not self.load(self.probe_file(self.choice_name(r, s)))]
            decision = (f"Not decided yet: probes missing for {', '.join(missing)} "
                        "(`python experiments/teacher_study.py --only choice` runs them). teacher.yaml holds "
                        f"{IN_USE}, the one-run study's pick.")
        else:
            means = {r: statistics.mean(v) for r, v in vals.items()}
            margin = means[winner] - max(m for r, m in means.items() if r != winner)
            spread = max((statistics.stdev(v) for v in vals.values() if len(v) > 1), default=0.0)
            decision = (f"Chosen on mean linear val: **{winner}** "
                        f"({' vs '.join(f'{r} {m:.2f}' for r, m in means.items())}: {margin:+.2f}, against a sd "
                        f"between seeds of up to {spread:.2f} within a recipe"
                        + ("; the rule decides, the seeds do not separate the recipes). " if margin < spread else "). ")
                        + ("teacher.yaml holds it." if winner == IN_USE else
                           f"teacher.yaml holds {IN_USE}: it must change, and what depends on it re-run."))
        return "\n".join([
            self.BEGIN, "",
            "| recipe | config | seed | k-NN val | k-NN test | linear val | linear test | probe lr (grid tried on val; "
            "optimum) | min |", "|---|---|---|---|---|---|---|---|---|", *rows, "", decision, "",
            "Every command, in the order run:", "",
            "```", *self.commands_block(self.steps(data or self.DATA)), "```", "", self.END])


def main(argv: list[str] | None = None) -> int:
    args = runner_args(argv, __doc__, TeacherStudy.RESULTS,
                       "run just these arms (e.g. study_e400), or `choice` for the teacher choice")
    study, choice = TeacherStudy(), TeacherChoice()
    if not args.table_only:
        steps = study.steps(args.data)
        names = {s.name for s in steps}
        steps += [s for s in choice.steps(args.data) if s.name not in names]
        only = None
        if args.only:
            arms = [a for a in args.only if a != "choice"]
            only = {f"{kind}_{arm}" for arm in arms for kind in ("pretrain", "probe")}
            if "choice" in args.only:
                only |= {s.name for s in choice.steps(args.data)}
        study.run_all(steps, only)
    for runner in (choice, study):
        try:
            runner.write_block(runner.block(args.data))
        except SystemExit as exc:   # the study's block lacks records of arms not re-run yet: left as it is
            print(exc, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
