"""``raypipe results EXPERIMENT_DIR``: leaderboards, best configs and plots of a tune_margin run.

Reads Tune's own files (``ray.tune.ExperimentAnalysis``), so it works on a finished or an
interrupted experiment, on the head node or on a copy fetched with ``ray rsync-down``.
"""
from __future__ import annotations

import math
from pathlib import Path

import yaml

from . import storage
from .config import get_dotted, nest
from .progress import role
from .storage import Outputs, join

STAGES = {"stage1_teacher": "knn_top1", "stage2_student": "val_top1", "stage3_final": "val_top1"}


def load_stage(exp: Outputs, stage: str, metric: str):
    """-> (leaderboard rows, searched parameter names, {trial_id: per-epoch DataFrame})."""
    from ray.tune import ExperimentAnalysis

    analysis = ExperimentAnalysis(exp.path(stage))
    record = exp.read_record(stage) or {}
    params = list(record.get("best_params", {})) or _varying_params(analysis)
    rows, curves = [], {}
    for trial in analysis.trials:
        df = analysis.trial_dataframes.get(trial.path) if hasattr(trial, "path") else None
        if df is None:
            df = next((d for p, d in analysis.trial_dataframes.items() if trial.trial_id in str(p)), None)
        values = df[metric].dropna() if df is not None and metric in df else []
        row = {"trial": trial.trial_id, "status": trial.status,
               "best": float(values.max()) if len(values) else math.nan,
               "last": float(values.iloc[-1]) if len(values) else math.nan, "epochs": int(len(values))}
        for p in params:
            row[p] = get_dotted(trial.config, p)
        if "final" in trial.config:
            row["final"] = trial.config["final"]
        row["role"] = role(trial.config, params)
        rows.append(row)
        if df is not None and len(values):
            curves[row["role"] if row["role"] not in curves else f"{row['role']} ({trial.trial_id})"] = df
    rows.sort(key=lambda r: -r["best"] if not math.isnan(r["best"]) else math.inf)
    return rows, params, curves, record


def _varying_params(analysis) -> list[str]:
    """Dotted config keys whose values differ between trials (a stage still running)."""
    seen: dict[str, set] = {}
    for trial in analysis.trials:
        for section, values in trial.config.items():
            if isinstance(values, dict):
                for k, v in values.items():
                    seen.setdefault(f"{section}.{k}", set()).add(repr(v))
    return sorted(k for k, v in seen.items() if len(v) > 1)


def format_table(rows: list[dict], columns: list[str], markdown: bool = False) -> str:
    def fmt(v):
        if isinstance(v, float):
            return "nan" if math.isnan(v) else f"{v:.4g}"
        return str(v)
    if markdown:
        lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
        return "\n".join(lines + ["| " + " | ".join(fmt(r.get(c)) for c in columns) + " |" for r in rows])
    widths = [max(len(c), *(len(fmt(r.get(c))) for r in rows)) for c in columns] if rows else [len(c) for c in columns]
    lines = ["  ".join(c.ljust(w) for c, w in zip(columns, widths))]
    lines += ["  ".join(fmt(r.get(c)).ljust(w) for c, w in zip(columns, widths)) for r in rows]
    return "\n".join(lines)


def stored_study(exp: Outputs, stage: str):
    """The Optuna study of a stage as its searcher kept it: Tune saves ``OptunaSearch``'s state
    (``searcher-state-*.pkl``, the study with every trial's parameters, intermediate and final
    values) into the stage's folder in storage. None for a grid stage or before the first save."""
    import tempfile

    from ray.tune.search.optuna import OptunaSearch

    states = sorted(n for n, is_dir in storage.list_dir(exp.path(stage))
                    if not is_dir and n.startswith("searcher-state-") and n.endswith(".pkl"))
    if not states:
        return None
    with tempfile.TemporaryDirectory() as tmp:
        local = Path(tmp) / states[-1]
        local.write_bytes(storage.read_bytes(exp.path(stage, states[-1])))
        searcher = OptunaSearch()
        searcher.restore(str(local))
    return getattr(searcher, "_ot_study", None)  # OptunaSearch keeps its study here (Ray < 2.61 is pinned)


def plot_stage(out_dir: Path, stage: str, metric: str, curves: dict, study=None) -> list[Path]:
    """Learning curves named by role; with the stage's Optuna study, Optuna's own plots of it:
    the searched parameters against the objective (slice) and their importances (fANOVA)."""
    import warnings

    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    fig, ax = plt.subplots(figsize=(6, 4))
    for name, df in curves.items():  # named by role: supervised, distill_0, margin 0.4 temperature 0.2 ...
        ax.plot(df["training_iteration"], df[metric], marker="o", label=name)
    ax.set_xlabel("epoch (training_iteration)")
    ax.set_ylabel(metric)
    ax.set_title(f"{stage}: learning curves")
    if len(curves) <= 12:
        ax.legend(fontsize=7)
    fig.tight_layout()
    written.append(out_dir / f"{stage}_curves.png")
    fig.savefig(written[-1], dpi=90, metadata={"Description": "legend: " + " | ".join(curves)})
    plt.close(fig)
    if study is None:
        return written
    import optuna
    from optuna.visualization import matplotlib as ov

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    for name, plot in (("params", ov.plot_slice), ("importance", ov.plot_param_importances)):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # Optuna marks its matplotlib backend experimental
            try:
                ax = plot(study)
            except Exception as exc:  # e.g. importances of fewer than 2 finished trials: say so in the figure
                fig, ax = plt.subplots(figsize=(6, 2))
                ax.text(0.5, 0.5, f"{name} unavailable: {exc}", ha="center", va="center", wrap=True)
                ax.set_axis_off()
        fig = (ax.flat[0] if hasattr(ax, "flat") else ax).get_figure()
        for each in fig.axes:
            if each.get_xscale() == "log":  # minor tick labels of a short log range overlap: 3 plain ones
                from matplotlib.ticker import FormatStrFormatter, MaxNLocator, NullLocator
                each.xaxis.set_major_locator(MaxNLocator(3))
                each.xaxis.set_major_formatter(FormatStrFormatter("%.3g"))
                each.xaxis.set_minor_locator(NullLocator())
        fig.suptitle(f"{stage}: {metric} (Optuna study of the search)", fontsize=9)
        written.append(out_dir / f"{stage}_{name}.png")
        fig.savefig(written[-1], dpi=90, bbox_inches="tight")
        plt.close(fig)
    return written


def show_results(experiment: str | Path, out_dir: str | Path | None = None) -> dict:
    """Print the leaderboards of an experiment (local folder or URI), write its plots to ``out_dir``
    (a local folder or URI; default: the experiment's ``plots``) and ``report.md`` (summary,
    leaderboards, best parameters, plots) next to its ``summary.md``."""
    exp = Outputs(str(experiment))
    if not storage.is_dir(exp.location):
        raise FileNotFoundError(f"experiment folder not found: {exp.location}{storage.missing_hint(exp.location)}")
    started = [stage for stage in STAGES if storage.is_dir(exp.path(stage))]
    if not started:
        raise FileNotFoundError(f"{exp.location} is not a tune_margin experiment: none of {', '.join(STAGES)} is "
                                f"in it (pass the folder that holds summary.md, e.g. runs/tune_margin)")
    plots = Outputs(str(out_dir) if out_dir else exp.path("plots"))
    plots.scratch.mkdir(parents=True, exist_ok=True)
    plots_at = plots.location
    # report.md links the plots relative to itself when they sit in the experiment's plots/
    link_root = "plots" if plots_at == exp.path("plots") else plots_at
    summary = storage.read_text(exp.path("summary.md")) if storage.is_file(exp.path("summary.md")) else ""
    report, md = {}, [summary or f"# {storage.name(exp.location)} (no summary yet: the job has not finished)\n"]
    for stage, metric in STAGES.items():
        if stage not in started:
            print(f"== {stage}: not started")
            md.append(f"## {stage}\n\nnot started\n")
            continue
        rows, params, curves, record = load_stage(exp, stage, metric)
        cols = ["trial", *(["final"] if stage == "stage3_final" else []), *params, "best", "last", "epochs", "status"]
        print(f"\n== {stage}: leaderboard by {metric} (best over epochs)")
        print(format_table(rows, cols))
        md += [f"## {stage}: leaderboard by {metric} (best over epochs)\n", format_table(rows, cols, markdown=True), ""]
        if record.get("best_params"):
            best = yaml.safe_dump(nest(record["best_params"]), sort_keys=False)
            print(f"\n-- best parameters ({stage}, {metric} {record['best_metric']:.2f}), YAML:\n" + best, end="")
            md += [f"Best parameters ({metric} {record['best_metric']:.2f}):\n", "```yaml\n" + best + "```\n"]
        pngs = plot_stage(plots.scratch, stage, metric, curves, stored_study(exp, stage) if params else None)
        md += [f"![{p.stem}]({join(link_root, p.name)})\n" for p in pngs]
        report[stage] = {"rows": rows, "params": params, "plots": [plots.path(p.name) for p in pngs]}
    plots.publish()
    storage.write_text(exp.path("report.md"), "\n".join(md))
    if summary:
        print("\n" + summary)
    print(f"plots: {plots_at}\nreport (leaderboards and plots): {exp.path('report.md')}")
    return report
