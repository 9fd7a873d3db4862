"""Every command of the README's (and docs/cluster.md's) shell blocks, as written: raypipe commands
and the main job's flags parse and their configs validate, the files they name exist, and the
cheap ones run. (The two top commands run in CI; the training commands are run by other tests.)"""
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
CLUSTER_REPO = "/home/ray/raypipe/"   # where cluster.yaml mounts the repository on the head


def shell_commands(doc: Path) -> list[list[str]]:
    """The commands of the ```bash blocks: continuation lines joined, comments dropped, split at &&."""
    out = []
    for block in re.findall(r"```bash\n(.*?)```", doc.read_text(), flags=re.S):
        for line in block.replace("\\\n", " ").splitlines():
            words = shlex.split(line, comments=True)
            while words:
                cut = words.index("&&") if "&&" in words else len(words)
                out.append(words[:cut])
                words = words[cut + 1:]
    return [c for c in out if c]


def main_job_args(words: list[str]) -> list[str] | None:
    """The arguments of experiments/tune_margin.py in a command (python ..., ray submit ... --, ray job ...)."""
    for i, w in enumerate(words):
        if w.endswith("experiments/tune_margin.py"):
            rest = words[i + 1:]
            return [a.replace(CLUSTER_REPO, f"{REPO}/") for a in (rest[1:] if rest[:1] == ["--"] else rest)]
    return None


COMMANDS = [(doc.name, c) for doc in (REPO / "README.md", REPO / "docs" / "cluster.md") for c in shell_commands(doc)]


def test_the_docs_have_the_commands_this_test_checks():
    firsts = [c[0] for _, c in COMMANDS]
    assert firsts.count("raypipe") >= 10 and sum(main_job_args(c) is not None for _, c in COMMANDS) >= 3
    readme = shell_commands(REPO / "README.md")
    assert readme[:3] == [["python3", "-m", "venv", ".venv"], [".", ".venv/bin/activate"], ["pip", "install", "-e", "."]]


@pytest.mark.parametrize("doc,words", COMMANDS, ids=[f"{d}:{' '.join(c)[:60]}" for d, c in COMMANDS])
def test_command_as_written(doc, words):
    from raypipe.cli import _load, build_parser
    from raypipe.config import parse_args_with_overrides
    from raypipe.tune import build_config
    from raypipe.tune import parse_args as main_job_parse

    job = main_job_args(words)
    if job is not None:  # python experiments/tune_margin.py / ray submit / ray job submit
        cfg = build_config(main_job_parse(job))   # flags parse, the config file exists and validates
        assert cfg.tune.experiment
        return
    if words[0] == "raypipe":
        args = parse_args_with_overrides(build_parser(), words[1:])   # e.g. key=value after the flags is accepted
        if hasattr(args, "overrides") and getattr(args, "config", None) is not None or \
                args.command in ("pretrain", "distill", "config"):
            _load(args)                               # the config file exists and every override is valid
        return
    if words[0] == "ray":
        named = [w for w in words if w.endswith((".yaml", ".py"))]
        assert all((REPO / w).is_file() for w in named), named
        return
    if words[0] in ("docker", "kubectl"):   # the Kubernetes recipe: the files it names exist
        named = [words[i + 1] for i, w in enumerate(words[:-1]) if w == "-f"]
        assert all((REPO / w).is_file() for w in named), named
        return
    assert words[0] in {"python3", ".", "pip", "pytest", "aws", "tensorboard", "export"}, words


def test_demo_data_command_runs_as_written(tmp_path):
    words = next(c for _, c in COMMANDS if c[:2] == ["raypipe", "demo-data"])
    done = subprocess.run([sys.executable, "-m", "raypipe", *words[1:]], cwd=tmp_path, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    classes = sorted(p.name for p in (tmp_path / words[2] / "train").iterdir())
    assert len(classes) == 10 and len(list((tmp_path / words[2] / "train" / classes[0]).iterdir())) == 50
