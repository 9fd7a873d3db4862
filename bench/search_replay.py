"""Replays searchers on the search benchmark (bench/search/teachers.csv: real phase-1 runs with their
k-NN curves, made by experiments/search_bench.py), many seeds each, in seconds: the searcher and
scheduler are the main job's own objects (``raypipe.search.make_searcher`` / ``make_scheduler``:
Optuna TPE from the config's point + Tune's ASHA), driven through Tune's Searcher / TrialScheduler
calls by a simulated clock of one epoch per tick; a suggested configuration trains as the nearest
configuration of the table (unit cube: margin linear, temperature, K and lr logarithmic).

Reported: the best k-NN seen against epochs of compute (median and quartiles over seeds, PNG), and
the compute each searcher needs to reach the best that random search reaches with its full budget, in
trial-epochs (the epochs of all trials added up) and in wall time: the replay's clock also runs in
seconds, each epoch lasting as long as that configuration's epoch took in the table's run (its
``seconds`` column), the trials of one tick side by side.

    pip install -e ".[bench]"     # CMA-ES (Optuna's CmaEsSampler needs the cmaes package)
    python bench/search_replay.py [--seeds 20] [--budget-trials 16] [--concurrency 1]
"""
from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd

from raypipe.config import Config, get_dotted, load_config
from raypipe.search import make_scheduler, make_searcher, param_space, teacher_space

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # the repository: bench.record, experiments
from bench.record import default_out, write_record  # noqa: E402
from experiments.search_bench import COLUMNS, SPACE  # noqa: E402  (the table's space: it made the table)

TABLE = ROOT / "bench" / "search"
METRIC = "knn_top1"


# the benchmark's space = the main job's (tune.* defaults) with teacher.lr searched over the table's range
BENCH_OVERRIDES = {"tune.lr_range": list(SPACE["teacher.lr"][1:])}
LOG_KEYS = ("teacher.temperature", "teacher.queue_size", "teacher.lr")   # the table's columns


def table_point(config: dict) -> dict:
    """A (nested) config's values of the searched keys, at the table's column names."""
    return {column: get_dotted(config, key) for key, column in COLUMNS.items()}


class Table:
    """k-NN curves by configuration, looked up by nearest neighbour in the unit cube of the space."""

    def __init__(self, teachers: pd.DataFrame, keys: list[str]):
        self.keys = keys
        first = teachers.sort_values("epoch").groupby("config")
        self.params = first[keys].first()
        self.curves = {cid: g[METRIC].to_numpy() for cid, g in first}
        # a configuration's k-NN once trained in full, with the epoch-to-epoch noise averaged out
        self.plateau = {cid: float(c[-10:].mean()) for cid, c in self.curves.items()}
        # each epoch's wall seconds in the table's run (its `seconds` count from the first training batch)
        self.epoch_seconds = ({cid: np.diff(g["seconds"].to_numpy(float), prepend=0.0) for cid, g in first}
                              if "seconds" in teachers else None)
        raw = self._transform(self.params.to_numpy(float))
        self.lo, self.span = raw.min(0), np.maximum(raw.max(0) - raw.min(0), 1e-12)
        self.coords = (raw - self.lo) / self.span

    def _transform(self, x: np.ndarray) -> np.ndarray:
        x = x.copy()
        for j, k in enumerate(self.keys):
            if k in LOG_KEYS:
                x[:, j] = np.log(x[:, j])
        return x

    def epoch_time(self, cid: int, epoch: int) -> float:
        """Wall seconds of ``epoch`` (from 1) of configuration ``cid`` (nan where the table has no times)."""
        return float(self.epoch_seconds[cid][epoch - 1]) if self.epoch_seconds is not None else math.nan

    def nearest(self, point: dict) -> int:
        x = (self._transform(np.array([[float(point[k]) for k in self.keys]])) - self.lo) / self.span
        return int(self.params.index[np.argmin(((self.coords - x) ** 2).sum(1))])


def replay(method: str, seed: int, cfg: Config, table: Table, budget: int, concurrency: int, max_t: int,
           n_train: int = 500) -> tuple[list[tuple], list[tuple[int, int]]]:
    """One search run -> ([(epochs spent, best k-NN so far, the plateau k-NN of that best trial's
    configuration, wall seconds)] at every report, [(configuration, epochs trained)] of each finished
    trial). The clock ticks one epoch of every running trial at a time; in seconds, a tick lasts as long
    as its slowest epoch (the trials run side by side) and a report comes at its own epoch's end."""
    import optuna
    from ray.tune.schedulers import TrialScheduler

    np.random.seed(seed)  # ASHA picks brackets with numpy's global RNG
    cfg = cfg.with_overrides({"tune.seed": seed})
    space, point = teacher_space(cfg, n_train)
    name = method.split("+")[0]
    samplers = {"tpe": lambda: None,  # the main job's own TPE
                "random": lambda: optuna.samplers.RandomSampler(seed=seed),
                "cmaes": lambda: optuna.samplers.CmaEsSampler(seed=seed, warn_independent_sampling=False)}
    searcher = make_searcher(cfg, METRIC, None if name == "random" else [point], samplers[name]())
    searcher.set_search_properties(METRIC, "max", param_space(cfg, space))
    scheduler = make_scheduler(cfg, max_t) if method.endswith("asha") else None
    if scheduler is not None:
        scheduler.set_search_properties(METRIC, "max")
    every = cfg.teacher.knn_every
    running, spent, best, chosen, trace, finished, n = {}, 0, -math.inf, math.nan, [], [], 0
    clock = 0.0
    while spent < budget:
        while len(running) < concurrency:
            trial = SimpleNamespace(trial_id=f"t{n:04d}")
            n += 1
            suggested = searcher.suggest(trial.trial_id)
            cid = table.nearest(table_point(suggested))
            if scheduler is not None:
                scheduler.on_trial_add(None, trial)
            running[trial.trial_id] = {"trial": trial, "cid": cid, "curve": table.curves[cid], "epoch": 0,
                                       "last": None}
        tick_end = clock
        for tid in list(running):
            run = running[tid]
            run["epoch"] += 1
            spent += 1
            epoch = run["epoch"]
            now = clock + table.epoch_time(run["cid"], epoch)
            tick_end = max(tick_end, now)
            action = TrialScheduler.CONTINUE
            if epoch % every == 0 or epoch == max_t:
                result = {"training_iteration": epoch, METRIC: float(run["curve"][epoch - 1])}
                run["last"] = result
                if result[METRIC] > best:
                    best, chosen = result[METRIC], table.plateau[run["cid"]]
                trace.append((spent, best, chosen, now))
                searcher.on_trial_result(tid, result)
                if scheduler is not None:
                    action = scheduler.on_trial_result(None, run["trial"], result)
            if epoch >= max_t or action == TrialScheduler.STOP:
                searcher.on_trial_complete(tid, result=run["last"])
                if scheduler is not None and run["last"] is not None:
                    scheduler.on_trial_complete(None, run["trial"], run["last"])
                finished.append((run["cid"], epoch))
                del running[tid]
            if spent >= budget:
                break
        clock = tick_end
    return trace, finished


def best_at(trace: list[tuple], grid: np.ndarray, column: int = 1) -> np.ndarray:
    """The trace's ``column`` (1: best k-NN seen, 2: the chosen configuration's plateau, 3: wall seconds) at
    ``grid`` epochs."""
    spent = np.array([t[0] for t in trace])
    values = np.array([t[column] for t in trace])
    idx = np.searchsorted(spent, grid, side="right") - 1
    return np.where(idx >= 0, values[np.clip(idx, 0, None)], np.nan)


def epochs_to_reach(trace, target: float) -> float:
    return next((float(t[0]) for t in trace if t[1] >= target), math.inf)


def seconds_to_reach(trace, target: float) -> float:
    """Wall seconds until the best k-NN seen reaches ``target`` (the earliest report at or past it)."""
    return min((float(t[3]) for t in trace if t[1] >= target), default=math.inf)


def spearman(x, y) -> float:
    x, y = pd.Series(np.asarray(x, float)).rank(), pd.Series(np.asarray(y, float)).rank()
    return float(np.corrcoef(x, y)[0, 1])


def spearman_ci(x, y, n_boot: int = 2000, seed: int = 0) -> tuple[float, float, float]:
    """Spearman's rho and a 95% percentile bootstrap interval (pairs resampled)."""
    x, y = np.asarray(x, float), np.asarray(y, float)
    rng = np.random.default_rng(seed)
    boots = []
    for _ in range(n_boot):
        i = rng.integers(0, len(x), len(x))
        if np.ptp(x[i]) > 0 and np.ptp(y[i]) > 0:
            boots.append(spearman(x[i], y[i]))
    return spearman(x, y), float(np.percentile(boots, 2.5)), float(np.percentile(boots, 97.5))


def student_values(students: pd.DataFrame, last: int = 10) -> pd.DataFrame:
    """Per (configuration, student seed): the teacher's k-NN, the student's final val top-1 (mean of its
    last ``last`` epochs: less noisy than the best epoch) and its best epoch, its final model's test top-1
    where measured, and short-run proxies (mean val of epochs e-4..e, what a student trained for e epochs
    would show; its lr schedule is the full run's)."""
    students = students.assign(student_seed=students.get("student_seed", 0)).fillna({"student_seed": 0})
    rows = []
    for (cid, seed), g in students.sort_values("epoch").groupby(["config", "student_seed"]):
        val = g["val_top1"].to_numpy()
        test = g["test_top1"].dropna() if "test_top1" in g else []
        rows.append({"config": cid, "student_seed": int(seed), "teacher": g["teacher_knn_top1"].iloc[0],
                     "final": val[-last:].mean(), "best": val.max(), "test": test.iloc[-1] if len(test) else np.nan,
                     **{f"proxy{e}": val[e - 5:e].mean() for e in (10, 20, 30) if len(val) >= e}})
    return pd.DataFrame(rows)


def selection_gain(values: pd.DataFrame, objective: str, candidates: int, top: int = 1, then: str = "final",
                   score: str = "final", against: str = "random", n_boot: int = 4000, seed: int = 0):
    """Stage 1 ranks the candidates by ``objective``; stage 2 keeps the one of its ``top`` best whose student
    is best by ``then`` (the main job's joint step: ``tune.stage2_teachers``; top=1: the first, as before it).
    Gain: that student's ``score`` minus, on the same candidate set, the candidates' mean (``against="random"``:
    a random pick) or the student of stage 1's first (``"first"``), over random candidate sets drawn from the
    pairs. Mean and 95% interval. ``score="test"`` scores a choice made on val on held-out data."""
    rng = np.random.default_rng(seed)
    x, z, y = (values[c].to_numpy() for c in (objective, then, score))
    gains = []
    for _ in range(n_boot):
        i = rng.choice(len(x), candidates, replace=False)
        ranked = i[np.argsort(-x[i], kind="stable")]
        kept = ranked[:top]
        gains.append(y[kept[np.argmax(z[kept])]] - (y[i].mean() if against == "random" else y[ranked[0]]))
    return float(np.mean(gains)), float(np.percentile(gains, 2.5)), float(np.percentile(gains, 97.5))


def correlations(table: Table, students: pd.DataFrame | None, earlier: pd.DataFrame | None = None) -> dict:
    """How well an early k-NN ranks teachers by their plateau (what ASHA relies on), and how well
    a teacher's k-NN ranks the students distilled from it (what stage 1 relies on), against the
    student's own seed noise and a short distilled-student proxy."""
    cids = sorted(table.curves)
    plateau = [table.plateau[c] for c in cids]
    out = {f"knn_epoch{e}_vs_plateau": spearman_ci([table.curves[c][e - 1] for c in cids], plateau)
           for e in (10, 25, 50, 75)}
    if students is not None and len(students):
        values = student_values(students)
        first = values[values["student_seed"] == 0].set_index("config")
        out["pairs"] = len(first)
        if len(first) >= 4:
            # the student's own teacher (trained again for it), and the configuration's run in the table
            out["teacher_knn_vs_student_val"] = spearman_ci(first["teacher"], first["final"])
            out["config_plateau_vs_student_val"] = spearman_ci([table.plateau[c] for c in first.index], first["final"])
            # the same configuration trained twice (the table's run, the student's): how well one run ranks it
            table_best = np.array([table.curves[c].max() for c in first.index])
            out["teacher_rerun_vs_table_best"] = spearman_ci(first["teacher"], table_best)
            out["teacher_rerun_minus_table_best_sd"] = float(np.std(first["teacher"] - table_best, ddof=1))
            proxies = [c for c in first.columns if c.startswith("proxy")]
            for proxy in proxies:
                out[f"student_{proxy}_vs_student_val"] = spearman_ci(first[proxy], first["final"])
            out["student_val_sd_between_teachers"] = float(first["final"].std())
            if earlier is not None and len(earlier):
                # the same students run before (another RNG stream): how well one student's val ranks its teacher
                both = values.merge(student_values(earlier), on=["config", "student_seed"], suffixes=("", "_earlier"))
                out["student_val_vs_earlier_run"] = spearman_ci(both["final_earlier"], both["final"])
                out["student_val_sd_rerun"] = float(np.std(both["final"] - both["final_earlier"], ddof=1) / np.sqrt(2))
                out["reruns"] = len(both)
            repeated = values.groupby("config").filter(lambda g: len(g) > 1)
            if len(repeated):
                # pooled within-teacher sd: what a student's val moves by its seed alone
                dev = repeated.groupby("config")["final"].transform(lambda v: v - v.mean())
                dof = len(repeated) - repeated["config"].nunique()
                out["student_val_sd_seed"] = float(np.sqrt((dev ** 2).sum() / dof))
                out["repeated_teachers"] = int(repeated["config"].nunique())
            k = min(4, len(first))
            for objective in ["teacher", "final"] + proxies:
                out[f"pick_of_{k}_by_{objective}_gain"] = selection_gain(first.reset_index(), objective, k)
            # the joint step: stage 2 distils from stage 1's `top` best teachers and keeps the best student on val;
            # scored on val (where it chose) and, where measured, on test (held out from every choice)
            tested = first.dropna(subset=["test"]).reset_index()
            tested = tested.assign(table_plateau=[table.plateau[c] for c in tested["config"]],
                                   table_best=[table.curves[c].max() for c in tested["config"]])
            if len(tested) >= k:
                # held out: which stage-1 or stage-2 signal ranks the students' test top-1
                out["tested_pairs"] = len(tested)
                out["student_test_sd_between_teachers"] = float(tested["test"].std())
                for objective in ["teacher", "table_best", "table_plateau", "final"] + proxies:
                    out[f"{objective}_vs_student_test"] = spearman_ci(tested[objective], tested["test"])
                    out[f"pick_of_{min(8, len(tested))}_by_{objective}_gain_test"] = selection_gain(
                        tested, objective, min(8, len(tested)), score="test")
            for n in (8, k):
                for top in range(1, k + 1):
                    for score, rows in (("val", first.reset_index()), ("test", tested)):
                        if n <= len(rows):
                            column = "final" if score == "val" else "test"
                            out[f"of_{n}_top{top}_then_val_on_{score}"] = selection_gain(rows, "teacher", n, top,
                                                                                         score=column)
                            if top > 1:
                                out[f"of_{n}_top{top}_then_val_on_{score}_vs_top1"] = selection_gain(
                                    rows, "teacher", n, top, score=column, against="first")
    for k, v in out.items():
        print(f"{k}: " + (f"{v[0]:.2f} [{v[1]:.2f}, {v[2]:.2f}]" if isinstance(v, tuple) else
                          f"{v:.2f}" if isinstance(v, float) else str(v)))
    return out


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--seeds", type=int, default=20)
    p.add_argument("--budget-trials", type=int, default=16, help="random search's full budget, in whole trials")
    p.add_argument("--concurrency", type=int, default=1)
    p.add_argument("--knn-every", type=int, default=0, help="report k-NN every N epochs (0 = the recipe's)")
    p.add_argument("--methods", nargs="+", default=["random", "random+asha", "tpe", "tpe+asha", "cmaes+asha"],
                   help="searcher[+asha]: tpe (the main job's), random, cmaes (needs pip install '.[bench]')")
    p.add_argument("--grace-periods", type=int, nargs="*", default=[],
                   help="also replay tpe+asha with these grace periods (x reduction factors below)")
    p.add_argument("--reduction-factors", type=int, nargs="*", default=[2])
    p.add_argument("--out", default=default_out(__file__))
    p.add_argument("--plot", default=str(ROOT / "docs" / "search_replay.png"))
    args = p.parse_args()
    import logging
    import optuna
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    logging.getLogger("ray.tune").setLevel(logging.ERROR)

    overrides = dict(BENCH_OVERRIDES)
    if args.knn_every:
        overrides["teacher.knn_every"] = args.knn_every
    cfg = load_config(ROOT / "experiments" / "configs" / "cifar10_50" / "base.yaml", overrides)
    teachers = pd.read_csv(TABLE / "teachers.csv")
    keys = [k for k in teachers.columns if k.startswith("teacher.")]
    table = Table(teachers, keys)
    max_t = cfg.teacher.epochs
    budget = args.budget_trials * max_t
    runs = {m: {} for m in args.methods}
    variants = [(g, r) for g in args.grace_periods for r in args.reduction_factors]
    for g, r in variants:
        runs[f"tpe+asha g{g} r{r}"] = {}
    for name in runs:
        method = "tpe+asha" if name.startswith("tpe+asha ") else name
        c = cfg
        if name.startswith("tpe+asha "):
            g, r = (int(x[1:]) for x in name.split()[1:])
            c = cfg.with_overrides({"tune.grace_period": g, "tune.reduction_factor": r})
        for seed in range(args.seeds):
            runs[name][seed] = replay(method, seed, c, table, 2 * budget, args.concurrency, max_t)[0]
    target = float(np.median([best_at(t, np.array([budget]))[0] for t in runs["random"].values()]))
    grid = np.linspace(max_t // 10 or 1, 2 * budget, 200)
    summary = {"configurations": len(table.curves), "budget_epochs": budget, "target": target,
               "table_best": float(max(c.max() for c in table.curves.values())),
               "table_best_plateau": float(max(table.plateau.values())),
               "start_point_best": float(table.curves[table.nearest(table_point(cfg.to_dict()))].max()),
               "knn_every": cfg.teacher.knn_every, "concurrency": args.concurrency, "seeds": args.seeds,
               "trial_epochs": max_t, "methods": {}}
    timed = table.epoch_seconds is not None
    if timed:   # random search's full budget in wall time
        summary["budget_seconds"] = float(np.median([best_at(t, np.array([budget]), 3)[0]
                                                     for t in runs["random"].values()]))
    for name, traces in runs.items():
        reach = [epochs_to_reach(t, target) for t in traces.values()]
        at_budget = [best_at(t, np.array([budget]))[0] for t in traces.values()]
        summary["methods"][name] = {
            "median_epochs_to_target": float(np.median(reach)), "ratio_to_budget": float(np.median(reach) / budget),
            "reached": int(sum(math.isfinite(x) for x in reach)),
            "best_at_budget_median": float(np.median(at_budget)),
            "best_at_half_budget_median": float(np.median([best_at(t, np.array([budget // 2]))[0]
                                                           for t in traces.values()])),
            "chosen_plateau_at_budget_median": float(np.median([best_at(t, np.array([budget]), 2)[0]
                                                                for t in traces.values()])),
            "chosen_plateau_at_half_budget_median": float(np.median([best_at(t, np.array([budget // 2]), 2)[0]
                                                                     for t in traces.values()]))}
        m = summary["methods"][name]
        if timed:
            m["median_seconds_to_target"] = float(np.median([seconds_to_reach(t, target) for t in traces.values()]))
        print(f"{name:<22} reaches {target:.1f} in median {m['median_epochs_to_target']:.0f} epochs "
              f"({m['ratio_to_budget']:.2f}x of random's {budget}; {m['reached']}/{args.seeds} seeds within 2x), "
              + (f"{m['median_seconds_to_target']:.0f} s, " if timed else "") +
              f"best at 0.5x budget {m['best_at_half_budget_median']:.1f}, at 1x {m['best_at_budget_median']:.1f}; "
              f"chosen configuration's plateau at 0.5x {m['chosen_plateau_at_half_budget_median']:.1f}, "
              f"at 1x {m['chosen_plateau_at_budget_median']:.1f}")
    students = TABLE / "students.csv"
    earlier = TABLE / "students_earlier.csv"
    summary["correlations"] = correlations(table, pd.read_csv(students) if students.exists() else None,
                                           pd.read_csv(earlier) if earlier.exists() else None)
    write_record(args.out, summary)
    if args.plot:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        fig, ax = plt.subplots(figsize=(7, 4.2))
        for name in [n for n in runs if not n.startswith("tpe+asha ")]:
            curves = np.array([best_at(t, grid) for t in runs[name].values()])
            med = np.nanmedian(curves, 0)
            line, = ax.plot(grid, med, label=name)
            ax.fill_between(grid, np.nanpercentile(curves, 25, 0), np.nanpercentile(curves, 75, 0),
                            color=line.get_color(), alpha=0.15)
        ax.axhline(target, color="grey", ls=":", lw=1, label="random's best at its full budget (median)")
        ax.axvline(budget, color="grey", ls="--", lw=0.8)
        ax.set_xlabel("compute (teacher epochs)")
        ax.set_ylabel("best k-NN top-1 seen (val, %)")
        ax.set_title(f"{len(table.curves)} real phase-1 runs, {args.seeds} seeds (median, quartiles)")
        ax.legend(fontsize=8, loc="lower right")
        fig.tight_layout()
        fig.savefig(args.plot, dpi=110)
        print(f"plot: {args.plot}")


if __name__ == "__main__":
    main()
