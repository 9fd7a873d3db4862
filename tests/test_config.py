import pytest
import yaml

from raypipe.config import Config, ConfigError, load_config, parse_overrides


def test_yaml_then_overrides_then_roundtrip(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"teacher": {"margin": 0.3, "epochs": 5}, "data": {"resolution": 32}}))
    cfg = load_config(path, ["teacher.margin=0.1", "tune.margin_range=[0.0, 0.5]", "data.strict=true"])
    assert cfg.teacher.margin == 0.1 and cfg.teacher.epochs == 5 and cfg.data.resolution == 32
    assert cfg.data.strict is True and cfg.tune.margin_range == [0.0, 0.5]
    # The plain dict is what Train's train_loop_config / Tune's param_space carry: it round-trips.
    assert Config.from_dict(cfg.to_dict()) == cfg


@pytest.mark.parametrize("override, words", [
    (["teacher.margn=0.3"], ["teacher.margn", "margin"]),           # unknown key lists the allowed ones
    (["teacher.epochs=two"], ["teacher.epochs", "int"]),            # wrong type
    (["teacher.margin=-0.1"], ["teacher.margin", ">= 0"]),           # out of range
    (["teacher.temperature=0"], ["teacher.temperature", "> 0"]),
    (["student.mode=teach"], ["student.mode", "distill"]),          # not a choice: names the choices
    (["teacher.queue_size=100", "teacher.batch_size=32"], ["queue_size", "multiple", "global batch"]),
    (["nosuchsection.x=1"], ["nosuchsection"]),
    (["tune.margin_range=0.3"], ["tune.margin_range", "list"]),
    (["student.distill_weight=1e-4x"], ["student.distill_weight", "float"]),
])
def test_bad_values_name_the_key(override, words):
    with pytest.raises(ConfigError) as err:
        load_config(overrides=override)
    for w in words:
        assert w in str(err.value)


def test_exponents_without_a_dot_are_floats(tmp_path):
    """YAML 1.1 (PyYAML) reads 1e-4 as text: in overrides, lists and files it is still the number."""
    path = tmp_path / "c.yaml"
    path.write_text("student: {distill_weight: 1e-3}\n")
    cfg = load_config(path, ["tune.distill_weight_range=[1e-6, 5e-3]", "teacher.weight_decay=2e-4"])
    assert cfg.student.distill_weight == 1e-3 and cfg.tune.distill_weight_range == [1e-6, 5e-3]
    assert cfg.teacher.weight_decay == 2e-4


def test_queue_multiple_follows_worker_count():
    load_config(overrides=["teacher.batch_size=32", "teacher.queue_size=128", "resources.num_workers=2"])
    with pytest.raises(ConfigError, match="global batch"):
        load_config(overrides=["teacher.batch_size=32", "teacher.queue_size=96", "resources.num_workers=2"])


def test_unknown_key_in_yaml_names_file(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("teacher:\n  marginn: 0.2\n")
    with pytest.raises(ConfigError, match="bad.yaml.*teacher.marginn"):
        load_config(path)


def test_override_syntax():
    assert parse_overrides(["a.b=1", "a.c=x", "a.d=[1, 2]"]) == {"a.b": 1, "a.c": "x", "a.d": [1, 2]}
    with pytest.raises(ConfigError, match="key=value"):
        parse_overrides(["teacher.margin"])


def test_shipped_configs_are_valid():
    from pathlib import Path
    configs = sorted((Path(__file__).parents[1] / "experiments" / "configs").rglob("*.yaml"))
    assert configs, "experiments/configs has no YAML files"
    for path in configs:
        load_config(path)


def test_extends_merges_the_parent_first_relative_to_the_file(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "base.yaml").write_text("teacher: {margin: 0.3, epochs: 7}\nstudent: {lr: 0.2}\n")
    (tmp_path / "sub" / "mid.yaml").write_text("extends: ../base.yaml\nteacher: {margin: 0.0}\n")
    (tmp_path / "sub" / "row.yaml").write_text("extends: mid.yaml\nstudent: {mode: finetune}\n")
    cfg = load_config(tmp_path / "sub" / "row.yaml", ["teacher.epochs=9"])
    assert (cfg.teacher.margin, cfg.teacher.epochs, cfg.student.lr, cfg.student.mode) == (0.0, 9, 0.2, "finetune")


def test_extends_errors_name_the_files(tmp_path):
    (tmp_path / "row.yaml").write_text("extends: gone.yaml\n")
    with pytest.raises(ConfigError, match=r"gone.yaml.*extended by .*row.yaml"):
        load_config(tmp_path / "row.yaml")
    (tmp_path / "a.yaml").write_text("extends: b.yaml\n")
    (tmp_path / "b.yaml").write_text("extends: a.yaml\n")
    with pytest.raises(ConfigError, match="loops"):
        load_config(tmp_path / "a.yaml")
    (tmp_path / "c.yaml").write_text("extends: [a.yaml]\n")
    with pytest.raises(ConfigError, match="c.yaml.*extends"):
        load_config(tmp_path / "c.yaml")


def test_trackers_are_checked_before_anything_runs():
    import importlib.util
    with pytest.raises(ConfigError, match=r"tune.loggers: 'neptune' is not one of \['mlflow', 'wandb'\]"):
        load_config(overrides=["tune.loggers=[neptune]"])
    if importlib.util.find_spec("wandb") is None:
        with pytest.raises(ConfigError, match=r"wandb needs the wandb package: pip install 'raypipe\[wandb\]'"):
            load_config(overrides=["tune.loggers=[wandb]"])
    assert load_config(overrides=["tune.loggers=[]"]).tune.loggers == []


def test_main_job_presets_and_typed_flags():
    """tune_margin.py: presets are YAML files shipped with the package; flags keep their type
    (--name 007 stays '007'); dotted overrides beat the preset, the preset beats the defaults."""
    from raypipe.config import PRESETS
    from raypipe.tune import build_config, parse_args
    smoke = build_config(parse_args(["--smoke", "--name", "007", "--storage", "s3://b/x", "teacher.epochs=3"]))
    assert smoke.tune.experiment == "007" and smoke.tune.storage == "s3://b/x"
    assert smoke.data.resolution == 16 and smoke.teacher.backbone == "resnet18" and smoke.teacher.epochs == 3
    laptop = build_config(parse_args([]))
    assert laptop.teacher.epochs == 30 and laptop.tune.teacher_trials == 4 and laptop.data.resolution == 32
    plain = build_config(parse_args(["--data", "/d", "--max-concurrent-trials", "3"]))
    assert plain.teacher.epochs == Config().teacher.epochs and plain.data.root == "/d"
    assert plain.tune.max_concurrent_trials == 3
    assert sorted(p.stem for p in PRESETS.glob("*.yaml")) == ["laptop", "smoke"]


def test_config_keys_lists_every_key_with_its_default_and_meaning(capsys):
    """`raypipe config --keys`: one line per settable key, the default as a valid override value."""
    from raypipe.cli import main

    def flat(node, prefix=""):
        for key, value in node.items():
            yield from flat(value, f"{prefix}{key}.") if isinstance(value, dict) else [prefix + key]

    assert main(["config", "--keys"]) in (0, None)
    lines = capsys.readouterr().out.splitlines()
    keys = [line.split(" = ")[0] for line in lines]
    assert keys == list(flat(Config().to_dict()))
    margin = next(line for line in lines if line.startswith("teacher.margin = "))
    assert f"= {Config().teacher.margin!r}  # " in margin
    assert load_config(overrides=[line.split("  # ")[0].replace(" = ", "=", 1).replace("'", "") for line in lines
                                  if line.startswith("teacher.")]).teacher == Config().teacher
