"""The `raypipe` command line: typed overrides anywhere on the line, help, version (no Ray, no training)."""
import argparse
import subprocess
import sys

import pytest
import yaml

from raypipe.cli import build_parser, main, parse_args
from raypipe.config import ConfigError, load_config


def resolved(capsys, *argv) -> dict:
    assert main(["config", *argv]) == 0
    return yaml.safe_load(capsys.readouterr().out)


def test_string_keys_keep_their_text_and_others_are_typed(capsys):
    cfg = resolved(capsys, "name=007", "data.root=yes", "teacher.margin=0.25", "teacher.epochs=3")
    assert cfg["name"] == "007" and cfg["data"]["root"] == "yes"
    assert cfg["teacher"]["margin"] == 0.25 and cfg["teacher"]["epochs"] == 3
    assert resolved(capsys, "name=0x1F")["name"] == "0x1F"


def test_use_gpu_accepts_booleans_in_yaml_and_on_the_command_line(tmp_path, capsys):
    (tmp_path / "gpu.yaml").write_text("resources:\n  use_gpu: true\n")
    assert load_config(tmp_path / "gpu.yaml").resources.use_gpu == "true"
    assert resolved(capsys, "resources.use_gpu=false")["resources"]["use_gpu"] == "false"
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
    args = parse_args(parser, ["pretrain", "d", "teacher.epochs=1", "--name", "007", "teacher.margin=0"])
    assert args.overrides == ["teacher.epochs=1", "teacher.margin=0"] and args.name == "007"
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


def test_help_and_version_are_fast_and_import_no_torch():
    code = ("import sys\nfrom raypipe.cli import main\n"
            "try:\n    main(['--version'])\nexcept SystemExit:\n    pass\n"
            "assert 'torch' not in sys.modules and 'ray' not in sys.modules, 'heavy import'\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("raypipe ") and out.stdout.split()[1][0].isdigit()
