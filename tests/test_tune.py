"""The main job end to end, as users run it on a cluster: the script copied alone to another folder
(what `ray submit` does), smoke mode, data and every output on an S3 server (moto on 127.0.0.1,
reached through AWS_ENDPOINT_URL like real S3), killed mid-search and resumed from an empty local
disk, then `raypipe results` on the bucket."""
import io
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from raypipe import storage

REPO = Path(__file__).resolve().parents[1]


def wait_for_finished_trial(stage: str, proc: subprocess.Popen, log: Path, timeout: float) -> None:
    """Until Tune's experiment state in storage records a finished trial."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        assert proc.poll() is None, f"driver exited early with {proc.returncode}:\n{log.read_text()[-3000:]}"
        for name, _ in storage.list_dir(stage):
            if name.startswith("experiment_state-") and "TERMINATED" in storage.read_text(f"{stage}/{name}"):
                return
        time.sleep(2)
    raise TimeoutError(f"no finished trial in {stage} after {timeout} s:\n{log.read_text()[-3000:]}")


def trial_iterations(stage: str) -> dict[str, list[int]]:
    out = {}
    for name, is_dir in storage.list_dir(stage):
        if is_dir and storage.is_file(f"{stage}/{name}/result.json"):
            lines = storage.read_text(f"{stage}/{name}/result.json").splitlines()
            out[name] = [json.loads(line)["training_iteration"] for line in lines if line.strip()]
    return out


def cli(*args: str, env: dict, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "raypipe.cli", *args], env=env, capture_output=True, text=True,
                          timeout=timeout)


@pytest.mark.e2e
@pytest.mark.timeout(3600)
def test_smoke_main_job_on_s3_killed_and_resumed_from_empty_disk_then_results(ray_cluster, s3_server, tmp_path):
    script = tmp_path / "elsewhere" / "tune_margin.py"
    script.parent.mkdir()
    shutil.copy(REPO / "experiments" / "tune_margin.py", script)   # alone, as `ray submit` copies it
    base_env = {**os.environ, "RAY_ADDRESS": ray_cluster.get_runtime_context().gcs_address, "PYTHONUNBUFFERED": "1"}

    token = Path.home() / ".ray" / "auth_token"   # Ray's cluster token, shipped to every node

    def fresh_node(name: str) -> dict:   # an empty home and temp folder, as on a new head node
        for sub in ("home", "tmp"):
            (tmp_path / name / sub).mkdir(parents=True)
        return {**base_env, "HOME": str(tmp_path / name / "home"), "TMPDIR": str(tmp_path / name / "tmp"),
                **({"RAY_AUTH_TOKEN_PATH": str(token)} if token.is_file() else {})}

    env = fresh_node("node1")
    assert cli("demo-data", str(tmp_path / "demo"), "--train", "16", "--val", "8", "--test", "8", "--size", "32",
               env=env).returncode == 0
    data = f"{s3_server}/demo_parquet"
    conv = cli("data", "to-parquet", str(tmp_path / "demo"), data, env=env)
    assert conv.returncode == 0 and "train" in conv.stdout, conv.stderr[-2000:]
    storage_uri = f"{s3_server}/exp"
    # asha_max_t=1 < epochs=2: ASHA stops every searched trial after its first epoch, so the
    # test deterministically covers trials that start after an early stop (the resource-leak trap).
    cmd = [sys.executable, str(script), "--smoke", "--data", data, "--storage", storage_uri, "--name", "smoke",
           "tune.asha_max_t=1", "tune.max_concurrent_trials=1", "tune.sync_period=2"]
    log1 = open(tmp_path / "run1.log", "w")
    first = subprocess.Popen(cmd, cwd=script.parent, env=env, stdout=log1, stderr=subprocess.STDOUT,
                             start_new_session=True)
    exp = f"{storage_uri}/smoke"
    try:
        wait_for_finished_trial(f"{exp}/stage1_teacher", first, tmp_path / "run1.log", timeout=900)
    finally:
        try:
            os.killpg(first.pid, signal.SIGKILL)   # the driver (and its node) dies mid-search
        except ProcessLookupError:   # it died by itself: its error (and log) is the one raised above
            pass
        first.wait()
        log1.close()
    before = trial_iterations(f"{exp}/stage1_teacher")
    assert before and not storage.exists(f"{exp}/stage1_teacher.json")

    env = fresh_node("node2")
    with open(tmp_path / "run2.log", "w") as log2:   # written as it runs: what a timeout leaves to read
        limit = 2400   # generous: a slow CI machine runs the rest of the search at half the speed of a laptop
        try:
            second = subprocess.run(cmd, cwd=script.parent, env=env, stdout=log2, stderr=subprocess.STDOUT, text=True,
                                    timeout=limit)
        except subprocess.TimeoutExpired:
            pytest.fail(f"the resumed run took over {limit} s; its log:\n{(tmp_path / 'run2.log').read_text()[-4000:]}")
    output = (tmp_path / "run2.log").read_text()
    assert second.returncode == 0, output[-3000:]
    assert "[stage1_teacher] restoring" in output
    # output for people: a short log, no line twice in a row, no Ray internals, one line per epoch by role
    lines = output.splitlines()
    assert len(lines) < 150, f"{len(lines)} lines"
    assert not [a for a, b in zip(lines, lines[1:]) if a == b and a.strip()], "a line printed twice in a row"
    assert "core_worker.cc" not in output and "Connecting to existing Ray cluster" not in output
    assert "brand new training job" not in output and "TrainingReport(" not in output
    assert "Configuration for experiment" not in output and "Warning" not in output   # Tune's header, Ray's own
    assert "[stage2_student] leaderboard" in output and "| + 10-crop |" in output
    assert re.search(r"^\[stage3_final\] \w+ \(distill_0\)  epoch 1  loss ", output, re.M)

    after = trial_iterations(f"{exp}/stage1_teacher")
    assert len(after) == 2                                     # tune.teacher_trials, none duplicated
    finished_before = {t: its for t, its in before.items() if its}
    for trial, its in finished_before.items():
        assert after[trial] == its, f"finished trial {trial} was re-run"
    for stage in ("stage1_teacher", "stage2_student"):         # every searched trial stopped by ASHA
        for its in trial_iterations(f"{exp}/{stage}").values():
            assert its == [1]

    # everything the run produced is in the bucket, nothing in a local "s3:" folder
    summary = storage.read_json(f"{exp}/summary.json")
    rows = [r["configuration"] for r in summary["table"]]
    assert rows == ["supervised from scratch", "phase 1 + linear probe", "phase 1 + fine-tune",
                    "phase 1 + phase 2 (distill)", "+ 10-crop", "+ ensemble of 2 (10-crop)"]
    assert all(0 <= r["test_top1"] <= 100 for r in summary["table"]) and summary["n_test_images"] == 80
    assert set(summary["stage1_teacher"]["best_params"]) == {"teacher.moco.margin", "teacher.moco.temperature",
                                                            "teacher.moco.queue_size"}
    assert summary["stage1_teacher"]["paper_point"]["teacher.moco.margin"] == 0.4
    # the joint step: stage 1 exports its 2 best teachers, stage 2 gives each a student at the config's
    # values, stage 3 distils from the teacher of the winning student
    s1, s2 = storage.read_json(f"{exp}/stage1_teacher.json"), storage.read_json(f"{exp}/stage2_student.json")
    bests = sorted((t["best"] for t in s1["trials"] if t["best"] is not None), reverse=True)
    assert [t["rank"] for t in s1["teachers"]] == [1, 2] and [t["metric"] for t in s1["teachers"]] == bests[:2]
    assert len({t["teacher"] for t in s1["teachers"]}) == 2 and all(storage.is_file(t["teacher"]) for t in s1["teachers"])
    assert s2["best_metric"] == max(t["best"] for t in s2["trials"] if t["best"] is not None)
    chosen = s1["teachers"][s2["teacher_rank"] - 1]["teacher"]
    assert s2["best_config"]["teacher"] == s1["teachers"][s2["teacher_rank"] - 1]["config"]["teacher"]
    assert summary["teacher"] == storage.read_json(f"{exp}/stage3_final.json")["teacher"] == chosen
    assert f"stage 2 (student, val_top1 {s2['best_metric']:.2f}, from teacher {s2['teacher_rank']})" in \
        storage.read_text(f"{exp}/summary.md")
    assert storage.read_text(f"{exp}/summary.md").count("|") > 20 and "+ 10-crop" in output
    assert f"summary: {exp}/summary.md" in output
    models = {"teacher": summary["stage1_teacher"]["teacher"], **summary["models"]}
    for uri in models.values():
        assert uri.startswith(exp + "/") and storage.is_file(uri), uri
    for name in ("config.yaml", "stage1_teacher.json", "stage2_student.json", "stage3_final.json", "evaluation.json"):
        assert storage.is_file(f"{exp}/{name}"), name
    for row in ("supervised", "finetune", "distill", "distill_10crop", "ensemble_10crop"):
        report = storage.read_json(f"{exp}/eval/{row}/report.json")
        assert report["n_images"] == 80 and len(storage.read_bytes(f"{exp}/eval/{row}/confusion.png")) > 1000
    assert storage.read_json(f"{exp}/eval/ensemble_10crop/report.json")["views"] == "10-crop"
    for stage in ("stage1_teacher", "stage2_student", "stage3_final"):
        runs = [n for n, is_dir in storage.list_dir(f"{exp}/{stage}_runs") if is_dir]
        assert runs
        for run in runs:   # per-trial outputs next to the trial's checkpoints
            files = dict(storage.list_dir(f"{exp}/{stage}_runs/{run}"))
            assert {"metrics.csv", "data_report.json", "tensorboard", "train"} <= set(files), (stage, run, files)
            assert storage.read_json(f"{exp}/{stage}_runs/{run}/data_report.json")["train"]["images"] == 160
        trial_dirs = [n for n, is_dir in storage.list_dir(f"{exp}/{stage}") if is_dir]
        assert any(n.startswith("events.out.tfevents") for t in trial_dirs
                   for n, _ in storage.list_dir(f"{exp}/{stage}/{t}"))     # Tune's per-epoch TensorBoard
    assert not [p for p in tmp_path.rglob("s3:*")] and not Path("s3:").exists()

    # a third run, from yet another empty node, finds every stage done and only re-prints the table
    third = subprocess.run(cmd + ["--verbose"], cwd=script.parent, env=fresh_node("node3"), capture_output=True,
                           text=True, timeout=600)
    assert third.returncode == 0 and "[stage3_final] done before" in third.stdout
    assert "Connecting to existing Ray cluster" in third.stdout + third.stderr   # --verbose: Ray's INFO logs

    res = cli("results", exp, env=env)
    assert res.returncode == 0, res.stderr[-2000:]
    assert "stage1_teacher: leaderboard by knn_top1" in res.stdout and "teacher.moco.margin" in res.stdout
    assert "TERMINATED" in res.stdout and f"plots: {exp}/plots" in res.stdout
    report = storage.read_text(f"{exp}/report.md")   # summary, leaderboards and plots in one page
    assert "| + 10-crop |" in report and "## stage1_teacher: leaderboard by knn_top1" in report
    assert "![stage1_teacher_curves](plots/stage1_teacher_curves.png)" in report and "teacher:\n  moco:\n    margin:" in report
    for name in ("stage1_teacher_params.png", "stage1_teacher_curves.png", "stage1_teacher_importance.png",
                 "stage2_student_curves.png"):
        assert len(storage.read_bytes(f"{exp}/plots/{name}")) > 1000, name
    from raypipe.results import stored_study
    study = stored_study(storage.Outputs(exp), "stage1_teacher")   # the searcher's own study, read from the bucket
    assert len(study.trials) == 2 and study.trials[0].params["teacher/moco/margin"] == 0.4   # the config's point first
    assert {"teacher/moco/temperature", "teacher/moco/queue_size"} <= set(study.trials[1].params)
    students = stored_study(storage.Outputs(exp), "stage2_student")   # one student per teacher, at the config's point
    assert sorted(t.params["teacher_rank"] for t in students.trials) == [1, 2]
    assert {t.params["student/ofd/distill_weight"] for t in students.trials} == {1e-4}
    from PIL import Image
    legend = Image.open(io.BytesIO(storage.read_bytes(f"{exp}/plots/stage3_final_curves.png"))).text["Description"]
    assert {"supervised", "finetune", "distill_0", "distill_1"} <= set(legend.removeprefix("legend: ").split(" | "))
    curves = Image.open(io.BytesIO(storage.read_bytes(f"{exp}/plots/stage1_teacher_curves.png")))
    assert "margin " in curves.text["Description"]
    # a folder that is not an experiment, a missing bucket: a clear error naming it, nothing written
    wrong = cli("results", str(tmp_path / "elsewhere"), env=env, timeout=120)
    assert wrong.returncode == 2 and "is not a tune_margin experiment" in wrong.stderr
    assert not (tmp_path / "elsewhere" / "plots").exists()
    missing = cli("results", "s3://no-such-bucket-raypipe/exp", env=env, timeout=120)
    assert missing.returncode == 2 and "bucket 'no-such-bucket-raypipe' does not exist" in missing.stderr


def _reporting_trial(config: dict, ctx: dict) -> None:
    from ray import tune
    for epoch in range(2):
        tune.report({"knn_top1": 10 * config["teacher"]["moco"]["margin"] + epoch})


def test_trials_are_tracked_in_mlflow_when_asked(ray_cluster, tmp_path, monkeypatch):
    """tune.loggers=[mlflow]: Ray's MLflow callback logs every trial (config and per-epoch metrics)
    to the tracking server named by MLFLOW_TRACKING_URI, without code changes."""
    pytest.importorskip("mlflow", reason="MLflow tracking needs the test extra (mlflow-skinny)")
    from mlflow.tracking import MlflowClient
    from ray import tune

    from raypipe.config import load_config
    from raypipe.search import best_trial, run_tune_stage
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"file://{tmp_path}/mlruns")
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")   # MLflow 3 wants a server or a database otherwise
    cfg = load_config(overrides=["tune.loggers=[mlflow]", "tune.experiment=track", "tune.max_concurrent_trials=1"])
    grid = run_tune_stage("stage1_teacher", _reporting_trial, {"storage": str(tmp_path / "exp")}, cfg,
                          {"teacher.moco.margin": tune.uniform(0.0, 0.8)}, "knn_top1", 2, [{"teacher.moco.margin": 0.4}],
                          max_t=2)
    best, value = best_trial(grid, "knn_top1")          # ranked by the best epoch of each trial
    top = max(r.config["teacher"]["moco"]["margin"] for r in grid)
    assert best.config["teacher"]["moco"]["margin"] == top and value == pytest.approx(10 * top + 1)
    with pytest.raises(RuntimeError, match="no trial reported 'val_top1'"):
        best_trial(grid, "val_top1")
    client = MlflowClient(f"file://{tmp_path}/mlruns")
    experiment = client.get_experiment_by_name("track-stage1_teacher")
    runs = client.search_runs([experiment.experiment_id])
    assert len(runs) == 2
    margins = sorted(float(r.data.params["teacher/moco/margin"]) for r in runs)
    assert 0.4 in margins
    for r in runs:
        history = client.get_metric_history(r.info.run_id, "knn_top1")
        margin = float(r.data.params["teacher/moco/margin"])
        assert sorted(m.value for m in history) == pytest.approx([10 * margin, 10 * margin + 1])


def _teacher_scoring_trial(config: dict, ctx: dict) -> None:
    """Reports a val_top1 that depends only on the teacher the trial resolves (and the epoch)."""
    from ray import tune

    from raypipe.phase import trial_teacher
    config, teacher = trial_teacher(config, ctx)
    for epoch in range(2):
        tune.report({"val_top1": ctx["scores"][teacher] + epoch})


def test_stage2_gives_each_teacher_a_student_and_ranks_them_by_the_student(ray_cluster, tmp_path):
    """The student search's teacher choice through real Tune: one starting point per teacher at the config's
    values, each trial distilling from the teacher its rank names, and the winner's teacher chosen for stage 3."""
    from raypipe.config import load_config
    from raypipe.search import ranked_trials, run_tune_stage, student_space
    from raypipe.tune import chosen_teacher

    cfg = load_config(overrides=["tune.max_concurrent_trials=1", "student.ofd.distill_weight=2e-4"])
    space, points = student_space(cfg, 3)
    assert [p["teacher_rank"] for p in points] == [1, 2, 3] and all(p["student.ofd.distill_weight"] == 2e-4 for p in points)
    teachers = ["first.pt", "second.pt", "third.pt"]
    ctx = {"storage": str(tmp_path / "exp"), "teacher": "first.pt", "teachers": teachers,
           "scores": {"first.pt": 10.0, "second.pt": 30.0, "third.pt": 20.0}}
    grid = run_tune_stage("stage2_student", _teacher_scoring_trial, ctx, cfg, space, "val_top1", 3, points, max_t=2)
    ranked = ranked_trials(grid, "val_top1")           # by each trial's best epoch, best first
    assert [value for _, value in ranked] == [31.0, 21.0, 11.0]
    assert [r.config["teacher_rank"] for r, _ in ranked] == [2, 3, 1]
    assert all(r.config["student"]["ofd"]["distill_weight"] == 2e-4 for r, _ in ranked)
    s1 = {"teachers": [{"rank": i + 1, "teacher": t} for i, t in enumerate(teachers)]}
    assert chosen_teacher(s1, {"teacher_rank": ranked[0][0].config["teacher_rank"]})["teacher"] == "second.pt"
    # a record from before the choice existed: its one teacher
    old = {"best_metric": 1.0, "best_params": {}, "best_config": {}, "teacher": "only.pt"}
    assert chosen_teacher(old, {})["teacher"] == "only.pt"
