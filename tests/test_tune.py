"""The main job end to end, as users run it: the script copied alone to another folder (what
`ray submit` does), smoke mode on demo data, killed mid-search and re-run, then `raypipe results`."""
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

REPO = Path(__file__).resolve().parents[1]


def wait_for_finished_trial(state_dir: Path, proc: subprocess.Popen, timeout: float) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        assert proc.poll() is None, f"driver exited early with {proc.returncode}"
        for f in state_dir.glob("experiment_state-*.json") if state_dir.is_dir() else []:
            if "TERMINATED" in f.read_text():
                return
        time.sleep(2)
    raise TimeoutError(f"no finished trial in {state_dir} after {timeout} s")


def trial_iterations(stage_dir: Path) -> dict[str, list[int]]:
    out = {}
    for result in stage_dir.glob("*/result.json"):
        rows = [json.loads(line) for line in result.read_text().splitlines() if line.strip()]
        out[result.parent.name] = [r["training_iteration"] for r in rows]
    return out


@pytest.mark.slow
def test_smoke_main_job_killed_and_resumed_then_results(ray_cluster, tmp_path):
    script = tmp_path / "elsewhere" / "tune_margin.py"
    script.parent.mkdir()
    shutil.copy(REPO / "experiments" / "tune_margin.py", script)   # alone, as `ray submit` copies it
    env = {**os.environ, "RAY_ADDRESS": ray_cluster.get_runtime_context().gcs_address, "PYTHONUNBUFFERED": "1"}
    # asha_max_t=1 < epochs=2: ASHA stops every searched trial after its first epoch, so the
    # test deterministically covers trials that start after an early stop (the resource-leak trap).
    cmd = [sys.executable, str(script), "--smoke", "--storage", str(tmp_path / "exp"), "--name", "smoke",
           "tune.asha_max_t=1", "tune.max_concurrent_trials=1"]
    log1 = open(tmp_path / "run1.log", "w")
    first = subprocess.Popen(cmd, cwd=script.parent, env=env, stdout=log1, stderr=subprocess.STDOUT,
                             start_new_session=True)
    exp = tmp_path / "exp" / "smoke"
    try:
        wait_for_finished_trial(exp / "stage1_teacher", first, timeout=400)
    finally:
        os.killpg(first.pid, signal.SIGKILL)   # the driver dies mid-search
        first.wait()
    before = trial_iterations(exp / "stage1_teacher")
    assert before and not (exp / "stage1_teacher.json").exists()

    second = subprocess.run(cmd, cwd=script.parent, env=env, capture_output=True, text=True, timeout=900)
    output = second.stdout + second.stderr
    (tmp_path / "run2.log").write_text(output)
    assert second.returncode == 0, output[-3000:]
    assert "[stage1_teacher] restoring" in output
    # output for people: a short log, no line twice in a row, no Ray internals, one line per epoch by role
    lines = output.splitlines()
    assert len(lines) < 150, f"{len(lines)} lines"
    assert not [a for a, b in zip(lines, lines[1:]) if a == b and a.strip()], "a line printed twice in a row"
    assert "core_worker.cc" not in output and "Connecting to existing Ray cluster" not in output
    assert "brand new training job" not in output and "TrainingReport(" not in output
    assert "[stage2_student] leaderboard" in output and "| + 10-crop |" in output
    assert re.search(r"^\[stage3_final\] \w+ \(distill_0\)  epoch 1  loss ", output, re.M)

    after = trial_iterations(exp / "stage1_teacher")
    assert len(after) == 2                                     # tune.teacher_trials, none duplicated
    finished_before = {t: its for t, its in before.items() if its}
    for trial, its in finished_before.items():
        assert after[trial] == its, f"finished trial {trial} was re-run"
    for stage in ("stage1_teacher", "stage2_student"):         # every searched trial stopped by ASHA
        for its in trial_iterations(exp / stage).values():
            assert its == [1]

    summary = json.loads((exp / "summary.json").read_text())
    rows = [r["configuration"] for r in summary["table"]]
    assert rows == ["supervised from scratch", "phase 1 + linear probe", "phase 1 + fine-tune",
                    "phase 1 + phase 2 (distill)", "+ 10-crop", "+ ensemble of 2 (10-crop)"]
    assert all(0 <= r["test_top1"] <= 100 for r in summary["table"]) and summary["n_test_images"] == 80
    assert set(summary["stage1_teacher"]["best_params"]) == {"teacher.margin", "teacher.temperature",
                                                            "teacher.queue_size"}
    assert summary["stage1_teacher"]["paper_point"]["teacher.margin"] == 0.4
    assert (exp / "summary.md").read_text().count("|") > 20 and "+ 10-crop" in output
    for name in summary["models"].values():
        assert Path(name).is_file()
    for row in ("supervised", "finetune", "distill", "distill_10crop", "ensemble_10crop"):
        report = json.loads((exp / "eval" / row / "report.json").read_text())
        assert report["n_images"] == 80 and (exp / "eval" / row / "confusion.png").stat().st_size > 1000
    assert json.loads((exp / "eval" / "ensemble_10crop" / "report.json").read_text())["views"] == "10-crop"

    # a third run finds every stage done and only re-prints the table
    third = subprocess.run(cmd + ["--verbose"], cwd=script.parent, env=env, capture_output=True, text=True,
                           timeout=300)
    assert third.returncode == 0 and "[stage3_final] done before" in third.stdout
    assert "Connecting to existing Ray cluster" in third.stdout + third.stderr   # --verbose: Ray's INFO logs

    res = subprocess.run([sys.executable, "-m", "raypipe.cli", "results", str(exp)], env=env,
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    assert "stage1_teacher: leaderboard by knn_top1" in res.stdout and "teacher.margin" in res.stdout
    assert "TERMINATED" in res.stdout
    for name in ("stage1_teacher_params.png", "stage1_teacher_curves.png", "stage1_teacher_importance.png",
                 "stage2_student_curves.png"):
        assert (exp / "plots" / name).stat().st_size > 1000, name
    from PIL import Image
    legend = Image.open(exp / "plots" / "stage3_final_curves.png").text["Description"]
    assert {"supervised", "finetune", "distill_0", "distill_1"} <= set(legend.removeprefix("legend: ").split(" | "))
    assert "margin " in Image.open(exp / "plots" / "stage1_teacher_curves.png").text["Description"]
    # a folder that is not an experiment: a clear error, nothing written there
    wrong = subprocess.run([sys.executable, "-m", "raypipe.cli", "results", str(tmp_path / "elsewhere")],
                           env=env, capture_output=True, text=True, timeout=120)
    assert wrong.returncode == 2 and "is not a tune_margin experiment" in wrong.stderr
    assert not (tmp_path / "elsewhere" / "plots").exists()
