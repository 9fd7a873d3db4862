"""The paper's regime in miniature: Tiny ImageNet, 200 classes x 50 labelled images -> the Tiny
ImageNet section of docs/results.md.

    python experiments/tinyimagenet_50.py                # run every step not yet done, then write the table
    python experiments/tinyimagenet_50.py --table-only   # rewrite the table from the kept records only
    python experiments/tinyimagenet_50.py --only probe_random pretrain_teacher   # some steps

Pilots first (10-epoch phase-1 runs, one change each, compared by their k-NN val curve: what keeps
the teacher from learning), then the phase ablation (supervised; phase 1 + linear probe; phase 1 +
fine-tune; phase 1 + phase 2 at lambda 1e-4 and 1e-5, chosen on val), 2 seeds for supervised and
phase 1 + phase 2 (the chosen lambda gets the second seed once the val check is in), the teacher's gain
over random weights (k-NN and linear probe), and the supervised baseline given the CPU time of
phase 1 + phase 2. Steps, step records (resume: a finished step is not run again; kept,
committed, in experiments/records/tinyimagenet_50), logs and the table's helpers are the step engine's
(experiments/steps.py), pointed at runs/tinyimagenet_50 and experiments/configs/tinyimagenet_50. Every
model trains on `train`; choices are made on `val`; `test` (the official labelled hold-out, 10,000
images) gives the reported numbers only.

Models are not committed (the teacher, 46 MB, was until issue 41): on a machine without
runs/tinyimagenet_50/teacher_teacher/teacher.pt, a student still to train that starts from it first
re-makes it by running `pretrain_teacher` again (about 85-98 min on 2 cores; its record is then the
re-made run's). With --only, add it: `--only pretrain_teacher distill_s1 ...`.
"""
from __future__ import annotations

import sys
from pathlib import Path
from typing import ClassVar

if __package__ in (None, ""):  # `python experiments/tinyimagenet_50.py`: import from the repository
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from experiments.steps import EPOCHS_NOTE, Runner, Step, decided, fmt, runner_args  # noqa: E402

DATA = "../shared/data/tinyimagenet-50"
SEEDS = (0, 1)
RECIPES = {"supervised": "supervised.yaml", "finetune": "finetune.yaml", "distill": "distill.yaml",
           "distill_l1e-5": "distill_l1e-5.yaml", "supervised_budget": "supervised_budget.yaml"}
TEACHER = "teacher"
ROWS = {"supervised": SEEDS, "finetune": (0,), "distill": SEEDS, "distill_l1e-5": (0,), "supervised_budget": (0,)}
DISTILL_CANDIDATES = ("distill", "distill_l1e-5")  # lambda 1e-4 vs 1e-5, chosen on val (seed 0)
NATIVE = ["data.resolution=64", "data.decode_size=0"]  # the images' own size (the recipe halves it)
# short phase-1 runs that test, on val, what keeps the teacher from learning: pilot -> overrides of base.yaml
PILOTS = {"pilot_e10": ["teacher.epochs=10"],
          "pilot_e10_m0": ["teacher.epochs=10", "teacher.moco.margin=0"],
          "pilot_e10_lr0.03": ["teacher.epochs=10", "teacher.lr=0.03"],
          "pilot_e10_64px": ["teacher.epochs=10", *NATIVE],
          "pilot_e10_stride1": ["teacher.epochs=10", "teacher.stem_stride=1"]}
# pilots probed (k-NN and linear) against random weights at the same data settings: pilot -> data overrides
PROBED_PILOTS = {"pilot_e10_64px": NATIVE}
PAPER = {"supervised": "27.9", "finetune": "39.4", "distill": "44.6", "distill_l1e-5": "-", "supervised_budget": "-"}
LAMBDAS = {"distill": "1e-4", "distill_l1e-5": "1e-5"}


class TinyImageNet(Runner):
    NAME = "tinyimagenet_50"  # committed records: experiments/records/tinyimagenet_50 (see experiments/steps.py)
    DATA: ClassVar[str] = DATA
    BEGIN: ClassVar[str] = "<!-- tinyimagenet:begin (written by experiments/tinyimagenet_50.py) -->"
    END: ClassVar[str] = "<!-- tinyimagenet:end -->"
    RECIPES: ClassVar[dict[str, str]] = RECIPES
    DISTILL_CANDIDATES: ClassVar[tuple[str, ...]] = DISTILL_CANDIDATES

    def decided_distill(self) -> str | None:
        """The lambda chosen on val (seed 0), once both candidates are in."""
        return decided(self.chosen_distill)

    def distill_in_use(self) -> str:
        return self.decided_distill() or "distill"  # 1e-4, the paper's, until then

    def rows(self) -> dict:
        """ROWS, with the second seed for the chosen lambda."""
        return {**ROWS, self.distill_in_use(): SEEDS}

    def steps(self, data: str) -> list[Step]:
        base = f"{self.configs}/base.yaml"
        probe = ["--split", "val", "test", "--config", base]
        random, teacher = self.probe_file("random"), self.teacher_file(TEACHER)
        out = [Step("probe_random", ["linear-probe", data, "--random-init", "--out", str(random), *probe], random),
               Step(f"pretrain_{TEACHER}", ["pretrain", data, "--config", base, "--name", f"teacher_{TEACHER}"],
                    teacher),
               Step(f"probe_{TEACHER}", ["linear-probe", data, "--teacher", str(teacher),
                                         "--out", str(self.probe_file(TEACHER)), *probe], self.probe_file(TEACHER))]
        out += [Step(f"pretrain_{pilot}", ["pretrain", data, *overrides, "--config", base, "--name",
                                           f"teacher_{pilot}"], self.teacher_file(pilot))
                for pilot, overrides in PILOTS.items()]
        for pilot, overrides in PROBED_PILOTS.items():
            random = f"random_{pilot}"
            out += [Step(f"probe_{random}", ["linear-probe", data, *overrides, "--random-init", "--out",
                                             str(self.probe_file(random)), *probe], self.probe_file(random)),
                    Step(f"probe_{pilot}", ["linear-probe", data, *overrides, "--teacher",
                                            str(self.teacher_file(pilot)), "--out", str(self.probe_file(pilot)),
                                            *probe], self.probe_file(pilot))]
        for seed in range(max(SEEDS) + 1):
            for recipe, seeds in self.rows().items():
                if seed not in seeds:
                    continue
                run = f"{recipe}_s{seed}"
                argv = ["distill", data, f"student.seed={seed}", "--config", f"{self.configs}/{RECIPES[recipe]}",
                        "--name", run]
                if not recipe.startswith("supervised"):
                    argv += ["--teacher", str(teacher)]
                out += [Step(run, argv, self.student_file(run)), self.evaluate(data, f"{run}_test", [run], "test")]
        return out

    def budget_gap(self) -> tuple[float | None, int, int]:
        """Phase 1 + phase 2 (the lambda in use) minus the budget-matched supervised run, test top-1 seed
        means as this runner's table gives it, with the number of seeds of each."""
        rows = self.rows()
        chosen = self.distill_in_use()
        a = [t for s in rows[chosen] if (t := self.eval_top1(f"{chosen}_s{s}_test")) is not None]
        b = [t for s in rows["supervised_budget"] if (t := self.eval_top1(f"supervised_budget_s{s}_test")) is not None]
        return (sum(a) / len(a) - sum(b) / len(b) if a and b else None), len(a), len(b)

    def table(self, all_steps: list[Step]) -> str:
        means, lines, seeds, chosen = {}, [], self.rows(), self.distill_in_use()
        probe = self.load(self.probe_file(TEACHER)) or {}

        def student_row(label, recipe):
            lines.append(f"{self.seeds_row(label, recipe, seeds[recipe], means)} {PAPER[recipe]} |")

        def gap(a, b):
            return None if means.get(a) is None or means.get(b) is None else means[a] - means[b]

        student_row("supervised from scratch", "supervised")
        lines.append(f"| phase 1 + linear probe | `base.yaml` | {'0' if probe else '-'} | "
                     f"{fmt(probe.get('val_top1'))} | {fmt(probe.get('test_top1'))} | "
                     f"{fmt(self.wall_min(f'pretrain_{TEACHER}', f'probe_{TEACHER}'), '.1f')} | 34.5 |")
        student_row("phase 1 + full fine-tune", "finetune")
        for recipe in DISTILL_CANDIDATES:
            student_row(f"phase 1 + phase 2 (OFD, lambda {LAMBDAS[recipe]})", recipe)
        student_row("supervised from scratch, the CPU time of phase 1 + phase 2", "supervised_budget")
        recs = self.recorded(all_steps)
        out = [self.BEGIN, "",
               f"Machine: {'; '.join(sorted({r['machine'] for r in recs})) or '-'}. Steps recorded: {len(recs)} of "
               f"{len(all_steps)}, {sum(r['wall_s'] for r in recs) / 3600:.2f} h of wall time in all.",
               f"Test = the official Tiny ImageNet validation split (10,000 images, centre crop){EPOCHS_NOTE[0]} "
               f"Val = the disjoint 50 images per class of `val`{EPOCHS_NOTE[1]} "
               "Multi-seed cells: **mean ± sample sd** (each seed). *min per seed*: wall "
               "minutes of the row's own training + test evaluation (a step resumed from its checkpoint in a later "
               "sitting: all its attempts).", "",
               "| row | config | seeds | val top-1 | test top-1 | min per seed | paper (ImageNet subset) |",
               "|---|---|---|---|---|---|---|", *lines, "",
               f"Lambda chosen on val (seed 0, 1e-4 vs 1e-5): **{LAMBDAS[chosen]}**"
               f"{'' if self.decided_distill() else ' (the default, until both have run)'}.",
               f"Phase 1 + phase 2 (lambda {LAMBDAS[chosen]}) minus supervised (test, seed means): "
               f"**{fmt(gap(chosen, 'supervised'), '+.2f')} points** (goal: >= +5); minus the budget-matched "
               f"supervised run: **{fmt(gap(chosen, 'supervised_budget'), '+.2f')} points**.", "",
               *self.probe_rows("random", TEACHER, "phase 1 (`base.yaml`)"), "",
               f"Teacher k-NN val by epoch (the pilot): {self.knn_curve(TEACHER)}", "",
               "Pilots: 10 epochs of phase 1 (cosine over the 10), one change each; k-NN val by epoch "
               "(k = 200, t = 0.1, bank = train).", "",
               "| pilot | overrides of base.yaml | k-NN val by epoch | min |", "|---|---|---|---|",
               *(f"| `{pilot}` | {' '.join(overrides)} | {self.knn_curve(pilot)} | "
                 f"{fmt(self.wall_min(f'pretrain_{pilot}'), '.1f')} |" for pilot, overrides in PILOTS.items()), "",
               *(line for pilot, overrides in PROBED_PILOTS.items() for line in (
                   f"Probes of `{pilot}` and of random weights, both with {' '.join(overrides)}:", "",
                   *self.probe_rows(f"random_{pilot}", pilot, f"`{pilot}` (10 epochs)"), "")),
               "Every command, in the order run:", "", "```", *self.commands_block(all_steps), "```", "", self.END]
        return "\n".join(out)

    def block(self, data: str | None = None) -> str:
        return self.table(self.steps(data or self.DATA))


def main(argv: list[str] | None = None) -> int:
    args = runner_args(argv, __doc__, TinyImageNet.RESULTS,
                       "run just these steps (names as in runs/tinyimagenet_50/steps)", data_default=DATA)
    runner = TinyImageNet()
    all_steps = runner.steps(args.data)
    if not args.table_only:
        runner.run_all(all_steps, set(args.only) if args.only else None)
    runner.write_block(runner.block(args.data))
    return 0


if __name__ == "__main__":
    sys.exit(main())
