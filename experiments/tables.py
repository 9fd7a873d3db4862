"""Every generated table and figure block of the docs, from its kept records, in one command.

    python experiments/tables.py            # rewrite every block whose records are here; name the others
    python experiments/tables.py --check    # rewrite nothing: name every block whose records are missing or
                                            # lack a figure, or whose text differs from them; exit 1 if any
Both name, under each runner's table, the planned steps that have not run yet (their cells show -), with
the command that runs them; these do not fail --check (the block is what its records give).

The blocks, each between its markers in a doc:
- the runners' tables: what `python experiments/<runner>.py --table-only` writes from the step records kept
  in experiments/records/ (cifar10_50.py and tinyimagenet_50.py -> docs/results.md, teacher_study.py ->
  docs/teacher_study.md, its study and its teacher choice), made by the runners' own code (experiments/steps.py: ``Runner.block``);
- the benchmarks' figures (bench/figures.py: docs/benchmarks.md, docs/search.md), rendered from the records
  docs/bench/<name>.json that the benchmarks of bench/ write, each with the command that wrote it.
A block whose records are missing is left as it stands and named, with the command that makes them: a
runner's table whose recorded commands have no step record any more (the runner would drop them), a
figure whose docs/bench record does not exist. Nothing here runs a step or a benchmark.
"""
from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path

if __package__ in (None, ""):  # `python experiments/tables.py`: import from the repository
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.figures import FIGURES, TABLES, Figure  # noqa: E402
from experiments.cifar10_50 import Cifar10  # noqa: E402
from experiments.steps import REPO, Runner, dropped_commands, split_block  # noqa: E402
from experiments.teacher_study import TeacherChoice, TeacherStudy  # noqa: E402
from experiments.tinyimagenet_50 import TinyImageNet  # noqa: E402

# runner -> (the command that runs its missing steps, the steps its table reads)
RUNNERS = {Cifar10: ("python experiments/cifar10_50.py", lambda r: r.known_steps(r.DATA)),
           TinyImageNet: ("python experiments/tinyimagenet_50.py", lambda r: r.steps(r.DATA)),
           TeacherStudy: ("python experiments/teacher_study.py", lambda r: r.steps(r.DATA)),
           TeacherChoice: ("python experiments/teacher_study.py --only choice", lambda r: r.steps(r.DATA))}
OK, STALE, MISSING, LACKING, BROKEN = "ok", "stale", "missing", "lacking", "no markers"


@dataclass
class Block:
    """One generated block: where it is, what it is made from, and how it stands against its records."""
    doc: Path                  # relative to the repository
    name: str
    source: str                # what it is made from
    state: str = OK
    new: str | None = None     # the block its records give (None: they cannot give it)
    problems: list[str] = field(default_factory=list)   # what is missing or lacking, named
    fixes: list[str] = field(default_factory=list)      # the commands that make it
    todo: list[str] = field(default_factory=list)       # planned steps without a successful record (cells of -)
    todo_fix: str | None = None                         # the command that runs them
    write: object = None       # writes ``new`` into the doc

    def line(self) -> str:
        head = f"{self.state.upper():<8} {self.doc} [{self.name}] from {self.source}"
        todo = [f"         not run yet (its cells show -): {len(self.todo)} planned step(s): {', '.join(self.todo)}; "
                f"run them: {self.todo_fix}"] if self.todo else []
        return "\n".join([head, *(f"         {p}" for p in self.problems),
                          *(f"         make it: {c}" for c in self.fixes), *todo])


def first_difference(old: str, new: str) -> str:
    """Where two blocks first differ: the line, and a stretch of each around the first differing character."""
    a, b = old.splitlines(), new.splitlines()
    for i, (x, y) in enumerate(zip(a + [""] * len(b), b + [""] * len(a))):
        if x != y:
            at = next((j for j, (c, d) in enumerate(zip(x, y)) if c != d), min(len(x), len(y)))
            start = max(0, at - 30)
            return (f"first difference at its line {i + 1}: committed {x[start:at + 50]!r}, "
                    f"records give {y[start:at + 50]!r}")
    return "they differ"


def runner_block(cls: type[Runner], root: Path) -> Block:
    runner = cls(records=root / "experiments" / "records" / cls.NAME, results=root / cls.RESULTS)
    command, table_steps = RUNNERS[cls]
    block = Block(cls.RESULTS, runner.BEGIN.split(":")[0].removeprefix("<!-- "), f"{command} --table-only "
                  f"(step records in experiments/records/{cls.NAME})")
    block.todo = [s.name for s in table_steps(runner) if not runner.succeeded(s)]
    block.todo_fix = command
    old = runner.committed_block()
    if old is None:
        block.state, block.problems = BROKEN, [f"its markers {runner.BEGIN!r} / {runner.END!r} are gone"]
        return block
    new = runner.block()
    dropped = dropped_commands(old, new)
    if dropped:
        by_command = {"raypipe " + " ".join(s.argv): s.name for s in table_steps(runner)}
        names = [by_command.get(c, c) for c in dropped]
        block.state = MISSING
        block.problems = [f"{len(dropped)} recorded command(s) of the block have no step record in "
                          f"experiments/records/{cls.NAME}/steps/: {', '.join(names)}"]
        block.fixes = [command]
        return block
    block.new = new
    if new != old:
        block.state, block.problems = STALE, [first_difference(old, new)]
        block.fixes = [TABLES]
        block.write = lambda: runner.write_block(new)
    return block


def split_figure(doc: str, fig: Figure) -> tuple[str, str, str] | None:
    """``doc`` around the figure's block, whatever its begin marker's note says (it names the records)."""
    opening = fig.begin.split(" (", 1)[0]
    if opening not in doc:
        return None
    rest = doc.split(opening, 1)[1]
    return split_block(doc, opening + rest.split("-->", 1)[0] + "-->", fig.end)


def write_figure(doc: Path, fig: Figure, block: str) -> None:
    """Replace the figure's block in ``doc`` as it stands now (other blocks of it may just have been written)."""
    head, _, tail = split_figure(doc.read_text(), fig)
    doc.write_text(head + block + tail)
    print(f"wrote {doc} [figures:{fig.key}]", flush=True)


def figure_block(fig: Figure, root: Path) -> Block:
    doc = root / fig.doc
    block = Block(Path(fig.doc), f"figures:{fig.key}", ", ".join(fig.records))
    parts = split_figure(doc.read_text(), fig) if doc.is_file() else None
    if parts is None:
        block.state, block.problems = BROKEN, [f"its markers {fig.begin!r} / {fig.end!r} are gone"]
        return block
    absent = [(path, cmd) for path, cmd in zip(fig.records, fig.commands) if not (root / path).is_file()]
    if absent:
        block.state = MISSING
        block.problems = [f"no record {path}" + ("" if cmd else f": no script writes it ({fig.note})")
                          for path, cmd in absent]
        block.fixes = [cmd for _, cmd in absent if cmd]
        return block
    records = [json.loads((root / path).read_text()) for path in fig.records]
    old = parts[1]
    block.new = fig.block(records)
    if block.new != old:
        block.state, block.problems, block.fixes = STALE, [first_difference(old, block.new)], [TABLES]
        block.write = lambda: write_figure(doc, fig, block.new)
    lacks = fig.lacks(fig, records) if fig.lacks else []
    if lacks:
        block.state = LACKING if block.state == OK else block.state
        block.problems += [f"the record lacks {what}" for what in lacks]
        block.fixes += [c for c in fig.commands if c not in block.fixes]
    return block


def blocks(root: Path = REPO) -> list[Block]:
    """Every generated block of the docs under ``root`` (a repository or a copy of its docs and records)."""
    return [*(runner_block(cls, root) for cls in RUNNERS), *(figure_block(fig, root) for fig in FIGURES)]


def unused_records(root: Path = REPO) -> list[str]:
    """Records in docs/bench that no block is made from."""
    used = {path for fig in FIGURES for path in fig.records}
    return sorted(str(p.relative_to(root)) for p in (root / "docs" / "bench").glob("*.json")
                  if str(p.relative_to(root)) not in used)


def main(argv: list[str] | None = None, root: Path = REPO) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--check", action="store_true", help="rewrite nothing; exit 1 if a block is not made from its "
                                                        "records as committed")
    args = p.parse_args(argv)
    found = blocks(root)
    if not args.check:
        for block in found:
            if block.write is not None:
                block.write()
        found = blocks(root)   # as they stand now
    for block in found:
        print(block.line())
    for path in unused_records(root):
        print(f"NOTE     {path}: no block of the docs is made from it")
    bad = [b for b in found if b.state != OK]
    counts = ", ".join(f"{sum(b.state == s for b in found)} {s}" for s in (OK, STALE, MISSING, LACKING, BROKEN)
                       if any(b.state == s for b in found))
    print(f"{len(found)} blocks: {counts}" + ("" if args.check or not bad else
                                            f"; the {len(bad)} not ok need the commands named above"))
    return 1 if args.check and bad else 0


if __name__ == "__main__":
    sys.exit(main())
