"""experiments/tables.py: every generated block of the docs against its kept records (the runners' tables
from experiments/records/, the benchmarks' figures from docs/bench/), on the committed tree and on copies
where a record is gone or a number was edited by hand (no Ray, no training, no benchmark run)."""
import json
import re
import shutil
import sys
from pathlib import Path

import pytest

from bench import figures
from bench import runtime_env_hook as env_hook
from bench.record import write_record
from experiments import tables

REPO = Path(__file__).resolve().parents[1]


def states(root: Path) -> dict[str, tuple[str, str]]:
    return {f"{b.doc}[{b.name}]": (b.state, b.line()) for b in tables.blocks(root)}


@pytest.fixture
def tree(tmp_path):
    """A copy of the docs and the kept records: what the blocks are made from."""
    shutil.copytree(REPO / "docs", tmp_path / "docs")
    shutil.copytree(REPO / "experiments" / "records", tmp_path / "experiments" / "records")
    return tmp_path


def edit(path: Path, old: str, new: str) -> None:
    text = path.read_text()
    assert old in text, old
    path.write_text(text.replace(old, new, 1))


def test_committed_docs_are_their_records_and_the_check_names_what_is_missing(capsys):
    found = tables.blocks()
    assert {b.doc for b in found} == {Path("docs/results.md"), Path("docs/teacher_study.md"),
                                      Path("docs/benchmarks.md"), Path("docs/search.md")}
    # nothing committed is stale: every block whose records are here is exactly what they give
    assert all(b.state in (tables.OK, tables.MISSING, tables.LACKING) for b in found), \
        "\n".join(b.line() for b in found if b.state not in (tables.OK, tables.MISSING, tables.LACKING))
    for b in found:
        if b.state == tables.MISSING:   # named, with the command that makes it (or why none does)
            assert b.problems and (b.fixes or "no script writes it" in b.problems[0]), b.line()
        if b.state == tables.MISSING and b.name.startswith("figures:"):
            fig = next(f for f in figures.FIGURES if f"figures:{f.key}" == b.name)
            assert any(not (REPO / r).is_file() for r in fig.records)
    rc = tables.main(["--check"])
    out = capsys.readouterr().out
    assert rc == (1 if any(b.state != tables.OK for b in found) else 0)
    assert f"{len(found)} blocks:" in out
    # the search efficiency is given in trial-epochs, and its wall time is either in the records or named missing
    replay = next(b for b in found if b.name == "figures:search_replay")
    search = (REPO / "docs" / "search.md").read_text()
    assert "trial-epochs to 36.0" in search and "vs random's own trial-epochs" in search
    assert (replay.state == tables.LACKING) == ("Wall time is not in" in search)
    if replay.state == tables.LACKING:
        assert "search_replay.py --seeds 20 --grace-periods 2 10 25" in replay.line()


def test_check_fails_on_a_removed_record_or_an_edited_number_and_writing_fixes_only_what_records_give(
        tree, capsys):
    before = states(tree)
    assert before == states(REPO)   # the copy holds everything the blocks are made from
    results, search = tree / "docs" / "results.md", tree / "docs" / "search.md"
    # a number edited by hand inside a runner's table (its first seed mean) and inside a benchmark figure
    block = results.read_text().split("<!-- results:begin")[1]
    cell = re.search(r"\*\*(\d+\.\d\d) ± ", block)
    mean = cell.group(1)
    edited = f"{float(mean) + 2:.2f}"
    edit(results, cell.group(0), cell.group(0).replace(mean, edited))
    edit(search, "| rho with the plateau | 0.10 [-0.31, 0.48]", "| rho with the plateau | 0.20 [-0.31, 0.48]")
    after = states(tree)
    assert after["docs/results.md[results]"][0] == tables.STALE and mean in after["docs/results.md[results]"][1]
    assert after["docs/search.md[figures:search_rho]"][0] == tables.STALE
    assert tables.main(["--check"], root=tree) == 1
    out = capsys.readouterr().out
    assert "STALE    docs/results.md [results]" in out and "STALE    docs/search.md [figures:search_rho]" in out
    assert f"**{edited} ± " in results.read_text()   # --check rewrites nothing
    # writing restores both from their records, and leaves every other block as it was
    assert tables.main([], root=tree) == 0
    assert states(tree) == before
    assert results.read_text() == (REPO / "docs" / "results.md").read_text()
    assert search.read_text() == (REPO / "docs" / "search.md").read_text()

    # records removed: a step record of the CIFAR-10 table, a replay record of the search
    (tree / "experiments" / "records" / "cifar10_50" / "steps" / "supervised_s1.json").unlink()
    (tree / "docs" / "bench" / "search_replay_c4.json").unlink()
    gone = states(tree)
    state, line = gone["docs/results.md[results]"]
    assert state == tables.MISSING and "supervised_s1" in line and "python experiments/cifar10_50.py" in line
    # ... and the step is named among those not run yet, which a step with its record is not
    todo = next(b for b in tables.blocks(tree) if b.name == "results").todo
    assert "supervised_s1" in todo and "supervised_s0" not in todo
    assert "supervised_s1" not in next(b for b in tables.blocks(REPO) if b.name == "results").todo
    state, line = gone["docs/search.md[figures:search_replay]"]
    assert state == tables.MISSING and "no record docs/bench/search_replay_c4.json" in line
    assert "--concurrency 4" in line   # the command that writes it
    assert tables.main(["--check"], root=tree) == 1
    # a block whose records are missing is never rewritten (its recorded figures stay until they are re-made)
    assert tables.main([], root=tree) == 0
    assert results.read_text() == (REPO / "docs" / "results.md").read_text()
    assert search.read_text() == (REPO / "docs" / "search.md").read_text()


def record(tree: Path, monkeypatch, name: str, argv: list[str], results) -> None:
    """A record as the benchmark writes it (bench/record.py), under the copy's docs/bench."""
    monkeypatch.setattr(sys, "argv", [str(REPO / "bench" / f"{argv[0]}.py"), *argv[1:]])
    write_record(tree / "docs" / "bench" / f"{name}.json", results)


def test_benchmark_records_become_their_blocks(tree, monkeypatch):
    """Each benchmark's record, in the shape its script writes it, is rendered into its block of the doc
    with its command; the hand-written text around the blocks stays."""
    feed = {f"workers{w}_{f}": {"images_per_s": 90.0 + w, "ray_cpus_held": 1.1, "train_cpus": float(w),
                                "data_cpus": 0.07, "wall_s": 30.0} for w in (0, 1) for f in ("premade", "cpu", "device")}
    phases = {"device": "NVIDIA H200", "torch": "2.11.0+cu130", "backbone": "resnet50", "resolution": 224,
              "batch": 256, "cpu_workers": 15, "aug_device_two_view": 5469.0, "aug_cpu_two_view_per_core": 15.8,
              "phase1": {"premade": 1107.0, "device": 853.0, "cpu": 28.0},
              "phase2": {"premade": 2566.0, "device": 1884.0, "cpu": 2496.0, "premade + compile": 2400.0}}
    row = {"dataloader_img_s": [623.0, 790.0, 806.0], "ray_data_img_s": [63.0, 440.0, 446.0], "cold_ratio": 0.1,
           "steady_ratio": 0.56}
    made = {
        "data_path": ["data_path", "--workers", "2"], "data_path_demo5000": ["data_path", "--demo-per-class", "500"],
        "trainer_overhead": ["trainer_overhead", "--epochs", "4"], "stem_stride": ["stem_stride", "--steps", "8"],
        "augment": ["augment", "--sizes", "32", "224"], "phase1_views": ["phase1_views", "--epochs", "4"],
        "gpu_phases": ["gpu_phases", "--seconds", "8"], "gpu_phases_tiny": ["gpu_phases", "--tiny"],
        "phase1_feed": ["phase1_feed", "--workers", "0", "1"], "phase1_feed_2nodes": ["phase1_feed", "--nodes", "2"],
        "cluster_startup": ["cluster_startup"], "runtime_env_hook": ["runtime_env_hook", "--epochs", "6"]}
    job = {"to_running_s": 1.3, "to_first_line_s": 1.3, "to_first_epoch_line_s": 71.0, "to_end_s": 78.1, "lines": []}
    results = {
        "data_path": {"args": {}, "results": [{"set": "cifar10-50 train (500 x 32 px -> 64)", **row},
                                              {"set": "demo (500 x 64 px)", **row}]},
        "data_path_demo5000": {"args": {}, "results": [{"set": "cifar10-50 train (500 x 32 px -> 64)", **row},
                                                       {"set": "demo (5000 x 64 px)", **row, "steady_ratio": 0.65}]},
        "trainer_overhead": {"images": 200, "epochs": 4, "plain_epoch_s": [12.0, 10.3, 10.4, 10.4],
                             "train_epoch_s": [13.0, 10.2, 10.3, 10.2], "plain_wall_s": 45.5, "train_wall_s": 72.4,
                             "steady_ratio": 0.99, "wall_ratio": 1.59},
        "stem_stride": {"batch": 32, "resolution": 32, "threads": 2, "stride1_train_img_s": 51.1,
                        "stride1_eval_img_s": 196.5, "stride2_train_img_s": 205.4, "stride2_eval_img_s": 764.9,
                        "train_speedup": 4.02, "eval_speedup": 3.89},
        "augment": [{"resolution": 32, "per_image_cpu": 608.0, "batched_kornia_cpu": 2867.0, "ratio": 4.71},
                    {"resolution": 224, "per_image_cpu": 58.8, "batched_kornia_cpu": 25.5, "ratio": 0.43}],
        "phase1_views": {"cpu": {"images_per_s": 91.4, "wall_s": 26.0}, "device": {"images_per_s": 101.7, "wall_s": 24.0},
                         "ratio": 1.11},
        "gpu_phases": phases,
        "gpu_phases_tiny": {**phases, "device": "cpu", "phase1": {"premade": 100.0, "premade + compile": 85.0}},
        "phase1_feed": {"nodes": 1, **feed},
        "cluster_startup": {"cpu_scale": 0.25, "images": 320, "epochs": 4, "cluster_start_s": 6.0, "cold": job,
                            "warm": [job, job], "warm_first_epoch_line_s": {"median": 71.0, "min": 71.0, "max": 71.0,
                                                                           "each": [71.0, 71.0]},
                            "scaling": {"1": {"images_per_s": 17.0, "nodes": 1, "wall_s": 151.0},
                                        "2": {"images_per_s": 20.1, "nodes": 2, "wall_s": 172.0},
                                        "ratio_2_vs_1": 1.18}},
        "phase1_feed_2nodes": {"nodes": 2, **{f"workers2_{f}": v for f, v in
                                              {"premade": feed["workers1_premade"], "cpu": feed["workers1_cpu"]}.items()}}}
    # each variant's run as bench/runtime_env_hook.py's child process returns it, summed up as the script does
    raypipe_env = {"env_vars": {"RAY_DEDUP_LOGS": "0", "RAY_TRAIN_ENABLE_PRINT_PATCH": "0"}}
    rates = {"none": [60.0, 80.0, 88.0, 85.0, 90.0, 93.0], "env_vars": [35.0, 41.0, 98.0, 96.0, 104.0, 101.0],
             "hook": [12.0, 14.0, 15.0, 15.0, 16.0, 13.0]}
    runs = {v: {"runtime_env": env_hook.describe(env_hook.variant_runtime_env(v, raypipe_env)), "epochs": list(range(6)),
                "images_per_s": rates[v], "wall_s": 60.0, "worker_pids": {"none": 5, "env_vars": 6, "hook": 36}[v],
                "images": 500} for v in env_hook.VARIANTS}
    results["runtime_env_hook"] = env_hook.summarize(runs, 6)
    assert results["runtime_env_hook"]["variants"]["hook"]["runtime_env"] == {
        "env_vars": ["RAY_DEDUP_LOGS", "RAY_TRAIN_ENABLE_PRINT_PATCH"], "worker_process_setup_hook": "quiet_logging"}
    for name, argv in made.items():
        record(tree, monkeypatch, name, argv, results[name])
    # the replay with its wall time (what bench/search_replay.py now writes)
    for name in ("search_replay", "search_replay_c4"):
        path = tree / "docs" / "bench" / f"{name}.json"
        rec = json.loads(path.read_text())
        for m in rec["results"]["methods"].values():
            m["median_seconds_to_target"] = m["median_epochs_to_target"] * 2.2 / rec["results"]["concurrency"]
        path.write_text(json.dumps(rec))
    bench_doc, search_doc = tree / "docs" / "benchmarks.md", tree / "docs" / "search.md"
    old_bench = bench_doc.read_text()
    assert tables.main([], root=tree) == 0
    found = {b.name: b for b in tables.blocks(tree)}
    rendered = [f"figures:{f.key}" for f in figures.FIGURES]
    assert all(found[name].state == tables.OK for name in rendered), \
        "\n".join(found[n].line() for n in rendered if found[n].state != tables.OK)
    text = bench_doc.read_text()
    assert "python bench/runtime_env_hook.py --epochs 6\n" in text
    assert "| `ray.init(runtime_env=...)` of the job | images/s, epochs 0-5 | mean, epochs 3-5 | vs `env_vars` only " \
           "| worker processes started |" in text
    assert "| none | 60.0 / 80.0 / 88.0 / 85.0 / 90.0 / 93.0 | 89.3 | 0.89x | 5 |" in text
    assert "| `env_vars` only (what raypipe passes) | 35.0 / 41.0 / 98.0 / 96.0 / 104 / 101 | 100 | 1.00x | 6 |" in text
    assert "| `env_vars` + `worker_process_setup_hook` | 12.0 / 14.0 / 15.0 / 15.0 / 16.0 / 13.0 | 14.7 | **0.15x** " \
           "| 36 |" in text
    assert "python bench/trainer_overhead.py --epochs 4\n" in text and "| demo (5000 x 64 px) |" in text
    assert "| 1 (MoCo v2 + margin, two views) | premade on the GPU (the step alone) | 1,107 | 1.00 |" in text
    assert all("No record" not in tables.split_figure(text, f)[1] for f in figures.FIGURES if f"figures:{f.key}" in
               rendered and f.doc == figures.BENCH)
    # the hand-written text between the blocks is untouched
    for fig in figures.FIGURES:
        if fig.doc == figures.BENCH:
            old_bench = tables.split_figure(old_bench, fig)[0] + "@" + tables.split_figure(old_bench, fig)[2]
            text = tables.split_figure(text, fig)[0] + "@" + tables.split_figure(text, fig)[2]
    assert text == old_bench
    search = search_doc.read_text()
    assert "Wall time is not in" not in search and "not recorded" not in search
    assert "| **TPE + ASHA, the main job (grace 50 = half the epochs, the default)** | 550 | 0.34x | 0.92x | 20.2 min " \
           "| 0.92x |" in search
    assert "2 workers vs 1: **1.18x** the images/s (320 images, 4 epochs)" in bench_doc.read_text()
    # every block is now what its records give (planned steps not run yet are named, not failed)
    assert all(b.state == tables.OK for b in found.values()), [b.line() for b in found.values() if b.state != tables.OK]
    assert tables.main(["--check"], root=tree) == 0
