"""The record every benchmark of this folder writes: its figures with the command that produced them,
the date and the machine. By default it goes to docs/bench/<script name>.json, a small file committed
next to the docs that show it (docs/benchmarks.md, docs/search.md); pass --out elsewhere for a trial.
bench/figures.py renders each record into its generated block of those docs (`python experiments/tables.py`;
`--check` names the blocks whose record is missing).
"""
from __future__ import annotations

import datetime
import json
import platform
import shlex
import sys
from pathlib import Path

from experiments.steps import machine

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs" / "bench"
STARTED = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def default_out(script: str) -> str:
    """docs/bench/<script name>.json, the default --out of ``script`` (its ``__file__``)."""
    return str(DOCS / f"{Path(script).stem}.json")


def argv() -> list[str]:
    """The command line that ran this benchmark, its script relative to the repository."""
    script = Path(sys.argv[0]).resolve()
    return ["python", str(script.relative_to(ROOT) if script.is_relative_to(ROOT) else script), *sys.argv[1:]]


def cpu_model() -> str:
    cpuinfo = Path("/proc/cpuinfo")
    for line in cpuinfo.read_text().splitlines() if cpuinfo.is_file() else []:
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or "-"


def write_record(out: str | Path, results) -> None:
    """``results`` with the command, its start (UTC) and the machine, to ``out`` (again as rows come in)."""
    record = {"command": shlex.join(argv()), "argv": argv(), "date": STARTED, "machine": machine(),
              "cpu": cpu_model(), "python": platform.python_version(), "results": results}
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(record, indent=2) + "\n")
