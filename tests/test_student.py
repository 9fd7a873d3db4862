"""Phase 2 on real Ray Train: a 2-epoch distill run from a 1-epoch teacher, 2 CPU workers."""
import json
from pathlib import Path

import pandas as pd
import pytest
import torch

from raypipe.checkpoints import load_classifier
from raypipe.errors import CheckpointError, ConfigError
from raypipe.phase import train_student
from raypipe.student import check_teacher


@pytest.mark.e2e
@pytest.mark.timeout(600)
def test_distill_two_workers_end_to_end(ray_cluster, tiny_config, trained_teacher, tmp_path):
    cfg = tiny_config("name=student", "resources.num_workers=2", "student.epochs=2", "student.ofd.ce_only_epochs=1",
                      "student.mode=distill", "student.export_final=true")
    final = train_student(cfg, trained_teacher)
    run = tmp_path / "runs" / "student"
    for name in ("config.yaml", "metrics.csv", "metrics.json", "student.pt", "data_report.json"):
        assert (run / name).is_file(), name
    history = pd.read_csv(run / "metrics.csv")
    assert history["epoch"].tolist() == [0, 1] and (history["world_size"] == 2).all()
    # CE-only warm-up: no distillation in epoch 0, then lambda * distill is part of the loss
    assert history.loc[0, "distill_weight"] == 0 and history.loc[1, "distill_weight"] == cfg.student.ofd.distill_weight
    assert history.loc[1, "distill"] > 0
    # the reported loss is CE + lambda * distill, epoch by epoch (warm-up: CE alone)
    for _, row in history.iterrows():
        assert row["loss"] == pytest.approx(row["ce"] + row["distill_weight"] * row["distill"], rel=1e-5)
    assert history.loc[0, "loss"] == pytest.approx(history.loc[0, "ce"], rel=1e-6)
    # every val image counted exactly once across the two workers
    assert (history["n_val"] == 32).all()
    net, payload = load_classifier(final["model"])
    assert payload["classes"] == ["circle", "square", "star", "stripes"] and payload["mode"] == "distill"
    assert net(torch.zeros(1, 3, 16, 16)).shape == (1, 4)
    summary = json.loads((run / "metrics.json").read_text())
    assert summary["best_val_top1"] == history["val_top1"].max()
    # the exported weights are the best epoch's by val top-1 (the first of equals), not the last epoch's
    best = int(history["val_top1"].idxmax())
    assert payload["best_epoch"] == summary["exported_epoch"] == best and payload["epochs_trained"] == 2
    last = torch.load(Path(final["checkpoint"]) / "state.pt", map_location="cpu", weights_only=False)
    same = all(torch.equal(v, last["model"][f"net.{k}"]) for k, v in net.state_dict().items())
    assert same == (best == 1)
    # student.export_final: the last epoch's weights beside them, under the other export rule
    last_net, last_payload = load_classifier(final["final_model"])
    assert (run / "student_final.pt").is_file() and last_payload["best_epoch"] is None
    assert all(torch.equal(v, last["model"][f"net.{k}"]) for k, v in last_net.state_dict().items())


def test_teacher_checks_before_training(tiny_config, trained_teacher, tmp_path):
    with pytest.raises(ConfigError, match="needs a teacher"):
        check_teacher(tiny_config("student.mode=distill"), None)
    with pytest.raises(CheckpointError, match="not found"):
        check_teacher(tiny_config(), tmp_path / "missing.pt")
    with pytest.raises(ConfigError, match="resnet18.*student.backbone=resnet34"):
        check_teacher(tiny_config("student.backbone=resnet34"), trained_teacher)
    with pytest.raises(ConfigError, match="stem_stride=1.*student.stem_stride=2"):
        check_teacher(tiny_config("student.stem_stride=2"), trained_teacher)
    torn = tmp_path / "torn.pt"
    torn.write_bytes(trained_teacher.read_bytes()[:1000])
    with pytest.raises(CheckpointError, match="unreadable"):
        check_teacher(tiny_config(), torn)
    payload = torch.load(trained_teacher, weights_only=False)
    payload["version"] = 99
    newer = tmp_path / "newer.pt"
    torch.save(payload, newer)
    with pytest.raises(CheckpointError, match="format version 99"):
        check_teacher(tiny_config(), newer)
    assert check_teacher(tiny_config("student.mode=supervised"), None) is None
