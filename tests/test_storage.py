"""The storage layer against a real S3-compatible server (moto on 127.0.0.1, reached through
AWS_ENDPOINT_URL like real S3), and the standalone commands writing their runs to a bucket."""
import os
import subprocess
import sys

import pytest

from raypipe import storage


def test_files_and_folders_round_trip_through_s3(s3_server, tmp_path):
    root = f"{s3_server}/unit"
    storage.write_json(f"{root}/a/b.json", {"x": 1})
    assert storage.read_json(f"{root}/a/b.json") == {"x": 1} and storage.read_json(f"{root}/a/none.json") is None
    assert storage.list_dir(root) == [("a", True)] and storage.is_dir(f"{root}/a") and not storage.exists(f"{root}/zz")
    (tmp_path / "d" / "sub").mkdir(parents=True)
    (tmp_path / "d" / "sub" / "f.txt").write_text("hi")
    storage.upload(tmp_path / "d", f"{root}/up")
    assert storage.read_text(f"{root}/up/sub/f.txt") == "hi"
    storage.download(f"{root}/up", tmp_path / "back")
    assert (tmp_path / "back" / "sub" / "f.txt").read_text() == "hi"
    # an experiment's outputs: files made locally, published, read back from the bucket only
    out = storage.Outputs(f"{root}/exp/")
    assert out.location == f"{root}/exp" and out.scratch.is_dir() and "s3:" not in str(out.scratch)
    out.local("eval", "x", "report.json").write_text("{}")
    assert out.publish("eval", "x", "report.json") == f"{root}/exp/eval/x/report.json"
    assert storage.read_text(f"{root}/exp/eval/x/report.json") == "{}"
    out.write_record("stage1_teacher", {"best": 1.5})
    assert storage.Outputs(f"{root}/exp").read_record("stage1_teacher") == {"best": 1.5}
    local = storage.Outputs(str(tmp_path / "loc"))
    assert local.scratch == tmp_path / "loc" and local.publish() == str(tmp_path / "loc")   # same place: no copy


def test_local_mode_checkpoints_follow_the_run_to_the_bucket_and_keep_the_newest(s3_server, tmp_path):
    from raypipe.checkpoints import STATE_FILE, LocalCheckpoints, load_state_file

    location = f"{s3_server}/local_ckpt"
    node = LocalCheckpoints(str(tmp_path / "node1"), location, keep=2)
    for epoch in range(4):
        node.save({"epoch": epoch}, epoch)
    kept = ["checkpoint_epoch_0002", "checkpoint_epoch_0003"]
    assert sorted(p.name for p in (tmp_path / "node1").iterdir()) == kept
    assert storage.list_dir(location) == [(name, True) for name in kept]
    # a fresh node: nothing local, the newest complete checkpoint comes from the bucket
    fresh = LocalCheckpoints(str(tmp_path / "node2"), location, keep=2)
    assert load_state_file(fresh.newest() / STATE_FILE) == {"epoch": 3}
    # a folder without its state file (an upload that never finished) is passed over
    storage.write_text(f"{location}/checkpoint_epoch_0004/other.txt", "")
    assert load_state_file(LocalCheckpoints(str(tmp_path / "node3"), location).newest() / STATE_FILE) == {"epoch": 3}
    assert LocalCheckpoints(str(tmp_path / "node4"), f"{s3_server}/none").newest() is None


def test_bad_uris_name_the_uri(s3_server):
    with pytest.raises(storage.StorageError, match="cannot write to s3://no-such-bucket-raypipe/x: .*does the bucket exist"):
        storage.check_writable("s3://no-such-bucket-raypipe/x")
    assert "bucket 'no-such-bucket-raypipe' does not exist" in storage.missing_hint("s3://no-such-bucket-raypipe/x")
    assert storage.missing_hint(f"{s3_server}/nothing/here") == ""
    with pytest.raises(storage.StorageError, match="unsupported storage URI 'ftp://host/x'"):
        storage.normalize("ftp://host/x")
    with pytest.raises(FileNotFoundError, match=f"not found: {s3_server}/nothing.json"):
        storage.read_bytes(f"{s3_server}/nothing.json")


@pytest.mark.e2e
@pytest.mark.timeout(1200)
def test_standalone_commands_keep_their_runs_in_the_bucket(ray_cluster, s3_server, tiny_data, tmp_path):
    from conftest import TINY
    env = {**os.environ, "RAY_ADDRESS": ray_cluster.get_runtime_context().gcs_address}
    data = storage.upload(tiny_data, f"{s3_server}/standalone/data")
    runs = f"{s3_server}/standalone/runs"

    def cli(*args):
        done = subprocess.run([sys.executable, "-m", "raypipe.cli", *args], env=env, cwd=tmp_path,
                              capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
        return done.stdout

    cli("pretrain", data, "--name", "t1", f"output_dir={runs}", *TINY, "resources.num_workers=1")
    files = dict(storage.list_dir(f"{runs}/t1"))
    assert {"config.yaml", "data_report.json", "metrics.csv", "metrics.json", "tensorboard", "teacher.pt",
            "train"} <= set(files), files
    assert storage.read_json(f"{runs}/t1/metrics.json")["teacher"] == f"{runs}/t1/teacher.pt"
    assert any(n.startswith("checkpoint_") for n, _ in storage.list_dir(f"{runs}/t1/train"))
    cli("export", f"{runs}/t1/teacher.pt", "--out", f"{runs}/t1/export", "--no-onnx")
    assert storage.read_json(f"{runs}/t1/export/teacher.json")["kind"] == "teacher"
    assert len(storage.read_bytes(f"{runs}/t1/export/teacher.state_dict.pt")) > 1_000_000
    cli("linear-probe", data, "--teacher", f"{runs}/t1/teacher.pt", "--epochs", "5", "--lr", "1",
        "--out", f"{runs}/t1/probe.json", *TINY)
    assert 0 <= storage.read_json(f"{runs}/t1/probe.json")["val_top1"] <= 100
    assert not list(tmp_path.rglob("s3:*"))
