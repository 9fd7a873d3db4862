"""Plug-in points: a phase-1 method and a phase-2 distiller registered from THIS file (no edit to
raypipe) train through the real TorchTrainer path (one Train worker actor)."""
import json

import pandas as pd
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from raypipe.config import ConfigError
from raypipe.distillers import Distiller, register_distiller
from raypipe.methods import SSLMethod, register_method
from raypipe.models import arch_of, build_backbone, projection_head


@register_method("toy_simsiam")
class ToySimSiam(SSLMethod):
    """SimSiam without its BN layers: predictor on one view, stop-gradient on the other."""

    metric_names = ("cos_sim",)

    def __init__(self, cfg, world_size=1):
        super().__init__(cfg, world_size)
        net, dim = build_backbone(**arch_of(cfg.teacher))
        self.model = nn.ModuleDict({"backbone": net, "projector": projection_head(dim, 32, 16),
                                    "predictor": projection_head(16, 8, 16)})

    @property
    def backbone(self):
        return self.model["backbone"]

    def training_step(self, net, view1, view2, rt):
        m = net.module if hasattr(net, "module") else net
        z1, z2 = (m["projector"](m["backbone"](v)) for v in (view1, view2))
        p1, p2 = m["predictor"](z1), m["predictor"](z2)
        cos = 0.5 * (F.cosine_similarity(p1, z2.detach()).mean() + F.cosine_similarity(p2, z1.detach()).mean())
        return -cos, {"cos_sim": cos.detach()}


@register_distiller("toy_feature_l2")
class ToyFeatureL2(Distiller):
    """CE + lambda x squared distance between the student's and the frozen teacher's pooled features."""

    def build(self, net, teacher_state):
        frozen, _ = build_backbone(**self.arch)
        frozen.load_state_dict(teacher_state)
        self.teacher = frozen.requires_grad_(False)
        return super().build(net, teacher_state)

    def weight_at(self, epoch):
        return self.cfg.student.distill_weight

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


def test_unknown_names_are_config_errors_listing_the_registered_ones(tiny_config):
    with pytest.raises(ConfigError, match=r"teacher.method='byol' is not registered.*'moco'.*'toy_simsiam'"):
        tiny_config("teacher.method=byol")
    with pytest.raises(ConfigError, match=r"student.mode='kd' is not registered.*'distill'.*'toy_feature_l2'"):
        tiny_config("student.mode=kd")
    with pytest.raises(TypeError, match="not a subclass of SSLMethod"):
        register_method("bad")(ToyFeatureL2)


def test_registered_method_and_distiller_train_through_torchtrainer(ray_cluster, tiny_config):
    from raypipe.student import load_classifier, load_exported, train_student
    from raypipe.teacher import pretrain

    cfg = tiny_config("teacher.method=toy_simsiam", "resources.num_workers=1", "name=toy_teacher")
    teacher = pretrain(cfg)
    history = pd.read_csv(cfg.output_dir + "/toy_teacher/metrics.csv")
    assert len(history) == 1 and "cos_sim" in history and "pos_sim" not in history   # the toy's own step ran
    assert history["loss"][0] == pytest.approx(-history["cos_sim"][0], abs=1e-5)    # its loss is what trained
    net, payload = load_exported(teacher["teacher"], kind="teacher")
    assert payload["method"] == "toy_simsiam" and isinstance(net.fc, nn.Identity)

    cfg = tiny_config("student.mode=toy_feature_l2", "student.distill_weight=0.01", "resources.num_workers=1",
                      "name=toy_student")
    student = train_student(cfg, teacher["teacher"])
    metrics = json.loads(open(cfg.output_dir + "/toy_student/metrics.json").read())
    assert metrics["phase"] == "toy_feature_l2" and metrics["distill"] > 0 and metrics["distill_weight"] == 0.01
    assert metrics["loss"] == pytest.approx(metrics["ce"] + 0.01 * metrics["distill"], rel=1e-4)
    classifier, _ = load_classifier(student["model"])
    assert classifier.fc.out_features == 4
