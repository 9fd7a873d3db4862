"""The search benchmark: its design, and replays of the stored table through the main job's own
searcher and scheduler (raypipe.search.make_searcher / make_scheduler), so the benchmark keeps
measuring the real search as the code changes."""
from pathlib import Path

import pandas as pd
import pytest

ROOT = Path(__file__).resolve().parents[1]
TABLE = ROOT / "bench" / "search" / "teachers.csv"


@pytest.fixture(scope="module")
def replay_mod():
    from bench import search_replay
    return search_replay


@pytest.fixture(scope="module")
def table(replay_mod):
    teachers = pd.read_csv(TABLE)
    return replay_mod.Table(teachers, [k for k in teachers.columns if k.startswith("teacher.")])


@pytest.fixture(scope="module")
def bench_cfg(replay_mod):
    from raypipe.config import load_config
    return load_config(ROOT / "experiments" / "configs" / "cifar10_50" / "base.yaml", replay_mod.BENCH_OVERRIDES)


def test_design_starts_at_the_recipe_and_fills_the_space():
    from experiments import search_bench as bench
    points = bench.design(12)
    assert points[0] == {"teacher.moco.margin": 0.4, "teacher.moco.temperature": 0.2, "teacher.moco.queue_size": 128,
                         "teacher.lr": 0.24}
    for p in points[1:]:
        assert 0 <= p["teacher.moco.margin"] <= 0.8 and 0.07 <= p["teacher.moco.temperature"] <= 0.5
        assert p["teacher.moco.queue_size"] in (32, 64, 128, 256, 480) and 0.06 <= p["teacher.lr"] <= 0.96
    assert len({p["teacher.moco.queue_size"] for p in points}) >= 4  # space-filling, not one corner
    assert bench.design(12) == points  # fixed: a resumed run continues the same design


def test_stored_table_holds_whole_curves(table):
    assert len(table.curves) >= 20
    assert all(len(c) == 100 for c in table.curves.values())
    assert table.nearest(table.params.iloc[3].to_dict()) == table.params.index[3]


def test_main_job_search_starts_from_the_recipe_and_asha_stops_by_grace_period(replay_mod, table, bench_cfg):
    recipe = table.curves[0]
    trace, finished = replay_mod.replay("tpe+asha", 0, bench_cfg, table, budget=1200, concurrency=1, max_t=100)
    # the first trial is the config's own point (the paper's values): the recipe's curve, reported every 10 epochs
    assert finished[0][0] == 0 and trace[0][:3] == (10, recipe[9], table.plateau[0])
    assert all(b2 >= b1 for (_, b1, *_), (_, b2, *_) in zip(trace, trace[1:]))
    # its wall clock: one trial at a time, the recipe's own epoch times from the table, added up
    assert trace[0][3] == pytest.approx(table.epoch_seconds[0][:10].sum())
    assert all(t2 > t1 for (*_, t1), (*_, t2) in zip(trace, trace[1:]))
    # default grace period: half the epochs, so no trial stops before epoch 50; some stop there
    assert min(e for _, e in finished) == 50 and any(e == 100 for _, e in finished)
    early = bench_cfg.with_overrides({"tune.grace_period": 2})
    _, finished_early = replay_mod.replay("tpe+asha", 0, early, table, budget=1200, concurrency=1, max_t=100)
    assert min(e for _, e in finished_early) < 50 and len(finished_early) > len(finished)


def test_random_search_without_scheduler_trains_every_trial_in_full(replay_mod, table, bench_cfg):
    trace, finished = replay_mod.replay("random", 1, bench_cfg, table, budget=500, concurrency=2, max_t=100)
    assert [e for _, e in finished] == [100] * 4 and trace[-1][0] == 500  # 2 more were cut by the budget
    assert finished[0][0] != 0 or finished[1][0] != 0  # no start point for the baseline
    # two trials side by side: 500 trial-epochs take about 250 epochs of wall time, each tick its slower epoch
    per_epoch = [s for c in table.epoch_seconds.values() for s in c]
    assert 250 * min(per_epoch) <= trace[-1][3] <= 250 * max(per_epoch)
    assert replay_mod.seconds_to_reach(trace, trace[-1][1]) <= trace[-1][3]
    assert replay_mod.seconds_to_reach(trace, 1000.0) == float("inf")


def test_grace_period_default_is_half_the_trial():
    from raypipe.config import load_config
    from raypipe.search import grace_period
    cfg = load_config()
    assert grace_period(cfg, 100) == 50 and grace_period(cfg, 3) == 1
    assert grace_period(cfg.with_overrides({"tune.grace_period": 5}), 100) == 5
    assert grace_period(cfg.with_overrides({"tune.grace_period": 5}), 3) == 3


def _students(finals: dict[tuple[int, int], float], knn: dict[int, float], epochs: int = 30) -> pd.DataFrame:
    """Student curves that end flat at the given final val with a one-epoch spike of +10 at epoch 15 (the
    best epoch is noise), each seed's rows as the runner writes them."""
    rows = []
    for (cid, seed), final in finals.items():
        for e in range(1, epochs + 1):
            rows.append({"config": cid, "student_seed": seed, "teacher_knn_top1": knn[cid], "epoch": e,
                         "val_top1": final * min(1.0, e / 20) + 10 * (e == 15)})
    return pd.DataFrame(rows)


def test_student_values_use_the_last_epochs_and_pool_the_seed_noise_within_teachers(replay_mod, table):
    finals = {(c, 0): 30.0 + c for c in range(6)} | {(0, 1): 32.0, (1, 1): 29.0}
    values = replay_mod.student_values(_students(finals, {c: 20.0 + c for c in range(6)}))
    first = values[values.student_seed == 0].set_index("config")
    assert first.loc[3, "final"] == pytest.approx(33.0) and first.loc[3, "best"] == pytest.approx(33 * 15 / 20 + 10)
    assert first.loc[3, "proxy10"] == pytest.approx(33.0 * 8 / 20)  # epochs 6..10
    out = replay_mod.correlations(table, _students(finals, {c: 20.0 + c for c in range(6)}))
    assert out["pairs"] == 6 and out["repeated_teachers"] == 2
    # teacher 0: 30 and 32, teacher 1: 31 and 29 -> deviations of 1 each, 4 values, 2 means -> sd sqrt(4/2)
    assert out["student_val_sd_seed"] == pytest.approx(2 ** 0.5)
    assert out["teacher_knn_vs_student_val"][0] == pytest.approx(1.0)
    # the same students run again: +1/-1 in turn -> differences of sd sqrt(6/5), per run that over sqrt(2)
    earlier = _students({(c, 0): 30.0 + c + (1 if c % 2 else -1) for c in range(6)}, {c: 20.0 + c for c in range(6)})
    out = replay_mod.correlations(table, _students(finals, {c: 20.0 + c for c in range(6)}), earlier)
    assert out["reruns"] == 6 and out["student_val_sd_rerun"] == pytest.approx((6 / 5) ** 0.5 / 2 ** 0.5)


def test_picking_by_an_objective_gains_only_as_far_as_it_ranks_the_students(replay_mod):
    values = pd.DataFrame({"final": [30.0, 32, 34, 36, 38, 40], "aligned": [1.0, 2, 3, 4, 5, 6],
                           "reversed": [6.0, 5, 4, 3, 2, 1]})
    best, lo, hi = replay_mod.selection_gain(values, "aligned", 4)
    assert best > 2 and lo <= best <= hi  # the best of 4 beats their mean
    assert replay_mod.selection_gain(values, "final", 4)[0] == pytest.approx(best)
    assert replay_mod.selection_gain(values, "reversed", 4)[0] < -2  # the worst of 4


def test_the_joint_step_keeps_the_best_student_among_stage_1s_top_teachers(replay_mod):
    """Stage 1 ranks by the teacher's k-NN (here reversed to the students), stage 2 keeps the best student
    of its top N on val, and the pick is scored on the column asked for (test: held out)."""
    values = pd.DataFrame({"teacher": [6.0, 5, 4, 3, 2, 1], "final": [30.0, 32, 34, 36, 38, 40],
                           "test": [40.0, 38, 36, 34, 32, 30]})
    first_only = replay_mod.selection_gain(values, "teacher", 6, top=1)[0]
    assert first_only == pytest.approx(30 - 35)                  # k-NN's first: the worst student
    assert replay_mod.selection_gain(values, "teacher", 6, top=2)[0] == pytest.approx(32 - 35)
    assert replay_mod.selection_gain(values, "teacher", 6, top=6)[0] == pytest.approx(40 - 35)  # every student
    assert replay_mod.selection_gain(values, "teacher", 6, top=2, against="first")[0] == pytest.approx(32 - 30)
    # chosen on val, scored on test: val and test disagree here, so the choice loses on test
    assert replay_mod.selection_gain(values, "teacher", 6, top=6, score="test")[0] == pytest.approx(30 - 35)


def test_a_benchmark_record_keeps_its_command_date_and_machine(tmp_path, monkeypatch):
    """bench/*.py write their figures to docs/bench/<script>.json, with what produced them."""
    import json

    from bench import record
    assert record.default_out(str(ROOT / "bench" / "search_replay.py")) == str(ROOT / "docs" / "bench" /
                                                                              "search_replay.json")
    monkeypatch.setattr("sys.argv", [str(ROOT / "bench" / "search_replay.py"), "--seeds", "2", "--plot", ""])
    record.write_record(tmp_path / "docs" / "r.json", {"target": 36.0})
    rec = json.loads((tmp_path / "docs" / "r.json").read_text())
    assert rec["command"] == "python bench/search_replay.py --seeds 2 --plot ''"
    assert rec["argv"] == ["python", "bench/search_replay.py", "--seeds", "2", "--plot", ""]
    assert rec["results"] == {"target": 36.0} and rec["date"][:2] == "20" and "CPU cores" in rec["machine"]
