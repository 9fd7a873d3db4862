"""The `raypipe` command line: typed overrides anywhere on the line, help, version (no Ray, no training)."""
import argparse
import json
import subprocess
import sys

import pytest
import yaml

from raypipe.cli import build_parser, main
from raypipe.config import ConfigError, load_config
from raypipe.config import parse_args_with_overrides as parse_args


def resolved(capsys, *argv) -> dict:
    assert main(["config", *argv]) == 0
    return yaml.safe_load(capsys.readouterr().out)


def test_string_keys_keep_their_text_and_others_are_typed(capsys):
    cfg = resolved(capsys, "name=007", "data.root=yes", "teacher.moco.margin=0.25", "teacher.epochs=3")
    assert cfg["name"] == "007" and cfg["data"]["root"] == "yes"
    assert cfg["teacher"]["moco"]["margin"] == 0.25 and cfg["teacher"]["epochs"] == 3
    # an old key on the command line lands at its new key in the resolved config
    old = resolved(capsys, "teacher.margin=0.25", "student.distill_weight=2e-4")
    assert old["teacher"]["moco"]["margin"] == 0.25 and old["student"]["ofd"]["distill_weight"] == 2e-4
    assert "margin" not in old["teacher"] and "distill_weight" not in old["student"]
    assert resolved(capsys, "name=0x1F")["name"] == "0x1F"


def test_use_gpu_accepts_booleans_in_yaml_and_on_the_command_line(tmp_path, capsys):
    (tmp_path / "gpu.yaml").write_text("resources:\n  use_gpu: true\n")
    assert load_config(tmp_path / "gpu.yaml").resources.use_gpu is True
    assert resolved(capsys, "resources.use_gpu=false")["resources"]["use_gpu"] is False
    assert resolved(capsys, "resources.use_gpu=auto")["resources"]["use_gpu"] == "auto"
    with pytest.raises(ConfigError, match="use_gpu"):
        load_config(overrides=["resources.use_gpu=maybe"])


def test_an_unusable_output_path_is_a_one_line_error_naming_it(tmp_path, capsys):
    (tmp_path / "taken").write_text("a file, not a folder")
    assert main(["demo-data", str(tmp_path / "taken" / "demo"), "--size", "8"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("raypipe demo-data: error:") and str(tmp_path / "taken" / "demo") in err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_overrides_are_taken_anywhere_on_the_line():
    parser = build_parser()
    args = parse_args(parser, ["distill", "demo", "--teacher", "t.pt", "--mode", "distill", "--config",
                               "experiments/configs/demo.yaml", "name=demo_student", "student.epochs=2"])
    assert args.overrides == ["name=demo_student", "student.epochs=2"] and args.teacher == "t.pt"
    args = parse_args(parser, ["pretrain", "d", "teacher.epochs=1", "--name", "007", "teacher.moco.margin=0"])
    assert args.overrides == ["teacher.epochs=1", "teacher.moco.margin=0"] and args.name == "007"
    with pytest.raises(SystemExit):   # a stray option is still an error
        parse_args(parser, ["pretrain", "d", "--nmae", "x"])
    with pytest.raises(SystemExit):   # commands without overrides take none
        parse_args(parser, ["results", "runs/x", "teacher.epochs=1"])


def test_every_positional_argument_has_help():
    def walk(parser, path):
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for name, sub in action.choices.items():
                    yield from walk(sub, f"{path} {name}")
            elif not action.option_strings and action.dest != "help":
                yield f"{path} {action.dest}", action.help
    missing = [where for where, text in walk(build_parser(), "raypipe") if not text]
    assert not missing, missing


def _cli_modules(argv: list[str]) -> tuple[str, set[str]]:
    """(stdout, the modules imported) of `raypipe ARGV` in a fresh interpreter."""
    code = ("import sys, json\nfrom raypipe.cli import main\n"
            f"try:\n    main({argv!r})\nexcept SystemExit:\n    pass\n"
            "print('MODULES', json.dumps(sorted(sys.modules)))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=180)
    assert out.returncode == 0, out.stderr
    text, _, modules = out.stdout.rpartition("MODULES ")
    return text, set(json.loads(modules))


@pytest.mark.parametrize("argv", [["--version"], ["--help"], ["pretrain", "--help"]])
def test_help_and_version_are_fast_and_import_no_torch(argv):
    """`raypipe --help` / `--version` import neither torch nor Ray, nor the trainer, data or phase
    modules (the built-in plug-ins register on first use of the registries)."""
    text, modules = _cli_modules(argv)
    heavy = {"torch", "torchvision", "ray", "raypipe.phase", "raypipe.teacher", "raypipe.student",
             "raypipe.raytrain", "raypipe.data", "raypipe.tune", "raypipe.search", "raypipe.evaluate",
             "raypipe.methods", "raypipe.distillers", "kornia", "pandas"} & modules
    assert not heavy, f"heavy import: {sorted(heavy)}"
    if argv == ["--version"]:
        assert text.startswith("raypipe ") and text.split()[1][0].isdigit()
    else:
        assert text.startswith("usage: raypipe")
