"""The step engine the experiment runners share (cifar10_50.py, tinyimagenet_50.py, teacher_study.py).

A runner is a list of Steps, each one `raypipe` command. A `Runner` holds the runner's places
(``runs``: its run folders, not committed; ``records``: the committed copies of their small files;
``configs``; ``results``: the doc its table goes to) and runs, skips and records the steps there:
- Its log goes to runs/logs/STEP.log and a record (command, exit code, wall time, machine) to
  runs/steps/STEP.json; a step with a successful record (kept in records) is not run again, so an
  interrupted reproduction resumes; an interrupted step resumes from its last checkpoint, its wall time
  and log spanning all its attempts.
- After every step the record and the small files the tables read (KEPT) are copied to records,
  which is committed: the tables and the resume outlive the machine. An eval report keeps only
  REPORT_FIELDS there (its per-class and confusion data stay in runs).
- Models are never kept (.gitignore keeps model files out of experiments/records): a finished step
  whose model is gone from runs (a new machine) runs again, re-making it, before a step still to run
  that reads it; with ``--only``, unless it is among the steps asked for, the run stops and names it.
  Its record is then the re-made run's, and every step that read the earlier make (an eval of a re-made
  student, a student of a re-made teacher) is stale: it is not done until it runs again, and the
  command list of a table marks it until then.
- A step is identified by its command, and a pretrain or distill step also by the config it resolves to:
  the run's own config.yaml (kept) is what ran. A config file edited since (the same command now
  resolving to other values) makes the step stale, named with the keys that changed; a command
  rewritten without changing what it resolves to (another config file or overrides giving the same
  values, the same name, data and other options) is the same run and stays done.
The table helpers (cells, rows read from the records, the generated block of a doc) are here too.
Places are relative to the repository (``runner_args`` moves there).
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
from typing import ClassVar, Iterator

REPO = Path(__file__).resolve().parents[1]
# the small files of runs that records keeps (globs, relative to runs)
KEPT = ("steps/*.json", "*/metrics.json", "*/metrics.csv", "*/probe.json", "*/config.yaml", "eval/*/report.json")
# what a kept eval report holds: what the tables read (top1, views, n_images) and its summary, not the
# per-class accuracies and confusion matrix (~360 KB at 200 classes), which stay in runs
REPORT_FIELDS = ("split", "models", "weights", "views", "average", "skipped_images", "n_images", "top1", "top5",
                 "submission")
# which epoch a student row reports, as its two halves for a table's caption (test; val)
EPOCHS_NOTE = ("; a student is tested as exported: its epoch with the best val.",
               "; a student's val cell (and the runner's choices) is its final epoch's.")


# commands that write the config they resolved to (runs/<--name>/config.yaml), and its keys that name
# places rather than what is trained (set from the command's own arguments)
RUN_COMMANDS = ("pretrain", "distill")
PLACE_KEYS = ("name", "output_dir", "data.root")


def split_argv(argv: list[str]) -> tuple[list[str], list[str], dict[str, str]]:
    """A step's argv (after `raypipe`) as (command and data, key=value overrides, options): overrides come
    before the first option, and every option of a runner's step takes one value."""
    first = next((i for i, a in enumerate(argv) if a.startswith("--")), len(argv))
    opts = argv[first:]
    return argv[:2], argv[2:first], dict(zip(opts[::2], opts[1::2]))


def flat_config(cfg: dict, prefix: str = "") -> dict:
    """A config's dotted keys -> values, without PLACE_KEYS."""
    out = {}
    for key, value in cfg.items():
        if isinstance(value, dict):
            out.update(flat_config(value, f"{prefix}{key}."))
        elif f"{prefix}{key}" not in PLACE_KEYS:
            out[f"{prefix}{key}"] = value
    return out


@dataclass
class Step:
    name: str
    argv: list[str]  # after `raypipe`
    output: Path     # exists once the step has succeeded


class NotDecided(Exception):
    """A val decision needs runs that have not finished yet."""


def machine() -> str:
    import torch
    accel = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "CPU only"
    return f"{platform.machine()}, {os.cpu_count()} CPU cores, {accel}, torch {torch.__version__}"


def trimmed_report(path: Path) -> str:
    """An eval report as records keeps it (REPORT_FIELDS; numbers unchanged)."""
    report = json.loads(Path(path).read_text())
    return json.dumps({k: v for k, v in report.items() if k in REPORT_FIELDS}, indent=2)


# ---- table cells ------------------------------------------------------------------------------------
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


def kept_cell(better: bool | None) -> str:
    return "-" if better is None else ("kept" if better else "dropped")


def gain(probe: dict, random: dict, key: str) -> float | None:
    """A probe's score minus random weights' (None while either is missing)."""
    return probe[key] - random[key] if key in probe and key in random else None


def command_lines(block: str) -> list[tuple[str, str | None]]:
    """(command, step name or None) of a generated block's command lines (``raypipe ...   # NAME: 3.0 min, exit 0``)."""
    return [(line.split("   #")[0].strip(), line.split("   # ", 1)[1].split(":", 1)[0] if "   # " in line else None)
            for line in block.splitlines() if line.startswith("raypipe ")]


def dropped_commands(old: str, new: str) -> list[str]:
    """The recorded commands of block ``old`` that block ``new`` lacks, by command and by step: a step that
    ran again with another command (its record replaced) is not dropped; one whose record is missing is."""
    lines = command_lines(new)
    commands, names = {c for c, _ in lines}, {n for _, n in lines if n}
    return sorted({c for c, n in command_lines(old) if c not in commands and n not in names})


def split_block(doc: str, begin: str, end: str) -> tuple[str, str, str] | None:
    """``doc`` as (text before ``begin``, the block from ``begin`` to ``end`` inclusive, text after it), or
    None where either marker is missing."""
    if begin not in doc or end not in doc.split(begin, 1)[1]:
        return None
    head, rest = doc.split(begin, 1)
    old, tail = rest.split(end, 1)
    return head, begin + old + end, tail


def runner_args(argv: list[str] | None, description: str, doc: Path, only_help: str,
                data_default: str = "../shared/data/cifar10-50") -> argparse.Namespace:
    """The command line every runner shares; checks the data, moves to the repository."""
    p = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default=data_default, help=f"the {Path(data_default).name} folder")
    p.add_argument("--table-only", action="store_true", help=f"only rewrite {doc} from the kept records")
    p.add_argument("--only", nargs="+", help=only_help)
    args = p.parse_args(argv)
    os.chdir(REPO)
    if not args.table_only and not Path(args.data, "train").is_dir():
        raise SystemExit(f"{args.data}/train not found: pass --data PATH/TO/{Path(data_default).name}")
    return args


class Runner:
    """One runner's places and the machinery of its steps; subclasses add the steps and the table."""
    NAME: ClassVar[str] = ""           # its folders: runs/NAME, experiments/records/NAME, experiments/configs/NAME
    RESULTS: ClassVar[Path] = Path("docs/results.md")   # the doc its table goes to, between BEGIN and END
    BEGIN: ClassVar[str] = "<!-- results:begin (written by experiments/cifar10_50.py) -->"
    END: ClassVar[str] = "<!-- results:end -->"
    TITLE: ClassVar[str] = "Results"   # of a new results doc
    DATA: ClassVar[str] = "../shared/data/cifar10-50"   # the data its steps' commands name (--data's default)
    RECIPES: ClassVar[dict[str, str]] = {}               # student recipe -> its config file (in configs)
    DISTILL_CANDIDATES: ClassVar[tuple[str, ...]] = ()  # recipes whose lambda is chosen on val (seed 0)

    def __init__(self, runs: Path | None = None, records: Path | None = None, results: Path | None = None):
        """Places relative to the repository; by default the runner's own (tests point them elsewhere)."""
        self.runs = Path(runs or Path("runs") / self.NAME)  # run folders (models, logs, checkpoints): not committed
        self.records = Path(records or Path("experiments/records") / self.NAME)  # committed copies of its small files
        self.results = Path(results or self.RESULTS)
        self.configs = f"experiments/configs/{self.NAME}"

    # ---- where a step's files go --------------------------------------------------------------
    def teacher_file(self, name: str) -> Path:
        return self.runs / f"teacher_{name}" / "teacher.pt"

    def student_file(self, run: str, final: bool = False) -> Path:
        """A student run's model file: the best val epoch's, or (``final``, with student.export_final) the last's."""
        return self.runs / run / ("student_final.pt" if final else "student.pt")

    def probe_file(self, teacher: str) -> Path:
        return self.runs / f"teacher_{teacher}" / "probe.json"

    def record_path(self, step: Step) -> Path:
        return self.runs / "steps" / f"{step.name}.json"

    def attempt_path(self, step: Step) -> Path:
        """The step's unfinished attempt (not kept: its checkpoints, which a resume needs, are not either)."""
        return self.runs / "steps" / f"{step.name}.attempt"

    def kept(self, path: Path) -> Path:
        """The committed copy of a file of runs."""
        return self.records / Path(path).relative_to(self.runs)

    def load(self, path: Path) -> dict | None:
        """A JSON file of runs, read from its kept copy."""
        path = self.kept(path)
        return json.loads(path.read_text()) if path.is_file() else None

    def pretrain_steps(self, data: str, name: str, config: str, overrides: list[str] = ()) -> list[Step]:
        """Pre-train ``teacher_<name>`` (``config`` + ``overrides``), then probe it (k-NN, and the linear probe
        with its lr chosen on val) on val and test."""
        teacher, probe = self.teacher_file(name), self.probe_file(name)
        return [Step(f"pretrain_{name}", ["pretrain", data, *overrides, "--config", config, "--name",
                                          f"teacher_{name}"], teacher),
                Step(f"probe_{name}", ["linear-probe", data, "--teacher", str(teacher), "--split", "val", "test",
                                       "--out", str(probe), "--config", config], probe)]

    def random_probe(self, data: str) -> Step:
        """k-NN and linear probe of random weights (base.yaml's backbone): the baseline of every teacher's gain."""
        probe = self.probe_file("random")
        return Step("probe_random", ["linear-probe", data, "--random-init", "--split", "val", "test", "--out",
                                     str(probe), "--config", f"{self.configs}/base.yaml"], probe)

    def evaluate(self, data: str, name: str, runs: list[str], split: str, ten_crop: bool = False,
                 final: bool = False) -> Step:
        out = self.runs / "eval" / name
        argv = ["evaluate", data, "--split", split, "--out", str(out), "--config", f"{self.configs}/base.yaml"]
        for run in runs:
            argv += ["--model", str(self.student_file(run, final))]
        return Step(f"eval_{name}", argv + (["--ten-crop"] if ten_crop else []), out / "report.json")

    # ---- running ------------------------------------------------------------------------------
    def succeeded(self, step: Step) -> bool:
        """Succeeded with this command (a changed command, e.g. after a new val decision, reruns), and for a
        pretrain or distill step with the config it resolves to now (``config_changes``): an edited config
        file reruns it; a rewritten command resolving to what ran does not."""
        rec = self.load(self.record_path(step))
        if not rec or rec["rc"] != 0:
            return False
        if rec["argv"] == ["raypipe", *step.argv]:
            return not self.config_changes(step)
        (head, _, opts), (rec_head, _, rec_opts) = split_argv(step.argv), split_argv(rec["argv"][1:])
        same_options = {k: v for k, v in opts.items() if k != "--config"} == \
            {k: v for k, v in rec_opts.items() if k != "--config"}
        return head == rec_head and same_options and self.config_changes(step) == {}

    def config_changes(self, step: Step) -> dict[str, tuple] | None:
        """The keys whose value in the config ``step``'s command resolves to now differs from the config its
        recorded run wrote (key -> (then, now)); None where there is nothing to compare (not a pretrain or
        distill step, or no kept config.yaml). Both go through the current Config, so renamed keys and
        fields added since (at their defaults) compare alike."""
        import yaml

        from raypipe.config import Config, load_config
        from raypipe.errors import ConfigError

        (command, _), overrides, opts = split_argv(step.argv)
        if command not in RUN_COMMANDS or "--config" not in opts or "--name" not in opts:
            return None
        kept = self.kept(self.runs / opts["--name"] / "config.yaml")
        if not kept.is_file():
            return None
        try:   # a kept config the current Config cannot read (a key removed since): nothing to compare
            then = flat_config(Config.from_dict(yaml.safe_load(kept.read_text())).to_dict())
        except (ConfigError, ValueError, TypeError):
            return None
        try:
            now = flat_config(load_config(opts["--config"], overrides).to_dict())
        except ConfigError as exc:   # the command no longer resolves (a config file gone or broken)
            return {"--config": (opts["--config"], f"does not resolve now: {exc}")}
        return {k: (then.get(k), now.get(k)) for k in sorted(then.keys() | now.keys()) if then.get(k) != now.get(k)}

    def remade_inputs(self, step: Step, earlier: list[Step]) -> list[Step]:
        """The earlier steps whose output ``step`` reads that ran again after it did: its record (and what
        it made) comes from an earlier make of them - stale."""
        mine = self.load(self.record_path(step))
        if not mine or "started" not in mine:
            return []
        recs = {s.name: self.load(self.record_path(s)) for s in earlier if str(s.output) in step.argv}
        return [s for s in earlier if (rec := recs.get(s.name)) and rec.get("started", "") > mine["started"]]

    def is_done(self, step: Step, later: list[Step] = (), earlier: list[Step] = ()) -> bool:
        """Succeeded, not stale (no input of ``earlier`` re-made since), and its output is here (kept, or a
        model in runs) or no step still to run needs it."""
        if not self.succeeded(step) or self.remade_inputs(step, earlier):
            return False
        if self.present(step):
            return True
        return not any(str(step.output) in s.argv and not self.succeeded(s) for s in later)

    def present(self, step: Step) -> bool:
        """Its output is in runs, or kept in records (a model never is)."""
        return step.output.exists() or self.kept(step.output).exists()

    def keep_records(self) -> None:
        """Copy the small files of runs (KEPT) to records, eval reports trimmed to REPORT_FIELDS."""
        for pattern in KEPT:
            for path in self.runs.glob(pattern):
                target = self.kept(path)
                target.parent.mkdir(parents=True, exist_ok=True)
                if path.name == "report.json":
                    target.write_text(trimmed_report(path))
                else:
                    shutil.copy2(path, target)

    def remake_inputs(self, step: Step, earlier: list[Step], only: set[str] | None = None) -> None:
        """Run again the earlier steps whose output (a model: models are not kept) ``step`` reads and runs
        lacks, theirs first; with ``only``, one not among them stops the run, named."""
        for i, source in enumerate(earlier):
            if str(source.output) in step.argv and not self.present(source):
                if only is not None and source.name not in only:
                    raise SystemExit(f"[{step.name}] needs {source.output}, which is not in {self.runs} (models are "
                                     f"not kept in {self.records}): add step {source.name} to --only to make it "
                                     "again, or run without --only")
                self.remake_inputs(source, earlier[:i], only)
                print(f"[{source.name}] runs again: {step.name} reads {source.output}, which is gone", flush=True)
                self.run_step(source)

    def earlier_attempts(self, step: Step, log: Path) -> tuple[int, float]:
        """(count, wall seconds) of this very command's unfinished attempts (interrupted or failed; a rerun
        resumes from their checkpoints), each timed from its start to its log's last line."""
        path = self.attempt_path(step)
        attempt = json.loads(path.read_text()) if path.is_file() else None
        if not attempt or attempt["argv"] != step.argv or not log.is_file():
            return 0, 0.0
        return attempt["count"], attempt["earlier_wall_s"] + max(0.0, log.stat().st_mtime - attempt["started_unix"])

    def run_step(self, step: Step) -> None:
        log = self.runs / "logs" / f"{step.name}.log"
        log.parent.mkdir(parents=True, exist_ok=True)
        self.record_path(step).parent.mkdir(parents=True, exist_ok=True)
        earlier, earlier_s = self.earlier_attempts(step, log)
        resumed = f", resuming after {earlier} unfinished attempt(s), {earlier_s / 60:.1f} min" if earlier else ""
        print(f"[{step.name}] raypipe {' '.join(step.argv)}  (log: {log}{resumed})", flush=True)
        started = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
        t0 = time.time()
        self.attempt_path(step).write_text(json.dumps({"argv": step.argv, "count": earlier + 1, "started_unix": t0,
                                                       "earlier_wall_s": earlier_s}))
        with log.open("a" if earlier else "w") as out:  # a resumed step's log keeps the earlier attempts
            out.write(f"==== {started}: attempt {earlier + 1}\n")
            out.flush()
            rc = subprocess.run([sys.executable, "-m", "raypipe", *step.argv], stdout=out,
                                stderr=subprocess.STDOUT).returncode
        rec = {"name": step.name, "argv": ["raypipe", *step.argv], "rc": rc,
               "wall_s": round(earlier_s + time.time() - t0, 1), "attempts": earlier + 1, "started": started,
               "machine": machine()}
        self.record_path(step).write_text(json.dumps(rec, indent=2))
        self.keep_records()
        if rc != 0:
            raise SystemExit(f"[{step.name}] failed with exit code {rc}; see {log}")
        self.attempt_path(step).unlink()
        print(f"[{step.name}] done in {rec['wall_s'] / 60:.1f} min", flush=True)

    # ---- stages: steps in order, a stage planned once the val decisions it needs are made ----------
    def stages(self) -> list:
        """The runner's stages in order, each a function of the data folder giving its steps, raising
        NotDecided while a val decision it needs waits for runs (none here: one-stage runners plan alone)."""
        return []

    def planned(self, data: str) -> Iterator[tuple[str, list[Step] | NotDecided]]:
        """Each stage's steps, or why it waits; a waiting stage does not hold up the stages after it (they
        raise NotDecided themselves if they need its decision). Lazy: a stage is planned after the
        caller has run the stages before it."""
        for stage in self.stages():
            try:
                yield stage.__name__, stage(data)
            except NotDecided as exc:
                yield stage.__name__, exc

    def known_steps(self, data: str) -> list[Step]:
        """Every step whose decisions can be made from the runs so far."""
        return [step for _, steps in self.planned(data) if not isinstance(steps, NotDecided) for step in steps]

    def run_stages(self, data: str, only: set[str] | None) -> None:
        """Run every stage's steps not done yet (of ``only``, if given), stage by stage."""
        earlier: list[Step] = []
        for name, steps in self.planned(data):
            if isinstance(steps, NotDecided):   # only with --only: the runs it waits for were not asked for
                print(f"skipping {name}: {steps}", flush=True)
                continue
            self.run_all(steps, only, earlier)
            earlier += steps

    def run_all(self, steps: list[Step], only: set[str] | None, earlier: list[Step] = ()) -> None:
        """Run the steps not done yet (of ``only``, if given); ``earlier``: steps before these (earlier
        stages), whose models they may read."""
        for i, step in enumerate(steps):
            if (only is None or step.name in only) and not self.is_done(step, steps[i + 1:], [*earlier, *steps[:i]]):
                self.remake_inputs(step, [*earlier, *steps[:i]], only)
                self.run_step(step)

    # ---- reading the records ------------------------------------------------------------------
    def student_val(self, run: str) -> float | None:
        m = self.load(self.runs / run / "metrics.json")
        return m["val_top1"] if m else None

    def knn_curve(self, teacher: str) -> str:
        """The k-NN monitor of ``teacher_<teacher>`` by epoch: ``10:25.2 20:25.0 ...`` (or -)."""
        import pandas as pd

        path = self.kept(self.runs / f"teacher_{teacher}" / "metrics.csv")
        if not path.is_file():
            return "-"
        df = pd.read_csv(path).dropna(subset=["knn_top1"])
        return " ".join(f"{int(e) + 1}:{v:.1f}" for e, v in zip(df["epoch"], df["knn_top1"]))

    def eval_top1(self, name: str) -> float | None:
        r = self.load(self.runs / "eval" / name / "report.json")
        return r["top1"] if r else None

    def test_sizes(self) -> str:
        sizes = sorted({json.loads(r.read_text())["n_images"]
                        for r in (self.records / "eval").glob("*_test/report.json")})
        return ", ".join(f"{n:,}" for n in sizes)

    def wall_min(self, *steps: str) -> float | None:
        recs = [self.load(self.runs / "steps" / f"{s}.json") for s in steps]
        return sum(r["wall_s"] for r in recs) / 60 if all(recs) else None

    def recorded(self, steps: list[Step]) -> list[dict]:
        """The records of the steps that have one."""
        return [r for r in (self.load(self.record_path(s)) for s in steps) if r]

    def chosen_distill(self, candidates: tuple[str, ...] | None = None) -> str:
        """The distillation recipe (lambda) with the best val top-1 on seed 0."""
        candidates = candidates or self.DISTILL_CANDIDATES
        vals = {r: self.student_val(f"{r}_s0") for r in candidates}
        if None in vals.values():
            raise NotDecided("the lambda decision needs " + ", ".join(f"{r}_s0" for r in candidates))
        return max(candidates, key=lambda r: vals[r])

    # ---- table parts --------------------------------------------------------------------------
    def config_cell(self, recipe: str) -> str:
        return f"`{self.RECIPES[recipe]}`"

    def seeds_row(self, label: str, recipe: str, seeds: tuple[int, ...], means: dict) -> str:
        """`| label | config | seeds done | val | test | min per seed |` of a student row; its test mean
        goes to means[recipe]."""
        runs = [f"{recipe}_s{s}" for s in seeds]
        test = [self.eval_top1(f"{r}_test") for r in runs]
        done = [s for s, t in zip(seeds, test) if t is not None]
        means[recipe] = mean_or_none(test)
        walls = [self.wall_min(f"{recipe}_s{s}", f"eval_{recipe}_s{s}_test") for s in done]
        return (f"| {label} | {self.config_cell(recipe)} | {','.join(map(str, done)) or '-'} | "
                f"{seeds_cell([self.student_val(r) for r in runs])} | {seeds_cell(test)} | "
                f"{fmt(mean_or_none(walls), '.1f')} |")

    def probe_rows(self, random_name: str, name: str, label: str) -> list[str]:
        """k-NN and linear probe of ``teacher_<name>`` against random weights, and the gain."""
        keys = ("val_knn_top1", "test_knn_top1", "val_top1", "test_top1")
        probe, random = self.load(self.probe_file(name)) or {}, self.load(self.probe_file(random_name)) or {}
        return ["| teacher | k-NN val | k-NN test | linear val | linear test |", "|---|---|---|---|---|",
                f"| random weights | {' | '.join(fmt(random.get(k)) for k in keys)} |",
                f"| {label} | {' | '.join(fmt(probe.get(k)) for k in keys)} |",
                f"| gain over random weights | {' | '.join(fmt(gain(probe, random, k), '+.2f') for k in keys)} |"]

    def commands_block(self, steps: list[Step]) -> list[str]:
        """The recorded commands in order, each with its step, wall time and exit code; a stale one (an input
        re-made after it ran, its config file edited since, or a planned command that is not the same run:
        the table's cells still show the recorded run) says so."""
        lines = []
        for i, step in enumerate(steps):
            rec = self.load(self.record_path(step))
            if rec:
                remade = self.remade_inputs(step, steps[:i])
                note = f"; STALE: made from an earlier {', '.join(s.name for s in remade)}" if remade else ""
                if rec["argv"] == ["raypipe", *step.argv]:
                    if changed := self.config_changes(step):
                        note += "; STALE: its config changed since it ran: " + ", ".join(
                            f"{k} {then} -> {now}" for k, (then, now) in changed.items())
                elif rec["rc"] == 0 and not self.succeeded(step):   # its table cells are of another run
                    note += f"; STALE: the plan runs it again as: raypipe {' '.join(step.argv)}"
                lines.append(f"{' '.join(rec['argv'])}   # {rec['name']}: {rec['wall_s'] / 60:.1f} min, "
                             f"exit {rec['rc']}{note}")
        return lines

    def unplanned(self, steps: list[Step], exclude: set[str] = frozenset()) -> list[str]:
        """Command lines of the recorded steps that ``steps`` (the plan) lacks, in the order they ran (a val
        decision changed since they ran, so the plan no longer has them); ``exclude``: names of steps of
        another runner sharing these records."""
        planned = {s.name for s in steps} | set(exclude)
        recs = [json.loads(p.read_text()) for p in sorted((self.records / "steps").glob("*.json"))]
        recs = sorted((r for r in recs if r["name"] not in planned), key=lambda r: r.get("started", ""))
        return [f"{' '.join(r['argv'])}   # {r['name']}: {r['wall_s'] / 60:.1f} min, exit {r['rc']}; not in the "
                "current plan (a val decision changed since it ran)" for r in recs]

    def block(self, data: str | None = None) -> str:
        """The generated block (BEGIN ... END) that ``--table-only`` writes, from the kept records alone;
        ``data``: the data folder its steps' commands name (default DATA)."""
        raise NotImplementedError

    def committed_block(self) -> str | None:
        """The generated block as ``results`` holds it now (markers included); None without the doc or its markers."""
        parts = split_block(self.results.read_text(), self.BEGIN, self.END) if self.results.is_file() else None
        return parts[1] if parts else None

    def write_block(self, block: str) -> None:
        """Replace the generated block (BEGIN ... END, markers included in ``block``) of ``results``;
        the hand-written text around it stays."""
        path, begin, end = self.results, self.BEGIN, self.END
        doc = path.read_text() if path.is_file() else f"# {self.TITLE}\n\n{begin}\n{end}\n"
        parts = split_block(doc, begin, end)
        if parts is None:
            raise SystemExit(f"{path} lost its {begin!r} / {end!r} markers; restore them to regenerate")
        head, old, tail = parts
        dropped = dropped_commands(old, block)
        if dropped:
            raise SystemExit(f"not rewriting {path}: the new block would drop {len(dropped)} recorded command(s), "
                             f"e.g. {dropped[0]!r}, whose records are missing from {self.records}; restore "
                             "them (git) or move the old block out of the markers by hand")
        path.write_text(head + block + tail)
        print(f"wrote {path}", flush=True)
