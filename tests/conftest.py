"""Shared fixtures: tiny generated image sets on disk, ONE local Ray cluster per session (cluster
start dominates test time; two clusters on one host hang Train's cleanup) and a local S3 server.
Ray and the S3 server start only for the tests that use them.

Tiers: `pytest -m "not e2e"` (fast, the README's command) and `pytest -m e2e` (end to end: the main
job, worker and driver kills, multi-node, cold autoscaling, long fits). Both run in .ci/run."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

for _k, _v in {"RAY_DEDUP_LOGS": "0", "RAY_DATA_DISABLE_PROGRESS_BARS": "1", "RAY_USAGE_STATS_ENABLED": "0",
               "RAY_TRAIN_ENABLE_V2_MIGRATION_WARNINGS": "0", "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.2"}.items():
    os.environ.setdefault(_k, _v)

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "cifar10-50"
TINY_CLASSES = ("circle", "square", "star", "stripes")

# Small, fast settings every Ray test starts from: 16 px, ResNet-18, few images, few steps.
TINY = ["data.resolution=16", "data.decode_size=20", "data.aug_batch_size=32", "data.cpus_per_task=0.25",
        "resources.cpus_per_worker=0.5", "teacher.backbone=resnet18", "teacher.epochs=1",
        "teacher.batch_size=8", "teacher.moco.queue_size=32", "teacher.knn_k=10", "teacher.moco.proj_hidden=64",
        "student.backbone=resnet18", "student.epochs=1", "student.batch_size=8", "student.ofd.ce_only_epochs=0"]


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory) -> Path:
    """4 classes x (16 train, 8 val, 8 test) images of 32 px, real JPEG/PNG files."""
    from raypipe.demo import make_demo_data
    root = tmp_path_factory.mktemp("tiny")
    make_demo_data(root, {"train": 16, "val": 8, "test": 8}, size=32, classes=TINY_CLASSES)
    return root


S3_ENV = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_REGION": "us-east-1"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# The S3 server's address is fixed at session start, before any Ray cluster: a local cluster's
# raylet and workers inherit the driver's environment at ray.init, so they reach the server even
# though it starts later, and only if a test asks for it (the s3_server fixture).
S3_PORT = free_port()
os.environ.update({**S3_ENV, "AWS_ENDPOINT_URL": f"http://127.0.0.1:{S3_PORT}"})

# moto's server, stopped with the test session even when pytest itself is killed
_MOTO = ("import os, sys, threading, time\n"
         "parent = os.getppid()\n"
         "def watch():\n"
         "    while os.getppid() == parent:\n"
         "        time.sleep(1)\n"
         "    os._exit(0)\n"
         "threading.Thread(target=watch, daemon=True).start()\n"
         "from moto.server import main\n"
         "main(['-H', '127.0.0.1', '-p', sys.argv[1]])\n")


@pytest.fixture(scope="session")
def s3_server():
    """A real S3-compatible server (moto) on 127.0.0.1, reached like AWS through the standard
    environment variables (AWS_ENDPOINT_URL..., set at session start); -> a fresh bucket's URI.
    Started by the first test that uses it, stopped at the end."""
    pytest.importorskip("moto", reason="the S3 tests need the test extra: pip install -e '.[test]'")
    proc = subprocess.Popen([sys.executable, "-c", _MOTO, str(S3_PORT)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 60
        while True:
            try:
                socket.create_connection(("127.0.0.1", S3_PORT), timeout=1).close()
                break
            except OSError:
                assert proc.poll() is None and time.time() < deadline, "moto server did not start"
                time.sleep(0.2)
        import pyarrow.fs as pafs
        fs, _ = pafs.FileSystem.from_uri("s3://raypipe-test?allow_bucket_creation=true")
        fs.create_dir("raypipe-test")
        yield "s3://raypipe-test"
    finally:
        proc.terminate()
        proc.wait(timeout=30)


@pytest.fixture(scope="session")
def ray_cluster():
    """One local Ray for the whole session, 2 CPUs, dashboard on (Tune's early-stop cleanup needs it).
    Its workers get the S3 endpoint and credentials from the environment set at session start."""
    import ray
    from raypipe.cluster import ensure_ray
    # workers import helpers defined in test modules (e.g. a custom train loop) from tests/
    ensure_ray(num_cpus=2, runtime_env={"env_vars": {"PYTHONPATH": str(Path(__file__).parent)}})
    yield ray
    ray.shutdown()


def pytest_collection_modifyitems(config, items):
    """The multi-node and autoscaler tests last: their fixtures park the session's local cluster for
    a simulated multi-node one, and nothing after them needs the local one back."""
    items.sort(key=lambda item: bool({"three_nodes", "fake_cluster"} & set(getattr(item, "fixturenames", ()))))


@pytest.fixture
def tiny_config(tiny_data, tmp_path):
    from raypipe.config import load_config

    def make(*overrides: str):
        return load_config(overrides=[f"data.root={tiny_data}", f"output_dir={tmp_path / 'runs'}", *TINY,
                                      *overrides])
    return make


@pytest.fixture(scope="session")
def trained_teacher(ray_cluster, tiny_data, tmp_path_factory) -> Path:
    """A 1-epoch phase-1 teacher (Train local mode) shared by the phase-2 and evaluation tests."""
    from raypipe.config import load_config
    from raypipe.phase import pretrain
    out = tmp_path_factory.mktemp("teacher_runs")
    cfg = load_config(overrides=[f"data.root={tiny_data}", f"output_dir={out}", *TINY, "name=teacher",
                                 "resources.num_workers=0"])
    return Path(pretrain(cfg)["teacher"])
