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
committed, in experiments/records/tinyimagenet_50), logs and the table's helpers are those of
experiments/cifar10_50.py, in its own instance pointed at runs/tinyimagenet_50 and
experiments/configs/tinyimagenet_50. Every model trains on `train`; choices are made on `val`;
`test` (the official labelled hold-out, 10,000 images) gives the reported numbers only.
"""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RUNS = Path("runs/tinyimagenet_50")
RECORDS = Path("experiments/records/tinyimagenet_50")  # committed: see experiments/cifar10_50.py
CONFIGS = "experiments/configs/tinyimagenet_50"
RESULTS = Path("docs/results.md")
DATA = "../shared/data/tinyimagenet-50"
SEEDS = (0, 1)
RECIPES = {"supervised": "supervised.yaml", "finetune": "finetune.yaml", "distill": "distill.yaml",
           "distill_l1e-5": "distill_l1e-5.yaml", "supervised_budget": "supervised_budget.yaml"}
BEGIN, END = "<!-- tinyimagenet:begin (written by experiments/tinyimagenet_50.py) -->", "<!-- tinyimagenet:end -->"


def _steps_machinery():
    """experiments/cifar10_50.py as a module of its own (its globals are this runner's folders)."""
    spec = importlib.util.spec_from_file_location("tinyimagenet_50_steps", REPO / "experiments" / "cifar10_50.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    module.RUNS, module.RECORDS, module.CONFIGS, module.RECIPES = RUNS, RECORDS, CONFIGS, RECIPES
    # the teacher (46 MB) is committed with the records: the students of a later sitting start from it
    module.KEPT_MODELS = (f"teacher_{TEACHER}/teacher.pt",)
    return module


TEACHER = "teacher"
steps_lib = _steps_machinery()
Step, probe_file, probe_rows = steps_lib.Step, steps_lib.probe_file, steps_lib.probe_rows
ROWS = {"supervised": SEEDS, "finetune": (0,), "distill": SEEDS, "distill_l1e-5": (0,), "supervised_budget": (0,)}
DISTILL_CANDIDATES = ("distill", "distill_l1e-5")  # lambda 1e-4 vs 1e-5, chosen on val (seed 0)
NATIVE = ["data.resolution=64", "data.decode_size=0"]  # the images' own size (the recipe halves it)
# short phase-1 runs that test, on val, what keeps the teacher from learning: pilot -> overrides of base.yaml
PILOTS = {"pilot_e10": ["teacher.epochs=10"],
          "pilot_e10_m0": ["teacher.epochs=10", "teacher.margin=0"],
          "pilot_e10_lr0.03": ["teacher.epochs=10", "teacher.lr=0.03"],
          "pilot_e10_64px": ["teacher.epochs=10", *NATIVE],
          "pilot_e10_stride1": ["teacher.epochs=10", "teacher.stem_stride=1"]}
# pilots probed (k-NN and linear) against random weights at the same data settings: pilot -> data overrides
PROBED_PILOTS = {"pilot_e10_64px": NATIVE}


def decided_distill() -> str | None:
    """The lambda chosen on val (seed 0), once both candidates are in."""
    return steps_lib.decided(lambda: steps_lib.chosen_distill(DISTILL_CANDIDATES))


def chosen_distill() -> str:
    return decided_distill() or "distill"  # 1e-4, the paper's, until then


def rows() -> dict:
    """ROWS, with the second seed for the chosen lambda."""
    return {**ROWS, chosen_distill(): SEEDS}


def steps(data: str) -> list:
    base = f"{CONFIGS}/base.yaml"
    probe = ["--split", "val", "test", "--config", base]
    out = [Step("probe_random", ["linear-probe", data, "--random-init", "--out", str(probe_file("random")), *probe],
                probe_file("random")),
           Step(f"pretrain_{TEACHER}", ["pretrain", data, "--config", base, "--name", f"teacher_{TEACHER}"],
                steps_lib.teacher_file(TEACHER)),
           Step(f"probe_{TEACHER}", ["linear-probe", data, "--teacher", str(steps_lib.teacher_file(TEACHER)),
                                     "--out", str(probe_file(TEACHER)), *probe], probe_file(TEACHER))]
    out += [Step(f"pretrain_{pilot}", ["pretrain", data, *overrides, "--config", base, "--name", f"teacher_{pilot}"],
                 steps_lib.teacher_file(pilot)) for pilot, overrides in PILOTS.items()]
    for pilot, overrides in PROBED_PILOTS.items():
        random = f"random_{pilot}"
        out += [Step(f"probe_{random}", ["linear-probe", data, *overrides, "--random-init", "--out",
                                         str(probe_file(random)), *probe], probe_file(random)),
                Step(f"probe_{pilot}", ["linear-probe", data, *overrides, "--teacher", str(steps_lib.teacher_file(pilot)),
                                        "--out", str(probe_file(pilot)), *probe], probe_file(pilot))]
    for seed in range(max(SEEDS) + 1):
        for recipe, seeds in rows().items():
            if seed not in seeds:
                continue
            run = f"{recipe}_s{seed}"
            argv = ["distill", data, f"student.seed={seed}", "--config", f"{CONFIGS}/{RECIPES[recipe]}", "--name", run]
            if not recipe.startswith("supervised"):
                argv += ["--teacher", str(steps_lib.teacher_file(TEACHER))]
            out += [Step(run, argv, steps_lib.student_file(run)), steps_lib.evaluate(data, f"{run}_test", [run], "test")]
    return out


def table(all_steps: list) -> str:
    lib, fmt = steps_lib, steps_lib.fmt
    means, lines, seeds, chosen = {}, [], rows(), chosen_distill()
    probe = lib.load(probe_file(TEACHER)) or {}

    def student_row(label, recipe):
        lines.append(f"{lib.seeds_row(label, recipe, seeds[recipe], means)} {PAPER[recipe]} |")

    def gap(a, b):
        return None if means.get(a) is None or means.get(b) is None else means[a] - means[b]

    student_row("supervised from scratch", "supervised")
    lines.append(f"| phase 1 + linear probe | `base.yaml` | {'0' if probe else '-'} | {fmt(probe.get('val_top1'))} | "
                 f"{fmt(probe.get('test_top1'))} | {fmt(lib.wall_min(f'pretrain_{TEACHER}', f'probe_{TEACHER}'), '.1f')}"
                 f" | 34.5 |")
    student_row("phase 1 + full fine-tune", "finetune")
    for recipe in DISTILL_CANDIDATES:
        student_row(f"phase 1 + phase 2 (OFD, lambda {LAMBDAS[recipe]})", recipe)
    student_row("supervised from scratch, the CPU time of phase 1 + phase 2", "supervised_budget")
    recs = [r for r in (lib.load(lib.record_path(s)) for s in all_steps) if r]
    out = [BEGIN, "",
           f"Machine: {'; '.join(sorted({r['machine'] for r in recs})) or '-'}. Steps recorded: {len(recs)} of "
           f"{len(all_steps)}, {sum(r['wall_s'] for r in recs) / 3600:.2f} h of wall time in all.",
           f"Test = the official Tiny ImageNet validation split (10,000 images, centre crop){lib.EPOCHS_NOTE[0]} "
           f"Val = the disjoint 50 images per class of `val`{lib.EPOCHS_NOTE[1]} "
           "Multi-seed cells: **mean ± sample sd** (each seed). *min per seed*: wall "
           "minutes of the row's own training + test evaluation (a step resumed from its checkpoint in a later "
           "sitting: all its attempts).", "",
           "| row | config | seeds | val top-1 | test top-1 | min per seed | paper (ImageNet subset) |",
           "|---|---|---|---|---|---|---|", *lines, "",
           f"Lambda chosen on val (seed 0, 1e-4 vs 1e-5): **{LAMBDAS[chosen]}**"
           f"{'' if decided_distill() else ' (the default, until both have run)'}.",
           f"Phase 1 + phase 2 (lambda {LAMBDAS[chosen]}) minus supervised (test, seed means): "
           f"**{fmt(gap(chosen, 'supervised'), '+.2f')} points** (goal: >= +5); minus the budget-matched supervised "
           f"run: **{fmt(gap(chosen, 'supervised_budget'), '+.2f')} points**.", "",
           *probe_rows("random", TEACHER, "phase 1 (`base.yaml`)"), "",
           f"Teacher k-NN val by epoch (the pilot): {lib.knn_curve(TEACHER)}", "",
           "Pilots: 10 epochs of phase 1 (cosine over the 10), one change each; k-NN val by epoch "
           "(k = 200, t = 0.1, bank = train).", "",
           "| pilot | overrides of base.yaml | k-NN val by epoch | min |", "|---|---|---|---|",
           *(f"| `{pilot}` | {' '.join(overrides)} | {lib.knn_curve(pilot)} | "
             f"{fmt(lib.wall_min(f'pretrain_{pilot}'), '.1f')} |" for pilot, overrides in PILOTS.items()), "",
           *(line for pilot, overrides in PROBED_PILOTS.items() for line in (
               f"Probes of `{pilot}` and of random weights, both with {' '.join(overrides)}:", "",
               *probe_rows(f"random_{pilot}", pilot, f"`{pilot}` (10 epochs)"), "")),
           "Every command, in the order run:", "", "```", *lib.commands_block(all_steps), "```", "", END]
    return "\n".join(out)


PAPER = {"supervised": "27.9", "finetune": "39.4", "distill": "44.6", "distill_l1e-5": "-", "supervised_budget": "-"}
LAMBDAS = {"distill": "1e-4", "distill_l1e-5": "1e-5"}


def main(argv: list[str] | None = None) -> int:
    args = steps_lib.runner_args(argv, __doc__, RESULTS, "run just these steps (names as in runs/tinyimagenet_50/steps)",
                                 data_default=DATA)
    all_steps = steps(args.data)
    if not args.table_only:
        steps_lib.run_all(all_steps, set(args.only) if args.only else None)
    steps_lib.write_block(RESULTS, table(all_steps), BEGIN, END)
    return 0


if __name__ == "__main__":
    sys.exit(main())
