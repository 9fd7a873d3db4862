"""The worker loops of both phases run whole steps without Ray: ``teacher.run`` and ``student.run``
over a ``loop.MemorySession`` (batches from lists, reports kept in memory), on real torchvision
models and the real loss, optimiser, checkpoint state and resume."""
import pytest
import torch

from raypipe import teacher, student
from raypipe.config import load_config
from raypipe.loop import MemorySession
from raypipe.teacher import build_method

TINY = ["data.resolution=16", "teacher.backbone=resnet18", "teacher.epochs=2", "teacher.batch_size=8",
        "teacher.moco.queue_size=16", "teacher.knn_k=4", "teacher.moco.proj_hidden=32", "resources.num_workers=0",
        "student.epochs=2", "student.batch_size=8", "student.ofd.ce_only_epochs=1", "student.ofd.distill_weight=1e-3"]


def batches(columns, n_batches=2, size=8, classes=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for b in range(n_batches):
        batch = {c: torch.randint(0, 256, (size, 3, 16, 16), dtype=torch.uint8, generator=g) for c in columns}
        batch["label"] = torch.arange(size) % classes
        batch["idx"] = torch.arange(b * size, (b + 1) * size)
        out.append(batch)
    return out


def meta(**more):
    return {"n_train": 16, "num_classes": 4, "print_epochs": False, "score_metric": None, **more}


def test_phase1_steps_report_checkpoint_and_resume_without_ray():
    cfg = load_config(overrides=TINY)
    data = {"train": batches(("view0", "view1")), "bank": batches(("image",)), "val": batches(("image",), seed=1)}
    session = MemorySession(data, device="cpu")
    teacher.run(cfg, meta(score_metric="knn_top1"), session)
    assert [r["epoch"] for r in session.reports] == [0, 1]
    assert all(r["steps"] == 2 and 0 <= r["knn_top1"] <= 100 and r["loss"] > 0 for r in session.reports)
    state = session.state
    assert state["epoch"] == 1 and state["best"]["epoch"] in (0, 1)
    # 2 epochs x 2 steps x 8 keys went through the 16-key queue: the pointer wrapped to 0
    assert int(state["model"]["queue_ptr"]) == 0
    # the trained weights differ from a fresh method's, and a re-run resumes after the last epoch
    fresh = build_method(cfg).model.state_dict()
    assert not torch.equal(fresh["encoder_q.0.conv1.weight"], state["model"]["encoder_q.0.conv1.weight"])
    longer = load_config(overrides=[*TINY, "teacher.epochs=3"])
    resumed = MemorySession(data, device="cpu", resume=state)
    teacher.run(longer, meta(), resumed)
    assert [r["epoch"] for r in resumed.reports] == [2] and resumed.reports[0]["start_epoch"] == 2


@pytest.mark.parametrize("mode", ["distill", "supervised"])
def test_phase2_steps_without_ray(mode):
    cfg = load_config(overrides=[*TINY, f"student.mode={mode}"])
    teacher_state = build_method(cfg).backbone.state_dict() if mode == "distill" else None
    data = {"train": batches(("view0",)), "val": batches(("image",), seed=1)}
    session = MemorySession(data, device="cpu")
    student.run(cfg, meta(teacher=teacher_state, score_metric="val_top1"), session)
    first, second = session.reports
    assert first["steps"] == second["steps"] == 2 and first["n_val"] == 16
    if mode == "distill":   # CE only in the first epoch, then CE + lambda x OFD
        assert first["distill_weight"] == 0 and second["distill_weight"] == 1e-3 and second["distill"] > 0
        assert second["loss"] == pytest.approx(second["ce"] + 1e-3 * second["distill"], rel=1e-4)
    else:
        assert second["loss"] == pytest.approx(second["ce"], rel=1e-5)
    assert session.state["best"]["epoch"] in (0, 1)
