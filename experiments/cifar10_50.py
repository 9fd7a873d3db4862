"""The paper's ablation on CIFAR-10 with 50 labelled images per class -> docs/results.md.

    python experiments/cifar10_50.py                # run every row not yet done, then write the table
    python experiments/cifar10_50.py --table-only   # rewrite the table from the kept records only
    python experiments/cifar10_50.py --only pretrain_m0.4_k128 supervised_s0   # some steps

Every step is one `raypipe` command (pretrain, distill, linear-probe, evaluate) with a config
from experiments/configs/cifar10_50/. Its log goes to runs/cifar10_50/logs/STEP.log and a record
(command, exit code, wall time, machine) to steps/STEP.json; a step with a successful record is
not run again, so an interrupted reproduction resumes; an interrupted step resumes from its last
checkpoint, its wall time and log spanning all its attempts. Models stay in runs/ (not committed) unless
named in KEPT_MODELS; the step records and the small files the table reads (metrics, probes, eval
reports, configs) are kept in experiments/records/cifar10_50/, which is committed: the table and the
resume outlive the machine. A kept model is copied back to runs/ for the steps that read it; a
finished step whose model is gone runs again only if a step still to run needs it.
Protocol: every model trains on `train` (50/class); choices (which tricks are kept) are made on
`val`; `test` (10,000 images) gives the reported numbers only.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
CONFIGS = "experiments/configs/cifar10_50"
RUNS = Path("runs/cifar10_50")
RECORDS = Path("experiments/records/cifar10_50")  # committed copies of the small files of RUNS
KEPT = ("steps/*.json", "*/metrics.json", "*/metrics.csv", "*/probe.json", "*/config.yaml", "eval/*/report.json")
KEPT_MODELS: tuple[str, ...] = ()  # models of RUNS (globs) kept too: a later sitting's steps start from them
RESULTS = Path("docs/results.md")
SEEDS = (0, 1, 2)
# teacher name -> config: the phase-2 teacher (m = 0.4, K = 128, t = 0.1, no blur, 400 epochs: the
# teacher study's choice on val), then the margin ablation (m = 0 / 0.4 x K = 128 / 480, 40 epochs
# each: the CPU budget)
MAIN_TEACHER = "m0.4_k128_t0.1_e400"
ABLATION_TEACHERS = {f"m{m}_k{k}_e40": f"ablation_m{m}_k{k}.yaml" for m in ("0.4", "0") for k in (128, 480)}
# follow-up to the goal miss: the stride-1 stem (4x the compute) with the val-chosen m = 0
STRIDE1_TEACHER = "m0_k128_s1"
TEACHERS = {MAIN_TEACHER: "teacher.yaml", **ABLATION_TEACHERS, STRIDE1_TEACHER: "stride1_teacher.yaml"}
BEGIN, END = "<!-- results:begin (written by experiments/cifar10_50.py) -->", "<!-- results:end -->"
# test top-1 before issue 15's phase-1 fixes (docs/results.md, "Before the phase-1 fixes"; seed means):
# phase rows by recipe ("probe": the teacher's linear probe), margin teachers as (k-NN test, linear test)
BEFORE = {"supervised": 41.27, "probe": 28.71, "finetune": 42.08, "distill": 39.26, "distill_l1e-4": 42.20,
          "m0.4_k128_e40": (29.53, 28.22), "m0.4_k480_e40": (28.24, 25.20), "m0_k128_e40": (30.65, 27.69),
          "m0_k480_e40": (28.93, 26.33)}


@dataclass
class Step:
    name: str
    argv: list[str]  # after `raypipe`
    output: Path     # exists once the step has succeeded


def teacher_file(name: str) -> Path:
    return RUNS / f"teacher_{name}" / "teacher.pt"


def student_file(run: str) -> Path:
    return RUNS / run / "student.pt"


def probe_file(teacher: str) -> Path:
    return RUNS / f"teacher_{teacher}" / "probe.json"


def random_probe(data: str) -> Step:
    """k-NN and linear probe of random weights: the baseline of every teacher's gain."""
    probe = probe_file("random")
    return Step("probe_random", ["linear-probe", data, "--random-init", "--split", "val", "test", "--out", str(probe),
                                 "--config", f"{CONFIGS}/base.yaml"], probe)


def pretrain(data: str, name: str) -> list[Step]:
    cfg = f"{CONFIGS}/{TEACHERS[name]}"
    probe = probe_file(name)
    return [Step(f"pretrain_{name}", ["pretrain", data, "--config", cfg, "--name", f"teacher_{name}"],
                 teacher_file(name)),
            Step(f"probe_{name}", ["linear-probe", data, "--teacher", str(teacher_file(name)), "--split", "val",
                                   "test", "--out", str(probe), "--config", cfg], probe)]


# recipe -> its config file (in CONFIGS); "tricks" = the val-chosen distillation recipe + TRICKS
RECIPES = {"supervised": "supervised.yaml", "finetune": "finetune.yaml", "distill": "distill.yaml",
           "distill_l1e-4": "distill_l1e-4.yaml", "supervised_budget": "supervised_budget.yaml",
           "s1_supervised": "stride1_supervised.yaml", "s1_distill": "stride1_distill.yaml",
           "s1_distill_l2.5e-5": "stride1_distill_l2.5e-5.yaml"}
SUPERVISED = ("supervised", "supervised_budget", "s1_supervised")  # rows without a teacher
DISTILL_CANDIDATES = ("distill", "distill_l1e-4")  # lambda 1e-3 vs 1e-4, picked on val (seed 0)
S1_DISTILL_CANDIDATES = ("s1_distill", "s1_distill_l2.5e-5")  # the same choice for the stride-1 stem
TRICKS = ["student.autoaugment=cifar10", "student.label_smoothing=0.1"]


class NotDecided(Exception):
    """A val decision needs runs that have not finished yet."""


def recipe_args(recipe: str) -> tuple[str, list[str]]:
    if recipe == "tricks":
        return RECIPES[chosen_distill()], TRICKS
    return RECIPES[recipe], []


def student(data: str, recipe: str, seed: int, teacher: str = MAIN_TEACHER) -> list[Step]:
    """Train one student row and evaluate it on test."""
    run = f"{recipe}_s{seed}"
    config, overrides = recipe_args(recipe)
    argv = ["distill", data, f"student.seed={seed}", *overrides, "--config", f"{CONFIGS}/{config}", "--name", run]
    if recipe not in SUPERVISED:  # every other row starts from the teacher
        argv += ["--teacher", str(teacher_file(teacher))]
    return [Step(run, argv, student_file(run)), evaluate(data, f"{run}_test", [run], "test")]


def evaluate(data: str, name: str, runs: list[str], split: str, ten_crop: bool = False) -> Step:
    out = RUNS / "eval" / name
    argv = ["evaluate", data, "--split", split, "--out", str(out), "--config", f"{CONFIGS}/base.yaml"]
    for run in runs:
        argv += ["--model", str(student_file(run))]
    return Step(f"eval_{name}", argv + (["--ten-crop"] if ten_crop else []), out / "report.json")


def stage_rows(data: str) -> list[Step]:
    """The teacher and one seed of every phase row (the distillation candidates included)."""
    steps = [random_probe(data), *pretrain(data, MAIN_TEACHER), *student(data, "supervised", 0)]
    for recipe in DISTILL_CANDIDATES:
        steps += student(data, recipe, 0)
    return steps + student(data, "finetune", 0)


def stage_seeds(data: str) -> list[Step]:
    """Needs the lambda decision: tricks on top of it, the other seeds, then the margin ablation."""
    chosen = chosen_distill()
    steps = student(data, "tricks", 0)
    for seed in SEEDS[1:]:
        steps += student(data, "supervised", seed) + student(data, chosen, seed)
    for name in ABLATION_TEACHERS:
        steps += pretrain(data, name)
    return steps


def stage_ten_crop(data: str) -> list[Step]:
    """Needs the tricks decision: 10-crop of the recipe val kept (seed 0)."""
    recipe = chain_recipe()
    return [evaluate(data, f"{recipe}_s0_10crop_{split}", [f"{recipe}_s0"], split, ten_crop=True)
            for split in ("val", "test")]


def stage_ensemble(data: str) -> list[Step]:
    """Needs the 10-crop decision: that model + the chosen distillation recipe's seed 1 (two
    different models, no extra training), with the views val kept."""
    recipe = chain_recipe()
    members = [f"{recipe}_s0", f"{chosen_distill()}_s1"]
    ten_crop = ten_crop_helps(recipe)
    return [evaluate(data, f"ensemble_{split}", members, split, ten_crop=ten_crop) for split in ("val", "test")]


def stage_followups(data: str) -> list[Step]:
    """After the goal miss (seed 0 each): the stride-1 stem for phase 1 + phase 2 (both stride-1
    lambdas, the table picks on val) and its own supervised baseline, and the supervised baseline
    given phase 1 + phase 2's CPU time."""
    steps = pretrain(data, STRIDE1_TEACHER) + student(data, "s1_distill", 0, teacher=STRIDE1_TEACHER)
    steps += student(data, "s1_supervised", 0) + student(data, "supervised_budget", 0)
    return steps + student(data, "s1_distill_l2.5e-5", 0, teacher=STRIDE1_TEACHER)


FOLLOWUP_SEEDS = (0, 1)


def stage_followup_seeds(data: str) -> list[Step]:
    """Needs the stride-1 lambda decision: a second seed of its gap's two rows."""
    chosen = chosen_distill(S1_DISTILL_CANDIDATES)
    steps = []
    for seed in FOLLOWUP_SEEDS[1:]:
        steps += student(data, "s1_supervised", seed) + student(data, chosen, seed, teacher=STRIDE1_TEACHER)
    return steps


STAGES = (stage_rows, stage_seeds, stage_ten_crop, stage_ensemble, stage_followups, stage_followup_seeds)


def known_steps(data: str) -> list[Step]:
    """Every step whose decisions can be made from the runs so far."""
    steps = []
    for stage in STAGES:
        try:
            steps += stage(data)
        except NotDecided:
            break
    return steps


# ---- running ----------------------------------------------------------------------------------
def machine() -> str:
    import torch
    accel = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "CPU only"
    return f"{platform.machine()}, {os.cpu_count()} CPU cores, {accel}, torch {torch.__version__}"


def record_path(step: Step) -> Path:
    return RUNS / "steps" / f"{step.name}.json"


def succeeded(step: Step) -> bool:
    """Succeeded with this very command (a changed command, e.g. after a new val decision, reruns)."""
    rec = load(record_path(step))
    return bool(rec) and rec["rc"] == 0 and rec["argv"] == ["raypipe", *step.argv]


def is_done(step: Step, later: list[Step] = ()) -> bool:
    """Succeeded, and its output is here (kept, or a model in RUNS) or no step still to run needs it."""
    if not succeeded(step):
        return False
    if step.output.exists() or kept(step.output).exists():
        return True
    return not any(str(step.output) in s.argv and not succeeded(s) for s in later)


def keep_records() -> None:
    """Copy the small files of RUNS (KEPT) and the KEPT_MODELS to RECORDS."""
    for pattern in (*KEPT, *KEPT_MODELS):
        for path in RUNS.glob(pattern):
            target = kept(path)
            if not same_file(path, target):  # a kept model is not copied again after every step
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(path, target)


def same_file(a: Path, b: Path) -> bool:
    """Same size and modification time (copies are made with shutil.copy2, which keeps it)."""
    if not b.is_file():
        return False
    sa, sb = a.stat(), b.stat()
    return (sa.st_size, sa.st_mtime) == (sb.st_size, sb.st_mtime)


def restore_inputs(step: Step) -> None:
    """Files of RUNS the step reads that only their kept copy holds (a new machine) go back to RUNS."""
    for path in map(Path, step.argv):
        if path.is_relative_to(RUNS) and not path.exists() and kept(path).is_file():
            path.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(kept(path), path)


def attempt_path(step: Step) -> Path:
    """The step's unfinished attempt (not kept: its checkpoints, which a resume needs, are not either)."""
    return RUNS / "steps" / f"{step.name}.attempt"


def earlier_attempts(step: Step, log: Path) -> tuple[int, float]:
    """(count, wall seconds) of this very command's unfinished attempts (interrupted or failed; a rerun
    resumes from their checkpoints), each timed from its start to its log's last line."""
    path = attempt_path(step)
    attempt = json.loads(path.read_text()) if path.is_file() else None
    if not attempt or attempt["argv"] != step.argv or not log.is_file():
        return 0, 0.0
    return attempt["count"], attempt["earlier_wall_s"] + max(0.0, log.stat().st_mtime - attempt["started_unix"])


def run_step(step: Step) -> None:
    restore_inputs(step)
    log = RUNS / "logs" / f"{step.name}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    record_path(step).parent.mkdir(parents=True, exist_ok=True)
    earlier, earlier_s = earlier_attempts(step, log)
    resumed = f", resuming after {earlier} unfinished attempt(s), {earlier_s / 60:.1f} min" if earlier else ""
    print(f"[{step.name}] raypipe {' '.join(step.argv)}  (log: {log}{resumed})", flush=True)
    started = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    t0 = time.time()
    attempt_path(step).write_text(json.dumps({"argv": step.argv, "count": earlier + 1, "started_unix": t0,
                                              "earlier_wall_s": earlier_s}))
    with log.open("a" if earlier else "w") as out:  # a resumed step's log keeps the earlier attempts
        out.write(f"==== {started}: attempt {earlier + 1}\n")
        out.flush()
        rc = subprocess.run([sys.executable, "-m", "raypipe", *step.argv], stdout=out,
                            stderr=subprocess.STDOUT).returncode
    rec = {"name": step.name, "argv": ["raypipe", *step.argv], "rc": rc,
           "wall_s": round(earlier_s + time.time() - t0, 1), "attempts": earlier + 1, "started": started,
           "machine": machine()}
    record_path(step).write_text(json.dumps(rec, indent=2))
    keep_records()
    if rc != 0:
        raise SystemExit(f"[{step.name}] failed with exit code {rc}; see {log}")
    attempt_path(step).unlink()
    print(f"[{step.name}] done in {rec['wall_s'] / 60:.1f} min", flush=True)


def run_all(steps: list[Step], only: set[str] | None) -> None:
    for i, step in enumerate(steps):
        if (only is None or step.name in only) and not is_done(step, steps[i + 1:]):
            run_step(step)


# ---- reading the records --------------------------------------------------------------------------
def kept(path: Path) -> Path:
    """The committed copy of a file of RUNS."""
    return RECORDS / Path(path).relative_to(RUNS)


def load(path: Path) -> dict | None:
    """A JSON file of RUNS, read from its kept copy."""
    path = kept(path)
    return json.loads(path.read_text()) if path.is_file() else None


# which epoch a student row reports, as its two halves for a table's caption (test; val)
EPOCHS_NOTE = ("; a student is tested as exported: its epoch with the best val.",
               "; a student's val cell (and the runner's choices) is its final epoch's.")


def student_val(run: str) -> float | None:
    m = load(RUNS / run / "metrics.json")
    return m["val_top1"] if m else None


def knn_curve(teacher: str) -> str:
    """The k-NN monitor of ``teacher_<teacher>`` by epoch: ``10:25.2 20:25.0 ...`` (or -)."""
    import pandas as pd

    path = kept(RUNS / f"teacher_{teacher}" / "metrics.csv")
    if not path.is_file():
        return "-"
    df = pd.read_csv(path).dropna(subset=["knn_top1"])
    return " ".join(f"{int(e) + 1}:{v:.1f}" for e, v in zip(df["epoch"], df["knn_top1"]))


def eval_top1(name: str) -> float | None:
    r = load(RUNS / "eval" / name / "report.json")
    return r["top1"] if r else None


def test_sizes() -> str:
    sizes = sorted({json.loads(r.read_text())["n_images"] for r in (RECORDS / "eval").glob("*_test/report.json")})
    return ", ".join(f"{n:,}" for n in sizes)


def wall_min(*steps: str) -> float | None:
    recs = [load(RUNS / "steps" / f"{s}.json") for s in steps]
    return sum(r["wall_s"] for r in recs) / 60 if all(recs) else None


def chosen_distill(candidates: tuple[str, ...] = DISTILL_CANDIDATES) -> str:
    """The distillation recipe (lambda) with the best val top-1 on seed 0."""
    vals = {r: student_val(f"{r}_s0") for r in candidates}
    if None in vals.values():
        raise NotDecided("the lambda decision needs " + ", ".join(f"{r}_s0" for r in candidates))
    return max(candidates, key=lambda r: vals[r])


def chain_recipe() -> str:
    """AutoAugment + label smoothing stay only if they beat the chosen distillation on val (seed 0)."""
    tricks, plain = student_val("tricks_s0"), student_val(f"{chosen_distill()}_s0")
    if tricks is None:
        raise NotDecided("the tricks decision needs tricks_s0")
    return "tricks" if tricks > plain else chosen_distill()


def ten_crop_helps(recipe: str) -> bool:
    crop10 = eval_top1(f"{recipe}_s0_10crop_val")
    if crop10 is None:
        raise NotDecided(f"the 10-crop decision needs eval_{recipe}_s0_10crop_val")
    return crop10 > student_val(f"{recipe}_s0")


# ---- the table ------------------------------------------------------------------------------------
def fmt(x: float | None, spec: str = ".2f") -> str:
    return "-" if x is None else format(x, spec)


def seeds_cell(values: list[float | None]) -> str:
    vals = [v for v in values if v is not None]
    if not vals:
        return "-"
    if len(vals) == 1:
        return f"{vals[0]:.2f}"
    return (f"**{statistics.mean(vals):.2f} ± {statistics.stdev(vals):.2f}** "
            f"({', '.join(f'{v:.2f}' for v in vals)})")


def mean_or_none(values: list[float | None]) -> float | None:
    vals = [v for v in values if v is not None]
    return statistics.mean(vals) if vals else None


def decided(fn) -> str | None:
    try:
        return fn()
    except NotDecided:
        return None


def config_cell(recipe: str) -> str:
    if recipe == "tricks":
        chosen = decided(chosen_distill)
        return f"`{RECIPES[chosen]}` + `{' '.join(TRICKS)}`" if chosen else "-"
    return f"`{RECIPES[recipe]}`"


def kept_cell(better: bool | None) -> str:
    return "-" if better is None else ("kept" if better else "dropped")


def seeds_row(label: str, recipe: str, seeds: tuple[int, ...], means: dict) -> str:
    """`| label | config | seeds done | val | test | min per seed |` of a student row; its test mean
    goes to means[recipe]."""
    runs = [f"{recipe}_s{s}" for s in seeds]
    test = [eval_top1(f"{r}_test") for r in runs]
    done = [s for s, t in zip(seeds, test) if t is not None]
    means[recipe] = mean_or_none(test)
    walls = [wall_min(f"{recipe}_s{s}", f"eval_{recipe}_s{s}_test") for s in done]
    return (f"| {label} | {config_cell(recipe)} | {','.join(map(str, done)) or '-'} | "
            f"{seeds_cell([student_val(r) for r in runs])} | {seeds_cell(test)} | {fmt(mean_or_none(walls), '.1f')} |")


def phase_rows() -> tuple[list[str], dict]:
    rows, means = [], {}

    def multi(label, recipe, paper, seeds=SEEDS):
        rows.append(f"{seeds_row(label, recipe, seeds, means)} {fmt(BEFORE.get(recipe))} | {paper} |")

    multi("supervised from scratch", "supervised", "27.9")
    probe = load(probe_file(MAIN_TEACHER)) or {}
    rows.append(f"| phase 1 + linear probe | `{TEACHERS[MAIN_TEACHER]}` | {'0' if probe else '-'} | "
                f"{fmt(probe.get('val_top1'))} | "
                f"{fmt(probe.get('test_top1'))} | {fmt(wall_min(f'pretrain_{MAIN_TEACHER}', f'probe_{MAIN_TEACHER}'), '.1f')}"
                f" | {fmt(BEFORE['probe'])} | 34.5 |")
    multi("phase 1 + full fine-tune", "finetune", "39.4", seeds=(0,))
    chosen = decided(chosen_distill)
    for recipe in DISTILL_CANDIDATES:
        lam = "lambda 1e-4" if recipe.endswith("1e-4") else "lambda 1e-3"
        if recipe == chosen:
            multi(f"phase 1 + phase 2 (OFD, {lam}; chosen on val)", recipe, "44.6")
            means["distill"] = means[recipe]
        else:
            multi(f"phase 1 + phase 2 (OFD, {lam})", recipe, "-", seeds=(0,))
    return rows, means


def trick_rows() -> list[str]:
    chosen = decided(chosen_distill)
    if chosen is None:
        return []
    plain, tricks = student_val(f"{chosen}_s0"), student_val("tricks_s0")
    kept = None if tricks is None else tricks > plain
    rows = [f"| phase 1 + phase 2 | {config_cell(chosen)} (seed 0) | {fmt(plain)} | "
            f"{fmt(eval_top1(f'{chosen}_s0_test'))} | base | 47.2 |",
            f"| + AutoAugment (CIFAR-10 policy) + label smoothing 0.1 | {config_cell('tricks')} (seed 0) | "
            f"{fmt(tricks)} | {fmt(eval_top1('tricks_s0_test'))} | {kept_cell(kept)} | 64.2 -> 65.7 |"]
    recipe = decided(chain_recipe)
    if recipe is None:
        return rows
    best_val = student_val(f"{recipe}_s0")
    crop_val, crop_test = eval_top1(f"{recipe}_s0_10crop_val"), eval_top1(f"{recipe}_s0_10crop_test")
    crop_kept = None if crop_val is None else crop_val > best_val
    rows.append(f"| + 10-crop test | {config_cell(recipe)} (seed 0), `--ten-crop` | {fmt(crop_val)} | "
                f"{fmt(crop_test)} | {kept_cell(crop_kept)} | 65.7 -> 66.2 |")
    if crop_kept:
        best_val = crop_val
    ens_val, ens_test = eval_top1("ensemble_val"), eval_top1("ensemble_test")
    rep = load(RUNS / "eval" / "ensemble_val" / "report.json")
    rows.append(f"| + ensemble of two models ({rep['views'] if rep else '-'}) | {config_cell(recipe)} seed 0 + "
                f"{config_cell(decided(chosen_distill))} seed 1 | "
                f"{fmt(ens_val)} | {fmt(ens_test)} | {kept_cell(None if ens_val is None else ens_val > best_val)} "
                f"| 66.2 -> 68.8 |")
    return rows


def gain(probe: dict, random: dict, key: str) -> float | None:
    """A probe's score minus random weights' (None while either is missing)."""
    return probe[key] - random[key] if key in probe and key in random else None


def probe_rows(random_name: str, name: str, label: str) -> list[str]:
    """k-NN and linear probe of ``teacher_<name>`` against random weights, and the gain."""
    keys = ("val_knn_top1", "test_knn_top1", "val_top1", "test_top1")
    probe, random = load(probe_file(name)) or {}, load(probe_file(random_name)) or {}
    return ["| teacher | k-NN val | k-NN test | linear val | linear test |", "|---|---|---|---|---|",
            f"| random weights | {' | '.join(fmt(random.get(k)) for k in keys)} |",
            f"| {label} | {' | '.join(fmt(probe.get(k)) for k in keys)} |",
            f"| gain over random weights | {' | '.join(fmt(gain(probe, random, k), '+.2f') for k in keys)} |"]


def margin_rows() -> list[str]:
    rows, random = [], load(probe_file("random")) or {}
    for name, cfg in ABLATION_TEACHERS.items():
        metrics = load(RUNS / f"teacher_{name}" / "metrics.json") or {}
        probe = load(probe_file(name)) or {}
        m, k = name[1:].split("_")[0], name.split("_k")[1].split("_")[0]
        knn_before, linear_before = BEFORE[name]
        rows.append(f"| {m} | {k} | `{cfg}` | {fmt(metrics.get('knn_top1'))} | {fmt(probe.get('val_knn_top1'))} | "
                    f"{fmt(probe.get('test_knn_top1'))} | {fmt(gain(probe, random, 'test_knn_top1'), '+.2f')} | "
                    f"{fmt(probe.get('val_top1'))} | {fmt(probe.get('test_top1'))} | "
                    f"{fmt(knn_before)} / {fmt(linear_before)} | {fmt(wall_min(f'pretrain_{name}'), '.1f')} |")
    return rows


def followup_rows(means: dict) -> tuple[list[str], list[str]]:
    """The stride-1 rows and the budget-matched baseline, and the gaps they give."""
    chosen = decided(lambda: chosen_distill(S1_DISTILL_CANDIDATES))

    def row(label, recipe):
        return seeds_row(label, recipe, FOLLOWUP_SEEDS if recipe in ("s1_supervised", chosen) else (0,), means)

    name = STRIDE1_TEACHER
    probe = load(probe_file(name)) or {}
    epochs = yaml.safe_load((REPO / CONFIGS / RECIPES["supervised_budget"]).read_text())["student"]["epochs"]
    rows = [row(f"supervised from scratch, {epochs} epochs (the CPU time of phase 1 + phase 2)", "supervised_budget"),
            row("stride 1: supervised from scratch", "s1_supervised"),
            f"| stride 1: phase 1 (m = 0, K = 128) + linear probe (k-NN val {fmt(probe.get('val_knn_top1'))}, "
            f"test {fmt(probe.get('test_knn_top1'))}) | `{TEACHERS[name]}` | {'0' if probe else '-'} | "
            f"{fmt(probe.get('val_top1'))} | "
            f"{fmt(probe.get('test_top1'))} | {fmt(wall_min(f'pretrain_{name}', f'probe_{name}'), '.1f')} |"]
    for recipe in S1_DISTILL_CANDIDATES:
        lam = recipe.rsplit("_l", 1)[1] if "_l" in recipe else "1e-4"
        rows.append(row(f"stride 1: phase 1 + phase 2 (OFD, lambda {lam}"
                        f"{'; chosen on val' if recipe == chosen else ''})", recipe))
    if chosen:
        means["s1_chosen"] = means[chosen]

    def gap(a, b):
        return None if means.get(a) is None or means.get(b) is None else means[a] - means[b]

    gaps = [f"Phase 1 + phase 2 (stride 2, seed mean) minus the budget-matched supervised baseline: "
            f"**{fmt(gap('distill', 'supervised_budget'), '+.2f')} points**; with the stride-1 stem, phase 1 + "
            f"phase 2 (lambda chosen on val) minus supervised: "
            f"**{fmt(gap('s1_chosen', 's1_supervised'), '+.2f')} points** (seed means)."]
    return rows, gaps


def commands_block(steps: list[Step]) -> list[str]:
    lines = []
    for step in steps:
        rec = load(record_path(step))
        if rec:
            lines.append(f"{' '.join(rec['argv'])}   # {rec['name']}: {rec['wall_s'] / 60:.1f} min, "
                         f"exit {rec['rc']}")
    return lines


def table(steps: list[Step]) -> str:
    phase, means = phase_rows()
    followups, followup_gaps = followup_rows(means)
    gap = None if means.get("distill") is None or means.get("supervised") is None else \
        means["distill"] - means["supervised"]
    recs = [load(record_path(s)) for s in steps]
    recs = [r for r in recs if r]
    machines = sorted({r["machine"] for r in recs})
    total = sum(r["wall_s"] for r in recs) / 3600
    out = [BEGIN, "",
           f"Machine: {'; '.join(machines) or '-'}. Steps recorded: {len(recs)}, {total:.2f} h of wall time in all.",
           f"Test = the CIFAR-10 test set (images per test report: {test_sizes() or '-'}; centre crop unless "
           f"stated){EPOCHS_NOTE[0]} Val = the 500 held-out `val` images{EPOCHS_NOTE[1]} Multi-seed cells: "
           "**mean ± sample sd** (each seed). *min per seed*: wall minutes of the row's own training + "
           "test evaluation; rows that start from the teacher also need its pre-training (in the "
           "linear-probe row's minutes, with the probe).", "",
           "### Phase ablation (paper: ResNet-50, ImageNet subset with 50 images/class, VIPriors val)", "",
           "| row | config | seeds | val top-1 | test top-1 | min per seed | test top-1 before the fixes | paper |",
           "|---|---|---|---|---|---|---|---|", *phase, "",
           f"Phase 1 + phase 2 minus supervised (test, seed means): **{fmt(gap, '+.2f')} points** "
           f"(goal: >= +5; before the fixes +0.93).", "",
           f"The phase-2 teacher (`{TEACHERS[MAIN_TEACHER]}`) against random weights (k-NN k = 50, t = 0.1, bank = "
           "train; linear: MoCo's protocol, lr chosen on val):", "",
           *probe_rows("random", MAIN_TEACHER, f"phase 1 (`{TEACHERS[MAIN_TEACHER]}`)"), "",
           f"Its k-NN val by epoch (monitor): {knn_curve(MAIN_TEACHER)}", "",
           "### Bag of tricks, each row on top of the one above if val kept it (paper: VIPriors test)", "",
           "| configuration | config | val top-1 | test top-1 | on val | paper |", "|---|---|---|---|---|---|",
           *trick_rows(), "",
           "### Follow-ups to the goal miss (test = 10,000 images)", "",
           "| row | config | seeds | val top-1 | test top-1 | min per seed |", "|---|---|---|---|---|---|",
           *followups, "",
           *followup_gaps, "",
           "### Margin ablation (teachers of 40 epochs; k-NN k=50, t=0.1 and linear probe, both fit on train)", "",
           "| m | K | config | k-NN val (monitor, last epoch) | k-NN val (exported epoch) | k-NN test | "
           "k-NN test gain over random | linear val | linear test | before the fixes: k-NN / linear test | min |",
           "|---|---|---|---|---|---|---|---|---|---|---|", *margin_rows(), "",
           "### Every command, in the order run", "", "```", *commands_block(steps), "```", "", END]
    return "\n".join(out)


def commands(block: str) -> set[str]:
    """The `raypipe ...` command lines of a generated block (without their ``   # ...`` notes)."""
    return {line.split("   #")[0].strip() for line in block.splitlines() if line.startswith("raypipe ")}


def write_block(path: Path, block: str, begin: str = BEGIN, end: str = END, title: str = "Results") -> None:
    """Replace the generated block (``begin`` ... ``end``, markers included in ``block``) of ``path``;
    the hand-written text around it stays."""
    doc = path.read_text() if path.is_file() else f"# {title}\n\n{begin}\n{end}\n"
    if begin not in doc or end not in doc:
        raise SystemExit(f"{path} lost its {begin!r} / {end!r} markers; restore them to regenerate")
    head, rest = doc.split(begin, 1)
    old, tail = rest.split(end, 1)
    dropped = commands(old) - commands(block)
    if dropped:
        raise SystemExit(f"not rewriting {path}: the new block would drop {len(dropped)} recorded command(s), e.g. "
                         f"{sorted(dropped)[0]!r}, whose records are missing from {RECORDS}; restore them (git) or "
                         "move the old block out of the markers by hand")
    path.write_text(head + block + tail)
    print(f"wrote {path}", flush=True)


def write_table(steps: list[Step]) -> None:
    write_block(RESULTS, table(steps))


def runner_args(argv: list[str] | None, description: str, doc: Path, only_help: str,
                data_default: str = "../shared/data/cifar10-50") -> argparse.Namespace:
    """The command line every runner of this folder shares; checks the data, moves to the repo."""
    p = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default=data_default, help=f"the {Path(data_default).name} folder")
    p.add_argument("--table-only", action="store_true", help=f"only rewrite {doc} from the kept records")
    p.add_argument("--only", nargs="+", help=only_help)
    args = p.parse_args(argv)
    os.chdir(REPO)
    if not args.table_only and not Path(args.data, "train").is_dir():
        raise SystemExit(f"{args.data}/train not found: pass --data PATH/TO/{Path(data_default).name}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = runner_args(argv, __doc__, RESULTS, "run just these steps (names as in runs/cifar10_50/steps)")
    if not args.table_only:
        only = set(args.only) if args.only else None
        for stage in STAGES:
            try:
                run_all(stage(args.data), only)
            except NotDecided as exc:  # only with --only: a later stage waits for its runs
                print(f"stopping before {stage.__name__}: {exc}", flush=True)
                break
    steps = known_steps(args.data)
    write_table(steps)
    return 0


if __name__ == "__main__":
    sys.exit(main())
