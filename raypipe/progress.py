"""What the main job prints: one line per epoch per trial, named by its role or searched values,
and a leaderboard per stage. Tune's own console output is off unless ``--verbose``."""
from __future__ import annotations

from ray.tune import Callback

from .config import get_dotted

EPOCH_METRICS = ("loss", "knn_top1", "ce", "distill", "val_top1", "images_per_s")


def fmt(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def role(config: dict, params: list[str]) -> str:
    """Stage 3 trials are named by their member (supervised, finetune, distill_0, ...); searched
    trials by the values of their searched keys (``margin 0.44 temperature 0.29 queue_size 128``)."""
    if "final" in config:
        return str(config["final"])
    return " ".join(f"{p.split('.')[-1]} {fmt(get_dotted(config, p))}" for p in params)


class TrialProgress(Callback):
    """Prints ``[stage] role  epoch N  metric value ...`` for every result a trial reports."""

    def __init__(self, stage: str, params: list[str]):
        self.stage, self.params = stage, params

    def _label(self, trial) -> str:
        return f"[{self.stage}] {trial.trial_id} ({role(trial.config, self.params)})"

    def on_trial_result(self, iteration, trials, trial, result, **info):
        parts = [f"epoch {result.get('epoch', result.get('training_iteration', '?'))}"]
        parts += [f"{k} {fmt(result[k])}" for k in EPOCH_METRICS if result.get(k) is not None]
        print(f"{self._label(trial)}  " + "  ".join(parts), flush=True)

    def on_trial_complete(self, iteration, trials, trial, **info):
        print(f"{self._label(trial)}  finished", flush=True)

    def on_trial_error(self, iteration, trials, trial, **info):
        where = getattr(trial, "error_file", None) or getattr(trial, "path", "")
        print(f"{self._label(trial)}  FAILED (retried if tune allows; details: {where})", flush=True)


def leaderboard(grid, stage: str, metric: str | None, params: list[str]) -> str:
    """A stage's trials, best first: role, status, epochs run and the best value of ``metric``
    (from the ResultGrid's dataframe; ASHA-stopped trials included)."""
    rows, most = [], _max_epochs(grid)
    for result in grid:
        df = result.metrics_dataframe
        epochs = 0 if df is None else len(df)
        best = None
        if metric and df is not None and metric in df and not df[metric].dropna().empty:
            best = float(df[metric].max())
        status = "ERROR" if result.error else ("stopped early" if metric and epochs < most else "done")
        rows.append((best if best is not None else float("-inf"), role(result.config, params), status, epochs, best))
    rows.sort(key=lambda r: r[0], reverse=True)
    head = f"| trial | status | epochs | best {metric} |" if metric else "| trial | status | epochs |"
    lines = [f"[{stage}] leaderboard", head, "|---|---|---|---|" if metric else "|---|---|---|"]
    for _, name, status, epochs, best in rows:
        cells = [name, status, str(epochs)] + ([f"{best:.2f}" if best is not None else "-"] if metric else [])
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _max_epochs(grid) -> int:
    return max((len(r.metrics_dataframe) for r in grid if r.metrics_dataframe is not None), default=0)
