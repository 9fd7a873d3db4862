from pathlib import Path

import pytest
import yaml

from raypipe.config import PRESETS, Config, ConfigError, load_config, parse_overrides

REPO = Path(__file__).parents[1]


def test_yaml_then_overrides_then_roundtrip(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"teacher": {"moco": {"margin": 0.3}, "epochs": 5}, "data": {"resolution": 32}}))
    cfg = load_config(path, ["teacher.moco.margin=0.1", "teacher.moco.margin_range=[0.0, 0.5]", "data.strict=true"])
    assert cfg.teacher.moco.margin == 0.1 and cfg.teacher.epochs == 5 and cfg.data.resolution == 32
    assert cfg.data.strict is True and cfg.teacher.moco.margin_range == [0.0, 0.5]
    # The plain dict is what Train's train_loop_config / Tune's param_space carry: it round-trips.
    assert Config.from_dict(cfg.to_dict()) == cfg


@pytest.mark.parametrize("overrides", [
    [],
    ["teacher.moco.margin=0.1", "student.ofd.distill_weight=3e-4", "resources.use_gpu=false", "resources.amp=off",
     "output_dir=s3://b/runs", "name=007", "tune.loggers=[]", "tune.baselines=[supervised]"],
    ["student.mode=supervised", "teacher.moco.queue_sizes=[64, 128]", "student.ofd.ce_only_range=[0, 3]"],
])
def test_config_round_trips_through_its_plain_dict(overrides):
    """Config.from_dict(cfg.to_dict()) == cfg, plug-in sections included, and the dict is plain
    (what Ray ships to workers and Tune writes to its param space)."""
    cfg = load_config(overrides=overrides)
    raw = cfg.to_dict()
    assert Config.from_dict(raw) == cfg
    assert isinstance(raw["teacher"]["moco"], dict) and isinstance(raw["student"]["ofd"], dict)
    assert yaml.safe_load(yaml.safe_dump(raw)) == raw
    assert Config.from_dict(yaml.safe_load(yaml.safe_dump(raw))) == cfg


def test_old_keys_keep_working_and_land_at_their_new_keys(tmp_path):
    """Overrides, YAML files and plain dicts of the layout before plug-ins owned their settings."""
    old = load_config(overrides=["teacher.margin=0.1", "tune.margin_range=[0.0, 0.5]", "student.distill_weight=3e-4",
                                 "tune.storage=s3://b/x", "teacher.queue_size=128", "student.ce_only_epochs=2",
                                 "tune.distill_weight_range=[1e-6, 1e-2]"])
    assert old.teacher.moco.margin == 0.1 and old.teacher.moco.margin_range == [0.0, 0.5]
    assert old.student.ofd.distill_weight == 3e-4 and old.student.ofd.distill_weight_range == [1e-6, 1e-2]
    assert old.teacher.moco.queue_size == 128 and old.student.ofd.ce_only_epochs == 2
    assert old.output_dir == "s3://b/x"
    new = load_config(overrides=["teacher.moco.margin=0.1", "teacher.moco.margin_range=[0.0, 0.5]",
                                 "student.ofd.distill_weight=3e-4", "output_dir=s3://b/x", "teacher.moco.queue_size=128",
                                 "student.ofd.ce_only_epochs=2", "student.ofd.distill_weight_range=[1e-6, 1e-2]"])
    assert old == new
    # the old keys are gone from the config itself: one place for each setting
    raw = new.to_dict()
    assert "margin" not in raw["teacher"] and "distill_weight" not in raw["student"]
    assert not {"storage", "margin_range", "distill_weight_range"} & set(raw["tune"])
    assert "storage_path" not in raw["resources"]
    # a YAML file of the old layout
    path = tmp_path / "old.yaml"
    path.write_text("teacher: {margin: 0.3, temperature: 0.1, proj_hidden: 64}\n"
                    "student: {distill_weight: 1e-3, teacher_bn_train: false}\n"
                    "resources: {storage_path: /tmp/old_runs}\n"
                    "tune: {margin_range: [0.1, 0.6], queue_sizes: [128], ce_only_range: [0, 2]}\n")
    cfg = load_config(path)
    assert (cfg.teacher.moco.margin, cfg.teacher.moco.temperature, cfg.teacher.moco.proj_hidden) == (0.3, 0.1, 64)
    assert cfg.student.ofd.distill_weight == 1e-3 and cfg.student.ofd.teacher_bn_train is False
    assert cfg.teacher.moco.margin_range == [0.1, 0.6] and cfg.teacher.moco.queue_sizes == [128]
    assert cfg.student.ofd.ce_only_range == [0, 2] and cfg.output_dir == "/tmp/old_runs"
    # an old key in a file, overridden at its new key (and the other way round)
    assert load_config(path, ["teacher.moco.margin=0.5"]).teacher.moco.margin == 0.5
    assert load_config(tmp_path / "old.yaml", ["teacher.margin=0.6"]).teacher.moco.margin == 0.6
    # a plain dict of the old layout (an older run's config.yaml, a Tune trial's config)
    assert Config.from_dict({"teacher": {"margin": 0.3}, "tune": {"storage": "gs://b"}}) == \
        load_config(overrides=["teacher.moco.margin=0.3", "output_dir=gs://b"])
    # where both are given, the value at the new key wins
    assert Config.from_dict({"teacher": {"margin": 0.3, "moco": {"margin": 0.2}}}).teacher.moco.margin == 0.2
    # errors about an old key name its new key
    with pytest.raises(ConfigError, match=r"'teacher\.moco\.margin' = 5 is out of range"):
        load_config(overrides=["teacher.margin=5"])
    path.write_text("student: {distill_weight: lots}\n")
    with pytest.raises(ConfigError, match=r"old\.yaml.*'student\.ofd\.distill_weight' must be of type float"):
        load_config(path)


def test_booleans_are_booleans(tmp_path, capsys):
    """resources.use_gpu is auto | true | false and holds True / False (never the text "true");
    anything else is an error naming the key, from a file, an override or a plain dict."""
    from raypipe.cli import main
    for text, value in (("auto", "auto"), ("true", True), ("false", False), ("True", True), ("yes", True),
                        ("no", False)):
        path = tmp_path / "gpu.yaml"
        path.write_text(f"resources:\n  use_gpu: {text}\n")
        got = load_config(path).resources.use_gpu
        assert got == value and type(got) is type(value), (text, got)
    for text, value in (("auto", "auto"), ("true", True), ("false", False), ("TRUE", True), ("False", False)):
        got = load_config(overrides=[f"resources.use_gpu={text}"]).resources.use_gpu
        assert got == value and type(got) is type(value), (text, got)
    assert main(["config", "resources.use_gpu=true"]) == 0
    assert yaml.safe_load(capsys.readouterr().out)["resources"]["use_gpu"] is True
    assert Config.from_dict({"resources": {"use_gpu": False}}).resources.use_gpu is False
    assert Config.from_dict(load_config(overrides=["resources.use_gpu=true"]).to_dict()).resources.use_gpu is True
    path = tmp_path / "maybe.yaml"
    path.write_text("resources:\n  use_gpu: maybe\n")
    for attempt in (lambda: load_config(path), lambda: load_config(overrides=["resources.use_gpu=maybe"]),
                    lambda: Config.from_dict({"resources": {"use_gpu": "maybe"}}),
                    lambda: Config.from_dict({"resources": {"use_gpu": 2}})):
        with pytest.raises(ConfigError, match="resources.use_gpu"):
            attempt()
    with pytest.raises(ConfigError, match="maybe.yaml.*resources.use_gpu.*'maybe'"):
        load_config(path)
    # other boolean keys: YAML and override booleans, never text
    cfg = load_config(overrides=["data.strict=true", "student.ofd.teacher_bn_train=false", "teacher.small_stem=no"])
    assert cfg.data.strict is True and cfg.student.ofd.teacher_bn_train is False and cfg.teacher.small_stem is False
    with pytest.raises(ConfigError, match="data.strict"):
        load_config(overrides=["data.strict=perhaps"])
    # amp: YAML 1.1 reads `amp: off` as false: that is "off"
    path.write_text("resources: {amp: off}\n")
    assert load_config(path).resources.amp == "off"
    assert load_config(overrides=["resources.amp=false"]).resources.amp == "off"


def test_yaml_syntax_error_is_one_line_naming_file_line_and_column(tmp_path, capsys):
    from raypipe.cli import main
    broken = tmp_path / "broken.yaml"
    broken.write_text("teacher:\n\tepochs: 5\n")          # a tab cannot start a token: line 2, column 1
    with pytest.raises(ConfigError, match=r"broken\.yaml:2:1: YAML syntax error"):
        load_config(broken)
    assert main(["config", "--config", str(broken)]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    assert err.startswith("raypipe config: error:") and f"{broken}:2:1:" in err
    # an unclosed list: the error is where the parser noticed it, still one line naming the file
    broken.write_text("name: x\nteacher: {epochs: [1, 2}\n")
    assert main(["config", "--config", str(broken)]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "broken.yaml:2:" in err, err
    # in a file reached by `extends`: the parent is named
    (tmp_path / "row.yaml").write_text("extends: broken.yaml\n")
    with pytest.raises(ConfigError, match=r"broken\.yaml:2:"):
        load_config(tmp_path / "row.yaml")


@pytest.mark.parametrize("override, words", [
    (["teacher.margn=0.3"], ["teacher.margn", "'moco'"]),           # unknown key lists the allowed ones
    (["teacher.moco.margn=0.3"], ["teacher.moco.margn", "'margin'"]),  # in a plug-in's section too
    (["teacher.epochs=two"], ["teacher.epochs", "int"]),            # wrong type
    (["teacher.moco.margin=-0.1"], ["teacher.moco.margin", ">= 0"]),  # out of range
    (["teacher.moco.temperature=0"], ["teacher.moco.temperature", "> 0"]),
    (["student.mode=teach"], ["student.mode", "distill"]),          # not a choice: names the choices
    (["resources.amp=fp8"], ["resources.amp", "bf16"]),
    (["teacher.moco.queue_size=100", "teacher.batch_size=32"], ["teacher.moco.queue_size", "multiple",
                                                                 "global batch"]),
    (["nosuchsection.x=1"], ["nosuchsection"]),
    (["teacher.moco.margin_range=0.3"], ["teacher.moco.margin_range", "list"]),
    (["teacher.moco.margin_range=[0.5, 0.1]"], ["teacher.moco.margin_range", "lo <= hi"]),
    (["student.ofd.distill_weight=1e-4x"], ["student.ofd.distill_weight", "float"]),
    (["teacher.moco=3"], ["'teacher.moco'", "mapping"]),            # a plug-in's section must be a mapping
])
def test_bad_values_name_the_key(override, words):
    with pytest.raises(ConfigError) as err:
        load_config(overrides=override)
    for w in words:
        assert w in str(err.value)


def test_exponents_without_a_dot_are_floats(tmp_path):
    """YAML 1.1 (PyYAML) reads 1e-4 as text: in overrides, lists and files it is still the number."""
    path = tmp_path / "c.yaml"
    path.write_text("student: {ofd: {distill_weight: 1e-3}}\n")
    cfg = load_config(path, ["student.ofd.distill_weight_range=[1e-6, 5e-3]", "teacher.weight_decay=2e-4"])
    assert cfg.student.ofd.distill_weight == 1e-3 and cfg.student.ofd.distill_weight_range == [1e-6, 5e-3]
    assert cfg.teacher.weight_decay == 2e-4


def test_queue_multiple_follows_worker_count():
    load_config(overrides=["teacher.batch_size=32", "teacher.moco.queue_size=128", "resources.num_workers=2"])
    with pytest.raises(ConfigError, match="global batch"):
        load_config(overrides=["teacher.batch_size=32", "teacher.moco.queue_size=96", "resources.num_workers=2"])


def test_unknown_key_in_yaml_names_file(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("teacher:\n  marginn: 0.2\n")
    with pytest.raises(ConfigError, match="bad.yaml.*teacher.marginn"):
        load_config(path)


def test_unknown_key_in_a_plugin_section_names_the_key_and_the_file(tmp_path, capsys):
    from raypipe.cli import main
    path = tmp_path / "bad.yaml"
    path.write_text("teacher:\n  moco:\n    marginn: 0.2\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml.*'teacher\.moco\.marginn'.*'margin'"):
        load_config(path)
    path.write_text("student:\n  ofd: {distill_weight: 1e-4, ce_only: 2}\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml.*'student\.ofd\.ce_only'.*'ce_only_epochs'"):
        load_config(path)
    assert main(["config", "--config", str(path)]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "bad.yaml" in err and "student.ofd.ce_only" in err
    # the same from an override and from a plain dict (a Tune trial's config)
    with pytest.raises(ConfigError, match=r"'student\.ofd\.ce_only'"):
        load_config(overrides=["student.ofd.ce_only=2"])
    with pytest.raises(ConfigError, match=r"'teacher\.moco\.marginn'.*allowed in teacher\.moco"):
        Config.from_dict({"teacher": {"moco": {"marginn": 0.2}}})


def test_override_syntax():
    assert parse_overrides(["a.b=1", "a.c=x", "a.d=[1, 2]"]) == {"a.b": 1, "a.c": "x", "a.d": [1, 2]}
    with pytest.raises(ConfigError, match="key=value"):
        parse_overrides(["teacher.margin"])


def test_shipped_configs_are_valid():
    configs = sorted((REPO / "experiments" / "configs").rglob("*.yaml"))
    presets = sorted(PRESETS.glob("*.yaml"))
    assert configs, "experiments/configs has no YAML files"
    assert [p.stem for p in presets] == ["laptop", "smoke"]
    for path in configs + presets:
        cfg = load_config(path)
        assert Config.from_dict(cfg.to_dict()) == cfg, path


def test_extends_merges_the_parent_first_relative_to_the_file(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "base.yaml").write_text("teacher: {moco: {margin: 0.3, temperature: 0.1}, epochs: 7}\n"
                                        "student: {lr: 0.2}\n")
    (tmp_path / "sub" / "mid.yaml").write_text("extends: ../base.yaml\nteacher: {moco: {margin: 0.0}}\n")
    (tmp_path / "sub" / "row.yaml").write_text("extends: mid.yaml\nstudent: {mode: finetune}\n")
    cfg = load_config(tmp_path / "sub" / "row.yaml", ["teacher.epochs=9"])
    assert (cfg.teacher.moco.margin, cfg.teacher.epochs, cfg.student.lr, cfg.student.mode) == (0.0, 9, 0.2, "finetune")
    assert cfg.teacher.moco.temperature == 0.1   # a plug-in section merges key by key
    # a parent in the old layout, a child in the new one
    (tmp_path / "base.yaml").write_text("teacher: {margin: 0.3, temperature: 0.1, epochs: 7}\n")
    cfg = load_config(tmp_path / "sub" / "row.yaml")
    assert (cfg.teacher.moco.margin, cfg.teacher.moco.temperature) == (0.0, 0.1)


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
    assert smoke.tune.experiment == "007" and smoke.output_dir == "s3://b/x"   # --storage sets output_dir
    assert smoke.data.resolution == 16 and smoke.teacher.backbone == "resnet18" and smoke.teacher.epochs == 3
    laptop = build_config(parse_args([]))
    assert laptop.teacher.epochs == 30 and laptop.tune.teacher_trials == 4 and laptop.data.resolution == 32
    assert laptop.teacher.moco.proj_hidden == 512 and laptop.student.ofd.ce_only_epochs == 2   # plug-in keys
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
    margin = next(line for line in lines if line.startswith("teacher.moco.margin = "))
    assert f"= {Config().teacher.moco.margin!r}  # " in margin
    assert any(line.startswith("student.ofd.distill_weight = ") for line in lines)
    assert load_config(overrides=[line.split("  # ")[0].replace(" = ", "=", 1).replace("'", "") for line in lines
                                  if line.startswith("teacher.")]).teacher == Config().teacher
