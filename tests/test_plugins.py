"""Plug-in points: phase-1 methods and phase-2 distillers registered from THIS file (no edit to
raypipe). Each owns its settings section (``teacher.<section>`` / ``student.<section>``), its
views, its checks and its search space; these reach the config, ``raypipe config --keys``, the
Tune search spaces, the data pipeline and the training step. The Ray-free loops
(``teacher.run`` / ``student.run`` over a ``loop.MemorySession``) run them without Ray; the
registered ones also train through the real TorchTrainer path (one Train worker actor)."""
import json
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
import yaml

from raypipe.config import Config, ConfigError, load_config
from raypipe.distillers import Distiller, register_distiller
from raypipe.methods import SSLMethod, register_method
from raypipe.models import arch_of, build_backbone, projection_head
from raypipe.settings import Section, check_range, opt, start_point
from raypipe.transforms import CropView, MocoView, make_views, views_on_device


@register_method("toy_simsiam")
class ToySimSiam(SSLMethod):
    """SimSiam without its BN layers: predictor on one view, stop-gradient on the other. No settings
    of its own and the default views (two MoCo v2 views)."""

    metric_names = ("cos_sim",)

    def __init__(self, cfg, world_size=1):
        super().__init__(cfg, world_size)
        net, dim = build_backbone(**arch_of(cfg.teacher))
        self.model = nn.ModuleDict({"backbone": net, "projector": projection_head(dim, 32, 16),
                                    "predictor": projection_head(16, 8, 16)})

    @property
    def backbone(self):
        return self.model["backbone"]

    def training_step(self, net, views, rt):
        view1, view2 = views
        m = net.module if hasattr(net, "module") else net
        z1, z2 = (m["projector"](m["backbone"](v)) for v in (view1, view2))
        p1, p2 = m["predictor"](z1), m["predictor"](z2)
        cos = 0.5 * (F.cosine_similarity(p1, z2.detach()).mean() + F.cosine_similarity(p2, z1.detach()).mean())
        return -cos, {"cos_sim": cos.detach()}


# ---- a method with its own settings, views, checks and search space ----------------------------
@dataclass(frozen=True)
class SmallCrop:
    """A recipe of the plug-in's own: a small, tight random crop (multi-crop's local view)."""

    resolution: int
    min_scale: float = 0.05
    max_scale: float = 0.4
    prefer_device: ClassVar[bool] = False

    def cpu(self):
        from torchvision.transforms import v2
        return v2.Compose([v2.RandomResizedCrop(self.resolution, scale=(self.min_scale, self.max_scale),
                                                antialias=True), v2.RandomHorizontalFlip()])

    def device(self):
        import kornia.augmentation as K
        r = self.resolution
        return K.AugmentationSequential(K.RandomResizedCrop((r, r), scale=(self.min_scale, self.max_scale)),
                                        K.RandomHorizontalFlip())


class MultiCropSettings(Section):
    """``teacher.multicrop``: two global views and one small local crop."""

    small_resolution: int = opt(8, "side of the small crop in pixels (< data.resolution)", ge=4, le=64)
    small_min_scale: float = opt(0.05, "small crop's random-resized-crop scale (x, 0.4)", gt=0.0, le=0.4)
    temperature: float = opt(0.5, "divides the cosine similarities", gt=0.0, le=5.0)
    temperature_range: list[float] = opt([0.1, 1.0], "main job, stage 1: temperature searched log-uniformly")
    small_resolutions: list[int] = opt([4, 8, 12], "main job, stage 1: candidates for small_resolution")


@register_method("toy_multicrop")
class ToyMultiCrop(SSLMethod):
    """Cosine similarity of the first global view's embedding to each other view's."""

    Settings = MultiCropSettings
    section = "multicrop"
    moved = {"teacher.small_crop": "small_resolution"}        # an old key of its own
    metric_names = ("views_seen", "small_side", "global_side")

    @classmethod
    def views(cls, cfg):
        s = cls.settings(cfg)
        return [MocoView(cfg.data.resolution)] * 2 + [SmallCrop(s.small_resolution, s.small_min_scale)]

    @classmethod
    def validate(cls, cfg):
        s = cls.settings(cfg)
        if s.small_resolution >= cfg.data.resolution:
            raise ConfigError(f"teacher.multicrop.small_resolution={s.small_resolution} must be smaller than "
                              f"data.resolution={cfg.data.resolution} (it is the small crop)")
        check_range("teacher.multicrop.temperature_range", s.temperature_range)

    @classmethod
    def search_space(cls, cfg, n_train):
        from ray import tune
        s = cls.settings(cfg)
        small = [r for r in s.small_resolutions if r < cfg.data.resolution]
        batches = [b for b in (8, 16, 32, 64) if b <= n_train // 2]      # at least 2 batches of the data
        space = {"teacher.multicrop.temperature": tune.loguniform(*s.temperature_range),
                 "teacher.multicrop.small_resolution": tune.choice(small),
                 "teacher.batch_size": tune.choice(batches)}
        point = {"teacher.multicrop.temperature": start_point(s.temperature, s.temperature_range),
                 "teacher.multicrop.small_resolution": min(small, key=lambda r: abs(r - s.small_resolution)),
                 "teacher.batch_size": min(batches, key=lambda b: abs(b - cfg.teacher.batch_size))}
        return space, point

    def __init__(self, cfg, world_size=1):
        super().__init__(cfg, world_size)
        net, dim = build_backbone(**arch_of(cfg.teacher))
        self.model = nn.ModuleDict({"backbone": net, "projector": projection_head(dim, 32, 16)})

    @property
    def backbone(self):
        return self.model["backbone"]

    def training_step(self, net, views, rt):
        m = net.module if hasattr(net, "module") else net
        z = [F.normalize(m["projector"](m["backbone"](v)), dim=1) for v in views]
        cos = torch.stack([(z[0] * other).sum(1).mean() for other in z[1:]]).mean()
        loss = -cos / self.settings(self.cfg).temperature
        return loss, {"views_seen": torch.tensor(float(len(views))),
                      "small_side": torch.tensor(float(views[-1].shape[-1])),
                      "global_side": torch.tensor(float(views[0].shape[-1]))}


# ---- a distiller with its own settings, view, checks and search space -------------------------
class FeatureL2Settings(Section):
    """``student.toy_feature_l2`` (its registered name: no ``section`` given)."""

    weight: float = opt(0.0, "lambda of the pooled-feature distance", ge=0.0, le=10.0)
    weight_range: list[float] = opt([1e-3, 1e-1], "main job, stage 2: lambda searched log-uniformly")
    crop_min_scale: float = opt(0.25, "its training view's random-resized-crop scale (x, 1)", gt=0.0, le=1.0)


@register_distiller("toy_feature_l2")
class ToyFeatureL2(Distiller):
    """CE + lambda x squared distance between the student's and the frozen teacher's pooled features."""

    Settings = FeatureL2Settings
    moved = {"student.l2_weight": "weight"}
    label = "phase 1 + feature L2"

    @classmethod
    def views(cls, cfg):
        return [CropView(cfg.data.resolution, cls.settings(cfg).crop_min_scale)]

    @classmethod
    def validate(cls, cfg):
        s = cls.settings(cfg)
        check_range("student.toy_feature_l2.weight_range", s.weight_range)
        if s.weight_range and s.weight_range[0] <= 0:
            raise ConfigError(f"student.toy_feature_l2.weight_range={s.weight_range} must start above 0 "
                              f"(searched log-uniformly)")

    @classmethod
    def search_space(cls, cfg):
        from ray import tune
        s = cls.settings(cfg)
        return ({"student.toy_feature_l2.weight": tune.loguniform(*s.weight_range)},
                {"student.toy_feature_l2.weight": start_point(s.weight, s.weight_range)})

    def build(self, net, teacher_state):
        frozen, _ = build_backbone(**self.arch)
        frozen.load_state_dict(teacher_state)
        self.teacher = frozen.requires_grad_(False)
        return super().build(net, teacher_state)

    def weight_at(self, epoch):
        return self.settings(self.cfg).weight

    def training_step(self, net, x, ce, epoch, rt):
        pooled = {}
        hook = self.student.net.fc.register_forward_pre_hook(lambda mod, args: pooled.setdefault("x", args[0]))
        try:
            logits = net(x)
        finally:
            hook.remove()
        with torch.no_grad():
            target = self.teacher(x)
        ce_loss = ce(logits.float())
        distill = (pooled["x"].float() - target.float()).pow(2).sum(1).mean()
        return ce_loss + self.weight_at(epoch) * distill, {"ce": ce_loss, "distill": distill}


MULTICROP = ["teacher.method=toy_multicrop", "data.resolution=16"]
FEATURE_L2 = ["student.mode=toy_feature_l2"]


# ---- names ----------------------------------------------------------------------------------
def test_unknown_names_are_config_errors_listing_the_registered_ones(tiny_config):
    with pytest.raises(ConfigError, match=r"teacher.method='byol' is not registered.*'moco'.*'toy_simsiam'"):
        tiny_config("teacher.method=byol")
    with pytest.raises(ConfigError, match=r"student.mode='kd' is not registered.*'distill'.*'toy_feature_l2'"):
        tiny_config("student.mode=kd")
    with pytest.raises(TypeError, match="not a subclass of SSLMethod"):
        register_method("bad")(ToyFeatureL2)
    with pytest.raises(TypeError, match="not a subclass of Distiller"):
        register_distiller("bad")(ToySimSiam)


# ---- (a) its settings in the config -----------------------------------------------------------
def test_a_plugins_own_section_takes_overrides_and_yaml_and_checks_its_bounds(tmp_path):
    cfg = load_config(overrides=[*MULTICROP, "teacher.multicrop.small_resolution=12",
                                 "teacher.multicrop.temperature=0.3", *FEATURE_L2, "student.toy_feature_l2.weight=0.5"])
    assert isinstance(cfg.teacher.multicrop, MultiCropSettings) and ToyMultiCrop.settings(cfg) is cfg.teacher.multicrop
    assert (cfg.teacher.multicrop.small_resolution, cfg.teacher.multicrop.temperature) == (12, 0.3)
    assert cfg.student.toy_feature_l2.weight == 0.5 and ToyFeatureL2.settings(cfg).weight == 0.5
    assert Config.from_dict(cfg.to_dict()) == cfg
    # every config has the registered plug-ins' sections, with their defaults, selected or not
    default = Config()
    assert default.teacher.multicrop == MultiCropSettings() and default.student.toy_feature_l2 == FeatureL2Settings()
    # from a YAML file, and its own old key lands at its new one
    path = tmp_path / "multicrop.yaml"
    path.write_text("data: {resolution: 16}\nteacher:\n  method: toy_multicrop\n  multicrop: {small_resolution: 6}\n"
                    "student:\n  mode: toy_feature_l2\n  toy_feature_l2: {weight: 0.2, crop_min_scale: 0.5}\n")
    from_file = load_config(path)
    assert from_file.teacher.multicrop.small_resolution == 6 and from_file.student.toy_feature_l2.weight == 0.2
    assert from_file.student.toy_feature_l2.crop_min_scale == 0.5
    assert load_config(overrides=[*MULTICROP, "teacher.small_crop=10"]).teacher.multicrop.small_resolution == 10
    assert load_config(overrides=["student.l2_weight=0.7"]).student.toy_feature_l2.weight == 0.7
    # out of bounds, wrong type, unknown key: errors naming the key (and the file)
    for overrides, words in (
            (["teacher.multicrop.small_resolution=2"], ["'teacher.multicrop.small_resolution' = 2", ">= 4"]),
            (["teacher.multicrop.small_resolution=100"], ["'teacher.multicrop.small_resolution' = 100", "<= 64"]),
            (["teacher.multicrop.temperature=0"], ["'teacher.multicrop.temperature'", "> 0"]),
            (["teacher.multicrop.small_min_scale=0.9"], ["'teacher.multicrop.small_min_scale'", "<= 0.4"]),
            (["teacher.multicrop.small_resolution=big"], ["'teacher.multicrop.small_resolution'", "int"]),
            (["teacher.multicrop.small_res=3"], ["'teacher.multicrop.small_res'", "'small_resolution'"]),
            (["student.toy_feature_l2.weight=-1"], ["'student.toy_feature_l2.weight' = -1", ">= 0"]),
            (["student.toy_feature_l2.weight=11"], ["'student.toy_feature_l2.weight' = 11", "<= 10"]),
            (["student.toy_feature_l2.lambda=1"], ["'student.toy_feature_l2.lambda'", "'weight'"])):
        with pytest.raises(ConfigError) as err:
            load_config(overrides=overrides)
        assert all(w in str(err.value) for w in words), (overrides, str(err.value))
    path.write_text("teacher:\n  multicrop: {small_resolution: 1}\n")
    with pytest.raises(ConfigError, match=r"multicrop\.yaml.*'teacher\.multicrop\.small_resolution' = 1"):
        load_config(path)
    path.write_text("student:\n  toy_feature_l2: {weigth: 1}\n")
    with pytest.raises(ConfigError, match=r"multicrop\.yaml.*'student\.toy_feature_l2\.weigth'"):
        load_config(path)


def test_a_plugins_validate_runs_when_it_is_selected():
    # the small crop must be smaller than the global views: checked only where the method is selected
    big = ["data.resolution=16", "teacher.multicrop.small_resolution=16"]
    assert load_config(overrides=big).teacher.multicrop.small_resolution == 16      # moco selected: not its business
    with pytest.raises(ConfigError, match=r"teacher\.multicrop\.small_resolution=16 must be smaller than "
                                          r"data\.resolution=16"):
        load_config(overrides=[*big, "teacher.method=toy_multicrop"])
    with pytest.raises(ConfigError, match=r"teacher\.multicrop\.temperature_range must be \[lo, hi\]"):
        load_config(overrides=[*MULTICROP, "teacher.multicrop.temperature_range=[1.0, 0.1]"])
    with pytest.raises(ConfigError, match=r"student\.toy_feature_l2\.weight_range=\[0\.0, 0\.1\] must start above 0"):
        load_config(overrides=[*FEATURE_L2, "student.toy_feature_l2.weight_range=[0.0, 0.1]"])
    load_config(overrides=["student.toy_feature_l2.weight_range=[0.0, 0.1]"])       # distill selected: fine
    # the built-in checks of a method not selected do not run either (MoCo's queue vs. the batch)
    load_config(overrides=[*MULTICROP, "teacher.moco.queue_size=100", "teacher.batch_size=32"])


# ---- (b) `raypipe config --keys` ------------------------------------------------------------------
def test_config_keys_lists_the_plugins_keys_and_config_prints_its_section(capsys):
    from raypipe.cli import main
    assert main(["config", "--keys"]) in (0, None)
    lines = capsys.readouterr().out.splitlines()
    keys = {line.split(" = ")[0]: line for line in lines}
    for key in ("teacher.multicrop.small_resolution", "teacher.multicrop.small_min_scale", "teacher.multicrop.temperature",
                "teacher.multicrop.temperature_range", "teacher.multicrop.small_resolutions",
                "student.toy_feature_l2.weight", "student.toy_feature_l2.weight_range",
                "student.toy_feature_l2.crop_min_scale"):
        assert key in keys, key
    assert keys["teacher.multicrop.small_resolution"] == \
        "teacher.multicrop.small_resolution = 8  # side of the small crop in pixels (< data.resolution)"
    assert keys["student.toy_feature_l2.weight"].startswith("student.toy_feature_l2.weight = 0.0  # lambda")
    assert main(["config", *MULTICROP, "teacher.multicrop.small_resolution=12", "student.l2_weight=0.3"]) == 0
    resolved = yaml.safe_load(capsys.readouterr().out)
    assert resolved["teacher"]["multicrop"]["small_resolution"] == 12
    assert resolved["student"]["toy_feature_l2"]["weight"] == 0.3 and "l2_weight" not in resolved["student"]
    assert main(["config", "teacher.multicrop.small_resolution=1"]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "teacher.multicrop.small_resolution" in err



# ---- (b') plug-ins defined outside this process reach the `raypipe` command ------------------------
OUTSIDE_PLUGIN = """
from raypipe.distillers import Distiller, register_distiller
from raypipe.settings import Section, opt


class OutsideSettings(Section):
    weight: float = opt(0.5, "a weight of the plug-in's own", ge=0.0)


@register_distiller("outside_kd")
class OutsideKD(Distiller):
    Settings = OutsideSettings
"""


def test_the_raypipe_command_imports_plugins_from_entry_points_and_the_environment(tmp_path):
    """The shell command has no script to import a plug-in first: it imports the modules installed
    packages declare (entry-point group ``raypipe.plugins``) and those in ``$RAYPIPE_PLUGINS``."""
    import os
    import subprocess
    import sys
    (tmp_path / "outside_plugin.py").write_text(OUTSIDE_PLUGIN)
    dist = tmp_path / "site" / "outside_pkg-1.0.dist-info"     # an installed package, as pip leaves it
    dist.mkdir(parents=True)
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: outside-pkg\nVersion: 1.0\n")
    (dist / "entry_points.txt").write_text("[raypipe.plugins]\nkd = outside_plugin\n")
    base = {k: v for k, v in os.environ.items() if k not in ("RAYPIPE_PLUGINS", "PYTHONPATH")}

    def config(*args, path=(tmp_path,), plugins=None):
        env = {**base, "PYTHONPATH": os.pathsep.join(map(str, path)), **({"RAYPIPE_PLUGINS": plugins} if plugins else {})}
        return subprocess.run([sys.executable, "-m", "raypipe.cli", "config", *args], env=env, capture_output=True,
                              text=True, timeout=120)

    override = ["student.mode=outside_kd", "student.outside_kd.weight=0.25"]
    plain = config(*override)                                    # importable, but nothing names it
    assert plain.returncode == 2 and "student.outside_kd.weight" in plain.stderr
    for done in (config(*override, plugins="outside_plugin"),                 # named in the environment
                 config(*override, path=(tmp_path, tmp_path / "site"))):      # declared by an installed package
        assert done.returncode == 0, done.stderr
        assert yaml.safe_load(done.stdout)["student"]["outside_kd"]["weight"] == 0.25
    bad = config(plugins="outside_plugin, no_such_plugin")
    assert bad.returncode == 2 and len(bad.stderr.strip().splitlines()) == 1, bad.stderr
    assert "'no_such_plugin' ($RAYPIPE_PLUGINS) failed to import: ModuleNotFoundError" in bad.stderr


# ---- (c) and (e) its search space reaches the main job's -----------------------------------------
def test_the_plugins_search_spaces_reach_the_main_jobs():
    from ray.tune.search.sample import Categorical, Float

    from raypipe.search import param_space, student_space, teacher_space
    from raypipe.settings import TEACHER_CHOICE
    cfg = load_config(overrides=[*MULTICROP, "teacher.multicrop.temperature=2.0", "teacher.batch_size=16",
                                 "tune.lr_range=[0.01, 0.1]", *FEATURE_L2, "student.toy_feature_l2.weight=0.05"])
    space, point = teacher_space(cfg, n_train=40)
    assert set(space) == {"teacher.multicrop.temperature", "teacher.multicrop.small_resolution", "teacher.batch_size",
                          "teacher.lr"}
    assert isinstance(space["teacher.multicrop.temperature"], Float)
    assert (space["teacher.multicrop.temperature"].lower, space["teacher.multicrop.temperature"].upper) == (0.1, 1.0)
    assert space["teacher.multicrop.small_resolution"].categories == [4, 8, 12]
    assert space["teacher.batch_size"].categories == [8, 16]                # n_train reached the plug-in
    assert point == {"teacher.multicrop.temperature": 1.0, "teacher.multicrop.small_resolution": 8,
                     "teacher.batch_size": 16, "teacher.lr": 0.03}
    assert teacher_space(cfg, n_train=200)[0]["teacher.batch_size"].categories == [8, 16, 32, 64]
    # a trial's config: the searched values at the plug-in's keys resolve to a valid config
    raw = param_space(cfg, space)
    assert isinstance(raw["teacher"]["multicrop"]["temperature"], Float)
    trial = cfg.with_overrides({"teacher.multicrop.temperature": 0.2, "teacher.multicrop.small_resolution": 4,
                                "teacher.batch_size": 8})
    assert (trial.teacher.multicrop.temperature, trial.teacher.multicrop.small_resolution) == (0.2, 4)

    space, points = student_space(cfg)
    assert set(space) == {"student.toy_feature_l2.weight"} and points == [{"student.toy_feature_l2.weight": 0.05}]
    assert (space["student.toy_feature_l2.weight"].lower, space["student.toy_feature_l2.weight"].upper) == (1e-3, 0.1)
    space, points = student_space(cfg.with_overrides({"tune.student_lr_range": [0.01, 1.0]}), teachers=2)
    assert set(space) == {"student.toy_feature_l2.weight", "student.lr", TEACHER_CHOICE}
    assert isinstance(space[TEACHER_CHOICE], Categorical)
    assert points == [{TEACHER_CHOICE: r, "student.toy_feature_l2.weight": 0.05, "student.lr": 0.1} for r in (1, 2)]
    # the selected plug-ins' spaces only: the built-ins' keys are not searched
    assert not any(k.startswith(("teacher.moco.", "student.ofd.")) for k in [*teacher_space(cfg, 40)[0], *space])


# ---- (d) its views reach the data pipeline and its training step --------------------------------
def decoded_batches(n_batches=2, size=8, side=20, classes=4, seed=0):
    """Batches of decoded images as Ray Data holds them (NHWC uint8, numpy)."""
    rng = np.random.default_rng(seed)
    return [{"img": rng.integers(0, 256, (size, side, side, 3), dtype=np.uint8),
             "label": np.arange(size) % classes, "idx": np.arange(b * size, (b + 1) * size)} for b in range(n_batches)]


def as_torch(batch: dict) -> dict:
    return {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in batch.items()}


def session_data(recipes, device_views: bool, resolution: int = 16) -> dict:
    """What the phase runner hands a worker: the training views (one column per recipe, made on
    CPU) or the decoded images (views made on the device), and centre crops for bank and val."""
    from raypipe.transforms import eval_view
    train = decoded_batches()
    if device_views:
        train_batches = [as_torch(b) for b in train]
    else:
        train_batches = [as_torch(make_views(b, recipes)) for b in train]
    evals = [as_torch(eval_view(b, resolution)) for b in decoded_batches(seed=1)]
    return {"train": train_batches, "bank": evals, "val": evals}


META = {"n_train": 16, "num_classes": 4, "print_epochs": False, "score_metric": None}
TINY_LOOP = ["teacher.epochs=2", "teacher.batch_size=8", "teacher.knn_k=4", "resources.num_workers=0", "teacher.stem_stride=2",
             "student.epochs=2", "student.batch_size=8", "student.stem_stride=2", "data.decode_size=20"]


def test_a_methods_views_become_columns_and_reach_its_training_step_without_ray():
    from raypipe import teacher
    from raypipe.loop import MemorySession
    cfg = load_config(overrides=[*MULTICROP, *TINY_LOOP, "teacher.multicrop.small_resolution=6"])
    recipes = teacher.method_class(cfg).views(cfg)
    assert recipes == [MocoView(16), MocoView(16), SmallCrop(6, 0.05)]
    # the data pipeline's CPU views: one uint8 column per recipe, each of its own size
    out = make_views(decoded_batches()[0], recipes)
    assert [k for k in out if k.startswith("view")] == ["view0", "view1", "view2"]
    assert [out[f"view{i}"].shape for i in range(3)] == [(8, 3, 16, 16)] * 2 + [(8, 3, 6, 6)]
    # its own recipe prefers the CPU: on GPUs with augment_on=auto the views stay on CPU; asked, on the device
    assert not views_on_device(recipes, "auto", use_gpu=True) and views_on_device(recipes, "device", use_gpu=False)
    assert views_on_device(teacher.method_class(load_config()).views(load_config()), "auto", use_gpu=True)
    for device_views in (False, True):
        session = MemorySession(session_data(recipes, device_views), device="cpu")
        teacher.run(cfg, {**META, "device_views": device_views, "score_metric": "knn_top1"}, session)
        assert [r["epoch"] for r in session.reports] == [0, 1]
        for report in session.reports:   # its step got three views: two global ones and its small crop
            assert (report["views_seen"], report["global_side"], report["small_side"]) == (3, 16, 6), report
            assert report["steps"] == 2 and 0 <= report["knn_top1"] <= 100 and "pos_sim" not in report
        assert set(session.state["model"]) == set(ToyMultiCrop(cfg).model.state_dict())


def test_a_distillers_view_and_settings_reach_its_training_step_without_ray():
    from raypipe import student
    from raypipe.loop import MemorySession
    cfg = load_config(overrides=[*FEATURE_L2, *TINY_LOOP, "data.resolution=16", "student.toy_feature_l2.weight=0.01",
                                 "student.toy_feature_l2.crop_min_scale=0.6"])
    recipes = student.distiller_class(cfg).views(cfg)
    assert recipes == [CropView(16, 0.6)]
    out = make_views(decoded_batches()[0], recipes)
    assert [k for k in out if k.startswith("view")] == ["view0"] and out["view0"].shape == (8, 3, 16, 16)
    teacher_state = build_backbone(**arch_of(cfg.student))[0].state_dict()
    data = session_data(recipes, device_views=False)
    session = MemorySession({"train": data["train"], "val": data["val"]}, device="cpu")
    student.run(cfg, {**META, "teacher": teacher_state, "score_metric": "val_top1"}, session)
    for report in session.reports:   # its own weight, from its own section, in its own loss
        assert report["distill_weight"] == 0.01 and report["distill"] > 0 and report["n_val"] == 16
        assert report["loss"] == pytest.approx(report["ce"] + 0.01 * report["distill"], rel=1e-4)


# ---- the registered plug-ins on Ray Train ----------------------------------------------------------
@pytest.mark.e2e
@pytest.mark.timeout(600)
def test_registered_method_and_distiller_train_through_torchtrainer(ray_cluster, tiny_config):
    from raypipe.checkpoints import load_classifier, load_exported
    from raypipe.phase import pretrain, train_student

    cfg = tiny_config("teacher.method=toy_simsiam", "resources.num_workers=1", "name=toy_teacher")
    teacher = pretrain(cfg)
    history = pd.read_csv(cfg.output_dir + "/toy_teacher/metrics.csv")
    assert len(history) == 1 and "cos_sim" in history and "pos_sim" not in history   # the toy's own step ran
    assert history["loss"][0] == pytest.approx(-history["cos_sim"][0], abs=1e-5)    # its loss is what trained
    net, payload = load_exported(teacher["teacher"], kind="teacher")
    assert payload["method"] == "toy_simsiam" and isinstance(net.fc, nn.Identity)

    cfg = tiny_config("student.mode=toy_feature_l2", "student.toy_feature_l2.weight=0.01", "resources.num_workers=1",
                      "name=toy_student")
    student = train_student(cfg, teacher["teacher"])
    metrics = json.loads(open(cfg.output_dir + "/toy_student/metrics.json").read())
    assert metrics["phase"] == "toy_feature_l2" and metrics["distill"] > 0 and metrics["distill_weight"] == 0.01
    assert metrics["loss"] == pytest.approx(metrics["ce"] + 0.01 * metrics["distill"], rel=1e-4)
    classifier, _ = load_classifier(student["model"])
    assert classifier.fc.out_features == 4
