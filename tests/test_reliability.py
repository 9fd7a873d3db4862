"""Fault injection on real Ray: killed workers, torn checkpoints, bad images, bad configs, and
no placement group or actor of a run left behind afterwards."""
import io
import json
import os
import shutil
import signal
import threading
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from raypipe.errors import ConfigError
from raypipe.phase import pretrain, train_student


def leftovers():
    """Placement groups and Train actors still alive in the cluster."""
    from ray.util.state import list_actors, list_placement_groups
    pgs = [p for p in list_placement_groups(limit=1000) if p.state in ("CREATED", "PENDING", "RESCHEDULING")]
    actors = [a for a in list_actors(limit=1000, filters=[("state", "=", "ALIVE")])
              if a.class_name in ("RayTrainWorker", "TrainController")]
    return pgs, actors


def assert_clean(timeout=30.0):
    deadline = time.time() + timeout
    while True:
        pgs, actors = leftovers()
        if not pgs and not actors:
            return
        if time.time() > deadline:
            raise AssertionError(f"left behind: placement groups {pgs}, actors {actors}")
        time.sleep(1)


@pytest.mark.e2e
@pytest.mark.timeout(900)
@pytest.mark.parametrize("phase", ["pretrain", "distill"])
def test_killed_worker_restarts_from_last_checkpoint(ray_cluster, tiny_config, trained_teacher, tmp_path, phase):
    from ray.util.state import list_actors
    common = ("name=kill", "resources.num_workers=2", "resources.max_failures=2")
    if phase == "pretrain":
        cfg = tiny_config(*common, "teacher.epochs=4", "teacher.moco.queue_size=32")
        run = lambda: pretrain(cfg)  # noqa: E731
    else:
        cfg = tiny_config(*common, "student.epochs=4", "student.mode=distill", "student.ofd.ce_only_epochs=1")
        run = lambda: train_student(cfg, trained_teacher)  # noqa: E731
    out = {}
    runner = threading.Thread(target=lambda: out.update(final=run()), daemon=True)
    runner.start()
    storage = tmp_path / "runs" / "kill" / "train"
    deadline = time.time() + 300
    snapshot = storage / "checkpoint_manager_snapshot.json"   # written once Train registered a checkpoint
    while not (snapshot.is_file() and "checkpoint_" in snapshot.read_text()):
        assert time.time() < deadline and runner.is_alive(), "no checkpoint was written"
        time.sleep(0.5)
    workers = [a for a in list_actors(filters=[("class_name", "=", "RayTrainWorker"), ("state", "=", "ALIVE")])]
    assert len(workers) == 2
    os.kill(int(workers[1].pid), signal.SIGKILL)   # one worker dies mid-run
    runner.join(timeout=400)
    assert "final" in out, "the run did not finish after the worker was killed"
    history = pd.read_csv(tmp_path / "runs" / "kill" / "metrics.csv")
    assert history["epoch"].tolist() == [0, 1, 2, 3]              # continuous, none lost or repeated
    assert history["start_epoch"].max() > 0                        # a restart resumed from a checkpoint
    restarted_at = int(history["start_epoch"].max())
    assert (history.loc[history.epoch < restarted_at, "start_epoch"] == 0).all()
    assert out["final"]["epochs"] == 4 and np.isfinite(out["final"]["loss"])
    assert_clean()


@pytest.mark.e2e
@pytest.mark.timeout(600)
def test_torn_newest_checkpoint_falls_back_to_previous(ray_cluster, tiny_config, tmp_path, capfd):
    cfg = tiny_config("name=torn", "resources.num_workers=1", "teacher.epochs=2", "resources.keep_checkpoints=3")
    pretrain(cfg)
    ckpts = sorted(p for p in (tmp_path / "runs" / "torn" / "train").glob("checkpoint_*") if p.is_dir())
    assert len(ckpts) == 2
    newest = ckpts[-1] / "state.pt"
    newest.write_bytes(newest.read_bytes()[: newest.stat().st_size // 2])   # interrupted write
    final = pretrain(cfg.with_overrides({"teacher.epochs": 3}))
    history = pd.read_csv(tmp_path / "runs" / "torn" / "metrics.csv")
    assert history["epoch"].tolist() == [0, 1, 2]
    assert history["start_epoch"].tolist() == [0, 1, 1]          # epoch 1 recomputed from epoch 0's state
    assert final["epochs"] == 3
    assert "resuming from the previous checkpoint" in capfd.readouterr().out
    assert_clean()


def _encode(img, fmt, **kw):
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


@pytest.mark.e2e
@pytest.mark.timeout(600)
def test_bad_images_are_converted_or_skipped_and_counted(ray_cluster, tiny_config, tiny_data, tmp_path):
    root = tmp_path / "mixed"
    shutil.copytree(tiny_data, root)
    folder = root / "train" / "circle"
    rng = np.random.default_rng(0)
    good_jpeg = _encode(Image.fromarray(rng.integers(0, 255, (64, 64, 3), np.uint8)), "JPEG")
    exif = Image.Exif()
    exif[0x0112] = 6
    files = {
        "zero.jpg": b"", "truncated.jpg": good_jpeg[: len(good_jpeg) // 3], "text.jpg": b"not an image at all",
        "one_pixel.png": _encode(Image.new("RGB", (1, 1), (9, 9, 9)), "PNG"),
        "huge.jpg": _encode(Image.new("RGB", (8000, 8000), (30, 60, 90)), "JPEG", quality=50),
        "sixteen_bit.png": _encode(Image.fromarray(rng.integers(0, 65535, (40, 40), np.uint16)), "PNG"),
        "cmyk.jpg": _encode(Image.new("CMYK", (40, 40), (10, 20, 30, 0)), "JPEG"),
        "palette_alpha.png": _encode(Image.new("P", (40, 40), 3), "PNG", transparency=3),
        "gray.png": _encode(Image.new("L", (40, 40), 77), "PNG"),
        "exif_rotated.jpg": _encode(Image.new("RGB", (60, 20), (200, 0, 0)), "JPEG", exif=exif.tobytes()),
    }
    for name, payload in files.items():
        (folder / name).write_bytes(payload)
    cfg = tiny_config(f"data.root={root}", "name=bad", "resources.num_workers=0")
    final = pretrain(cfg)
    report = json.loads((tmp_path / "runs" / "bad" / "data_report.json").read_text())
    skipped = {Path(s["path"]).name for s in report["train"]["skipped_files"]}
    assert skipped == {"zero.jpg", "truncated.jpg", "text.jpg"}
    assert report["train"]["images"] == 64 + 7 and final["skipped_images"] == 3
    assert json.loads((tmp_path / "runs" / "bad" / "metrics.json").read_text())["skipped_images"] == 3


def test_impossible_worker_count_fails_before_any_resource_is_asked(ray_cluster, tiny_config):
    cfg = tiny_config("name=toomany", "resources.num_workers=64", "teacher.batch_size=1", "teacher.moco.queue_size=64")
    started = time.time()
    with pytest.raises(ConfigError, match="num_workers=64.*cluster has CPU 2"):
        pretrain(cfg)
    assert time.time() - started < 20
    assert_clean(timeout=5)


def test_queue_longer_than_the_training_set_fails_before_anything_starts(tiny_config):
    """64 training images at a global batch of 8: K = 72 would keep stale duplicate keys. One error
    names both numbers and the longest valid K (64) before Ray or the run folder is touched."""
    import ray

    ray_was_up = ray.is_initialized()
    cfg = tiny_config("name=longqueue", "teacher.moco.queue_size=72")
    with pytest.raises(ConfigError,
                       match=r"teacher\.moco\.queue_size=72 exceeds the 64 training images.*use at most 64"):
        pretrain(cfg)
    assert ray.is_initialized() == ray_was_up
    assert not (Path(cfg.output_dir) / "longqueue").exists()


@pytest.mark.e2e
@pytest.mark.timeout(600)
def test_cold_autoscaling_cluster_gets_gpu_requests_not_cpu_training(ray_cluster, tiny_data, tmp_path):
    """resources.use_gpu=true on an autoscaling cluster whose GPU nodes do not exist yet: the run
    asks for GPUs (a pending placement group with GPU bundles, what the autoscaler launches nodes
    for) instead of training on CPU; when its driver dies, the request goes away."""
    import subprocess
    import sys

    from ray.util.state import list_placement_groups

    from conftest import TINY
    env = {**os.environ, "RAY_ADDRESS": ray_cluster.get_runtime_context().gcs_address, "RAYPIPE_AUTOSCALING": "1"}
    cmd = [sys.executable, "-m", "raypipe.cli", "pretrain", str(tiny_data), "--name", "cold", f"output_dir={tmp_path}",
           *TINY, "resources.use_gpu=true", "resources.num_workers=1"]
    log = open(tmp_path / "cold.log", "w")
    proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.time() + 240
        while True:
            pending = [p for p in list_placement_groups(detail=True, limit=1000) if p.state == "PENDING"]
            if any("'GPU'" in str(p.bundles) for p in pending):
                break
            assert proc.poll() is None, (tmp_path / "cold.log").read_text()[-2000:]
            assert time.time() < deadline, "no pending GPU request"
            time.sleep(1)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    assert not list(tmp_path.rglob("checkpoint_*")), "trained on CPU instead of waiting for GPUs"
    deadline = time.time() + 60
    while leftovers() != ([], []):
        assert time.time() < deadline, leftovers()
        time.sleep(1)
