"""How one search stage runs on Ray Tune: search spaces seeded from the config, Optuna TPE + ASHA
(or a grid), trial drivers that each launch a phase's TorchTrainer, concurrency from the cluster,
the best trial and its weights. The main job's stages (raypipe.tune) call ``run_tune_stage``."""
from __future__ import annotations

import os

from . import cluster, progress, registry
from .checkpoints import best_weights
from .config import Config, flat_key, set_dotted
from .console import verbose
from .raytrain import final_state
from .registry import DISTILLERS, METHODS
from .settings import TEACHER_CHOICE, start_point
from .storage import join

# ---- search spaces -------------------------------------------------------------------
def teacher_space(cfg: Config, n_train: int) -> tuple[dict, dict]:
    """(Tune param_space domains at dotted keys, the config's point to start from): the selected
    method's own space (MoCo: margin, temperature, K), plus ``teacher.lr`` where ``tune.lr_range``."""
    from ray import tune

    space, point = METHODS.get_class(cfg.teacher.method).search_space(cfg, n_train)
    if cfg.tune.lr_range:
        space["teacher.lr"] = tune.loguniform(*cfg.tune.lr_range)
        point["teacher.lr"] = start_point(cfg.teacher.lr, cfg.tune.lr_range)
    return space, point


def student_space(cfg: Config, teachers: int = 1) -> tuple[dict, list[dict]]:
    """(Tune param_space domains, the points to start from): the selected distiller's own space
    (OFD: lambda, CE warm-up), plus ``student.lr`` where ``tune.student_lr_range``; the config's own
    values, once per teacher where stage 2 chooses among ``teachers`` of stage 1's best, so each
    gets a student."""
    from ray import tune

    t = cfg.tune
    space, point = DISTILLERS.get_class(cfg.student.mode).search_space(cfg)
    if t.student_lr_range:
        space["student.lr"] = tune.loguniform(*t.student_lr_range)
        point["student.lr"] = start_point(cfg.student.lr, t.student_lr_range)
    if teachers == 1:
        return space, [point]
    space[TEACHER_CHOICE] = tune.choice(list(range(1, teachers + 1)))
    return space, [{TEACHER_CHOICE: rank, **point} for rank in range(1, teachers + 1)]


def param_space(cfg: Config, dotted: dict) -> dict:
    """The config's nested dict with search domains at the dotted keys (one schema for all)."""
    raw = cfg.to_dict()
    for key, domain in dotted.items():
        set_dotted(raw, key, domain)
    return raw


def trial_concurrency(cfg: Config, total: dict | None = None) -> int:
    """Trials that can run at once without their drivers starving their own trainers: from what
    an autoscaling cluster can grow to (RAYPIPE_AUTOSCALING=1 and the launcher's config on the
    head), else from the resources the cluster has now."""
    if cfg.tune.max_concurrent_trials:
        return cfg.tune.max_concurrent_trials
    total = cluster.cluster_resources() if total is None else total
    res = cfg.resources
    workers = max(1, res.num_workers)
    cpu_need = workers * res.cpus_per_worker + cfg.tune.driver_cpus + cfg.data.cpus_per_task
    by_cpu = int(total.get("CPU", 0) // cpu_need)
    if res.use_gpu is True or (res.use_gpu == "auto" and total.get("GPU", 0) > 0):
        by_cpu = min(by_cpu, int(total.get("GPU", 0) // max(1e-9, workers * res.gpus_per_worker)))
    return max(1, by_cpu)


# ---- trial drivers (one per Tune trial; each builds a TorchTrainer) ------------------
DRIVER_RESOURCE = cluster.DRIVER_RESOURCE


def driver_resources(cfg: Config) -> dict:
    """What each trial driver asks: a little CPU and, where some node type carries the custom
    resource ``raypipe_driver`` (the head in cluster.yaml), a place there, so drivers never land on
    preemptible GPU nodes that the autoscaler may take away (Ray's Train + Tune guide)."""
    import ray

    res = {"CPU": cfg.tune.driver_cpus}
    if ray.cluster_resources().get(DRIVER_RESOURCE, 0) > 0:
        res[DRIVER_RESOURCE] = 0.001
    return res


# ---- searcher and scheduler (also replayed on the search benchmark: bench/search_replay.py) --
def make_searcher(cfg: Config, metric: str, points: list[dict] | None, sampler=None):
    """Optuna TPE (``tune.seed``) starting from ``points`` (the config's own values); ``sampler``
    another Optuna sampler instead (the benchmark's random search)."""
    import optuna
    from ray.tune.search.optuna import OptunaSearch

    return OptunaSearch(metric=metric, mode="max", sampler=sampler or optuna.samplers.TPESampler(seed=cfg.tune.seed),
                        points_to_evaluate=[{flat_key(k): v for k, v in p.items()} for p in points] if points else None)


def make_scheduler(cfg: Config, max_t: int):
    """ASHA on epochs: ``tune.grace_period`` (0: half of ``max_t``), ``tune.reduction_factor``,
    at most ``max_t`` epochs."""
    from ray.tune.schedulers import ASHAScheduler

    return ASHAScheduler(time_attr="training_iteration", max_t=max_t, grace_period=grace_period(cfg, max_t),
                         reduction_factor=cfg.tune.reduction_factor)


def grace_period(cfg: Config, max_t: int) -> int:
    return min(cfg.tune.grace_period or max(1, max_t // 2), max_t)


# ---- running a stage -------------------------------------------------------------------
def run_tune_stage(stage: str, trainable, ctx: dict, cfg: Config, space: dict | None, metric: str | None,
                   num_samples: int, points: list[dict] | None = None, max_t: int = 0, grid: list | None = None):
    """Fit (or restore and finish) one Tune experiment, its searcher starting from ``points``;
    returns its ResultGrid."""
    import optuna
    from ray import tune

    optuna.logging.set_verbosity(optuna.logging.INFO if verbose() else optuna.logging.WARNING)
    # Tune's new output engine prints its experiment header even at verbose=0; the legacy one does not
    os.environ["RAY_AIR_NEW_OUTPUT"] = "1" if verbose() else "0"
    path = join(ctx["storage"], stage)
    ctx = {**ctx, "plugins": registry.snapshot()}   # every registered plug-in travels to the trials (user ones too)
    fn = tune.with_resources(tune.with_parameters(trainable, ctx=ctx), driver_resources(cfg))
    params = list(space or {})
    print(f"\n[{stage}] {'grid of ' + str(len(grid)) if grid is not None else num_samples} trials"
          + (f", searching {', '.join(params)}" if params else ""), flush=True)
    if tune.Tuner.can_restore(path):
        print(f"[{stage}] restoring {path}: finished trials are kept", flush=True)
        tuner = tune.Tuner.restore(path, trainable=fn, resume_errored=True)
    else:
        if grid is not None:
            tune_config = tune.TuneConfig(num_samples=1, max_concurrent_trials=trial_concurrency(cfg))
            param = {"final": tune.grid_search(grid)}
        else:
            tune_config = tune.TuneConfig(metric=metric, mode="max", search_alg=make_searcher(cfg, metric, points),
                                          scheduler=make_scheduler(cfg, max_t),
                                          num_samples=num_samples, max_concurrent_trials=trial_concurrency(cfg))
            param = param_space(cfg, space)
        loud = verbose()  # Tune's own tables, or one line per epoch per trial
        tuner = tune.Tuner(fn, param_space=param, tune_config=tune_config,
                           run_config=tune.RunConfig(name=stage, storage_path=ctx["storage"],
                                                     failure_config=tune.FailureConfig(max_failures=1),
                                                     sync_config=tune.SyncConfig(sync_period=cfg.tune.sync_period),
                                                     verbose=1 if loud else 0,
                                                     callbacks=tracking_callbacks(cfg, stage) + (
                                                         [] if loud else [progress.TrialProgress(stage, params)])))
    grid_result = tuner.fit()
    print(progress.leaderboard(grid_result, stage, metric, params), flush=True)
    errors = [r.error for r in grid_result if r.error is not None]
    if errors and len(errors) == len(grid_result):
        raise RuntimeError(f"[{stage}] every trial failed; first error: {errors[0]}")
    return grid_result


def tracking_callbacks(cfg: Config, stage: str) -> list:
    """Ray's logger callbacks for the trackers in ``tune.loggers`` (TensorBoard is always on: Tune
    writes each trial's events into the experiment's storage). One MLflow experiment / W&B group
    per stage, one run per trial."""
    callbacks = []
    if "mlflow" in cfg.tune.loggers:
        from ray.air.integrations.mlflow import MLflowLoggerCallback
        callbacks.append(MLflowLoggerCallback(tracking_uri=os.environ.get("MLFLOW_TRACKING_URI"),
                                              experiment_name=f"{cfg.tune.experiment}-{stage}"))
    if "wandb" in cfg.tune.loggers:
        from ray.air.integrations.wandb import WandbLoggerCallback
        callbacks.append(WandbLoggerCallback(project=cfg.tune.experiment, group=stage))
    return callbacks


def ranked_trials(grid, metric: str) -> list[tuple]:
    """Trials by the best value each ever reported, best first (ASHA-stopped trials included, as
    Tune's ``get_best_result(scope="all")`` ranks them; trials without a value left out);
    -> [(Result, that value)]."""
    ranked = []
    for result in grid:
        df = result.metrics_dataframe
        if df is not None and metric in df and not df[metric].dropna().empty:
            ranked.append((result, float(df[metric].max())))
    if not ranked:
        raise RuntimeError(f"no trial reported {metric!r}")
    return sorted(ranked, key=lambda pair: pair[1], reverse=True)


def best_trial(grid, metric: str):
    """-> (the trial with the best value it ever reported, that value)."""
    return ranked_trials(grid, metric)[0]


def best_state(train_storage: str) -> dict:
    """A finished trial's last checkpoint, with the best epoch's weights (what its stage exports)."""
    from ray.train import Result
    return best_weights(final_state(Result.from_path(join(train_storage, "train"))))


def trial_summary(grid, metric: str) -> list[dict]:
    rows = []
    for r in grid:
        df = r.metrics_dataframe
        rows.append({"trial_id": r.metrics.get("trial_id") if r.metrics else None,
                     "best": float(df[metric].max()) if df is not None and metric in df else None,
                     "epochs": int(len(df)) if df is not None else 0, "error": str(r.error) if r.error else None})
    return rows
