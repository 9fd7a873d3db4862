"""``raypipe results EXPERIMENT_DIR``: leaderboards, best configs and plots of a tune_margin run.

Reads Tune's own files (``ray.tune.ExperimentAnalysis``), so it works on a finished or an
interrupted experiment, on the head node or on a copy fetched with ``ray rsync-down``.
"""
from __future__ import annotations

import math
from pathlib import Path

import yaml

from . import storage
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
            row[p] = _get(trial.config, p)
        if "final" in trial.config:
            row["final"] = trial.config["final"]
        row["role"] = role(trial.config, params)
        rows.append(row)
        if df is not None and len(values):
            curves[row["role"] if row["role"] not in curves else f"{row['role']} ({trial.trial_id})"] = df
    rows.sort(key=lambda r: -r["best"] if not math.isnan(r["best"]) else math.inf)
    return rows, params, curves, record


def _get(config: dict, dotted: str):
    node = config
    for part in dotted.split("."):
        node = node.get(part) if isinstance(node, dict) else None
    return node


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


def plot_stage(out_dir: Path, stage: str, metric: str, rows: list[dict], params: list[str], curves: dict) -> list[Path]:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    if params:
        fig, axes = plt.subplots(1, len(params), figsize=(4 * len(params), 3.5), squeeze=False)
        for ax, p in zip(axes[0], params):
            xs = [r[p] for r in rows if r.get(p) is not None and not math.isnan(r["best"])]
            ys = [r["best"] for r in rows if r.get(p) is not None and not math.isnan(r["best"])]
            ax.scatter(xs, ys)
            ax.set_xlabel(p)
            ax.set_ylabel(f"best {metric}")
            if p.endswith(("temperature", "distill_weight", ".lr")):
                from matplotlib.ticker import LogLocator, NullFormatter
                ax.set_xscale("log")
                ax.xaxis.set_major_locator(LogLocator(numticks=4))
                ax.xaxis.set_minor_formatter(NullFormatter())  # minor labels overlap on short ranges
        fig.suptitle(f"{stage}: {metric} against each searched parameter")
        fig.tight_layout()
        written.append(out_dir / f"{stage}_params.png")
        fig.savefig(written[-1], dpi=90)
        plt.close(fig)
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
    if params:
        written.append(plot_importances(out_dir / f"{stage}_importance.png", stage, rows, params))
    return written


def param_importances(rows: list[dict], params: list[str]) -> dict[str, float]:
    """Optuna's fANOVA importances from the finished trials (needs a few trials)."""
    import optuna
    from optuna.distributions import CategoricalDistribution, FloatDistribution

    done = [r for r in rows if not math.isnan(r["best"]) and all(r.get(p) is not None for p in params)]
    if len(done) < 2:
        raise ValueError(f"parameter importances need at least 2 trials with results, have {len(done)}")
    dists = {}
    for p in params:
        values = [r[p] for r in done]
        if all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values) and \
                not all(isinstance(v, int) for v in values):
            lo, hi = min(values), max(values)
            dists[p] = FloatDistribution(lo, hi if hi > lo else lo + 1e-12)
        else:
            dists[p] = CategoricalDistribution(sorted(set(values)))
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(direction="maximize")
    for r in done:
        study.add_trial(optuna.trial.create_trial(params={p: r[p] for p in params}, distributions=dists,
                                                  value=r["best"]))
    return optuna.importance.get_param_importances(study)


def plot_importances(path: Path, stage: str, rows: list[dict], params: list[str]) -> Path:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 1 + 0.6 * len(params)))
    try:
        imp = param_importances(rows, params)
        ax.barh(list(imp), list(imp.values()))
        ax.set_xlabel("importance (Optuna fANOVA)")
    except Exception as exc:  # too few or degenerate trials: say so in the figure
        ax.text(0.5, 0.5, f"importances unavailable:\n{exc}", ha="center", va="center", wrap=True)
        ax.set_axis_off()
    ax.set_title(f"{stage}: parameter importances")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


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
            nested: dict = {}
            for dotted, value in record["best_params"].items():
                section, key = dotted.split(".", 1)
                nested.setdefault(section, {})[key] = value
            best = yaml.safe_dump(nested, sort_keys=False)
            print(f"\n-- best parameters ({stage}, {metric} {record['best_metric']:.2f}), YAML:\n" + best, end="")
            md += [f"Best parameters ({metric} {record['best_metric']:.2f}):\n", "```yaml\n" + best + "```\n"]
        pngs = plot_stage(plots.scratch, stage, metric, rows, params, curves)
        md += [f"![{p.stem}]({join(link_root, p.name)})\n" for p in pngs]
        report[stage] = {"rows": rows, "params": params, "plots": [plots.path(p.name) for p in pngs]}
    plots.publish()
    storage.write_text(exp.path("report.md"), "\n".join(md))
    if summary:
        print("\n" + summary)
    print(f"plots: {plots_at}\nreport (leaderboards and plots): {exp.path('report.md')}")
    return report
