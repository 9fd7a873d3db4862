"""The main job: Ray Tune + Optuna search of the teacher (margin, temperature, K, lr) and the
student (lambda, CE warm-up, lr), then the final models, the test evaluation and the summary.

Stages (each skipped on a re-run once finished, restored with ``Tuner.restore`` if interrupted):
  1. ``stage1_teacher``: each trial is a phase-1 TorchTrainer run, objective k-NN val top-1;
  2. ``stage2_student``: each trial is a phase-2 ``distill`` run from the best teacher, val top-1;
  3. ``stage3_final``: supervised baseline, fine-tune and the distilled ensemble members
     (a Tune grid, so they run in parallel on a cluster), then the test evaluation.
"""
from __future__ import annotations

import argparse
import contextlib
import os
import shlex
import shutil
import sys
import tempfile
import time
from pathlib import Path

from . import engine, progress, storage
from .cli import parse_args as overrides_anywhere
from .config import Config, ConfigError, load_config, parse_overrides, preset, set_verbose, verbose
from .data import scan_dataset
from .storage import Outputs, join

TEACHER_METRIC, STUDENT_METRIC = "knn_top1", "val_top1"
SMOKE_DEMO = {"train": 16, "val": 8, "test": 8}
DEMO = {"train": 50, "val": 20, "test": 20}


# ---- search spaces -------------------------------------------------------------------
def queue_candidates(cfg: Config, n_train: int) -> list[int]:
    """K values Tune may pick: multiples of the global batch the training set can fill."""
    gb = cfg.global_batch("teacher")
    cap = n_train // gb * gb
    if cap < gb:
        raise ConfigError(f"{n_train} training images cannot fill one global batch of {gb}")
    if cfg.tune.queue_sizes:
        bad = [k for k in cfg.tune.queue_sizes if k % gb or k > cap]
        if bad:
            raise ConfigError(f"tune.queue_sizes {bad} must be multiples of the global batch {gb} and <= {cap} "
                              f"(the training images rounded down to whole batches)")
        return sorted(set(cfg.tune.queue_sizes))
    sizes, k = [], gb
    while k <= cap:
        sizes.append(k)
        k *= 2
    return sorted(set(sizes + [min(cap, 4096 // gb * gb or gb)]))


def paper_queue(cfg: Config, candidates: list[int]) -> int:
    """The paper's K = 4096, clipped to what the data can fill."""
    return max([k for k in candidates if k <= 4096] or candidates[:1])


def teacher_space(cfg: Config, n_train: int) -> tuple[dict, dict]:
    """(Tune param_space overrides at dotted keys, the paper's starting point)."""
    from ray import tune

    t = cfg.tune
    queues = queue_candidates(cfg, n_train)
    space = {"teacher.margin": tune.uniform(*t.margin_range),
             "teacher.temperature": tune.loguniform(*t.temperature_range),
             "teacher.queue_size": tune.choice(queues)}
    point = {"teacher.margin": min(max(0.4, t.margin_range[0]), t.margin_range[1]),
             "teacher.temperature": min(max(0.2, t.temperature_range[0]), t.temperature_range[1]),
             "teacher.queue_size": paper_queue(cfg, queues)}
    if t.lr_range:
        space["teacher.lr"] = tune.loguniform(*t.lr_range)
        point["teacher.lr"] = min(max(cfg.teacher.lr, t.lr_range[0]), t.lr_range[1])
    return space, point


def student_space(cfg: Config) -> tuple[dict, dict]:
    from ray import tune

    t = cfg.tune
    space = {"student.distill_weight": tune.loguniform(*t.distill_weight_range)}
    point = {"student.distill_weight": min(max(1e-4, t.distill_weight_range[0]), t.distill_weight_range[1])}
    if t.ce_only_range:
        space["student.ce_only_epochs"] = tune.randint(t.ce_only_range[0], t.ce_only_range[1] + 1)
        point["student.ce_only_epochs"] = min(max(cfg.student.ce_only_epochs, t.ce_only_range[0]), t.ce_only_range[1])
    if t.student_lr_range:
        space["student.lr"] = tune.loguniform(*t.student_lr_range)
        point["student.lr"] = min(max(cfg.student.lr, t.student_lr_range[0]), t.student_lr_range[1])
    return space, point


def param_space(cfg: Config, dotted: dict) -> dict:
    """The config's nested dict with search domains at the dotted keys (one schema for all)."""
    raw = cfg.to_dict()
    for key, domain in dotted.items():
        section, name = key.split(".")
        raw[section][name] = domain
    return raw


def flat_point(point: dict) -> dict:
    return {k.replace(".", "/"): v for k, v in point.items()}


def trial_concurrency(cfg: Config, total: dict | None = None) -> int:
    """Trials that can run at once without their drivers starving their own trainers: from what
    an autoscaling cluster can grow to (RAYPIPE_AUTOSCALING=1 and the launcher's config on the
    head), else from the resources the cluster has now."""
    if cfg.tune.max_concurrent_trials:
        return cfg.tune.max_concurrent_trials
    total = engine.cluster_resources() if total is None else total
    res = cfg.resources
    workers = max(1, res.num_workers)
    cpu_need = workers * res.cpus_per_worker + cfg.tune.driver_cpus + cfg.data.cpus_per_task
    by_cpu = int(total.get("CPU", 0) // cpu_need)
    if res.use_gpu == "true" or (res.use_gpu == "auto" and total.get("GPU", 0) > 0):
        by_cpu = min(by_cpu, int(total.get("GPU", 0) // max(1e-9, workers * res.gpus_per_worker)))
    return max(1, by_cpu)


# ---- trial drivers (one per Tune trial; each builds a TorchTrainer) ------------------
DRIVER_RESOURCE = "raypipe_driver"


def driver_resources(cfg: Config) -> dict:
    """What each trial driver asks: a little CPU and, where some node type carries the custom
    resource ``raypipe_driver`` (the head in cluster.yaml), a place there, so drivers never land on
    preemptible GPU nodes that the autoscaler may take away (Ray's Train + Tune guide)."""
    import ray

    res = {"CPU": cfg.tune.driver_cpus}
    if ray.cluster_resources().get(DRIVER_RESOURCE, 0) > 0:
        res[DRIVER_RESOURCE] = 0.001
    return res


@contextlib.contextmanager
def trial_run(ctx: dict):
    """-> (the trial's folder in storage, a local scratch folder removed afterwards). The storage
    folder holds the trial's Train run (checkpoints) and its files, which go there as they are
    made; it is named after the trial id, no timestamp, so a retried or restored trial resumes."""
    from ray import tune
    location = join(ctx["storage"], f"{ctx['stage']}_runs", tune.get_context().get_trial_id())
    scratch = Path(tempfile.mkdtemp(prefix="raypipe-trial-"))
    try:
        yield location, scratch
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def teacher_trial(config: dict, ctx: dict) -> None:
    from ray.tune.integration.ray_train import TuneReportCallback

    from .teacher import pretrain
    with trial_run(ctx) as (location, scratch):  # the model file stays local: stages export what they keep
        pretrain(Config.from_dict(config), run_dir=scratch, callbacks=[TuneReportCallback()], storage_path=location,
                 print_epochs=verbose(), outputs=location, publish_model=False)


def student_trial(config: dict, ctx: dict) -> None:
    from ray.tune.integration.ray_train import TuneReportCallback

    from .student import train_student
    cfg = Config.from_dict(config)
    teacher = ctx.get("teacher") if cfg.student.mode != "supervised" else None
    with trial_run(ctx) as (location, scratch):
        train_student(cfg, teacher, run_dir=scratch, callbacks=[TuneReportCallback()], storage_path=location,
                      print_epochs=verbose(), outputs=location, publish_model=False)


def final_trial(config: dict, ctx: dict) -> None:
    """Stage 3: one of the final models (``config['final']`` says which), no early stopping."""
    member = ctx["members"][config["final"]]
    student_trial(member["config"], {**ctx, "teacher": member.get("teacher")})


# ---- running a stage -------------------------------------------------------------------
def run_tune_stage(stage: str, trainable, ctx: dict, cfg: Config, space: dict | None, metric: str | None,
                   num_samples: int, point: dict | None = None, max_t: int = 0, grid: list | None = None):
    """Fit (or restore and finish) one Tune experiment; returns its ResultGrid."""
    import optuna
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler
    from ray.tune.search.optuna import OptunaSearch

    optuna.logging.set_verbosity(optuna.logging.INFO if verbose() else optuna.logging.WARNING)
    # Tune's new output engine prints its experiment header even at verbose=0; the legacy one does not
    os.environ["RAY_AIR_NEW_OUTPUT"] = "1" if verbose() else "0"
    path = join(ctx["storage"], stage)
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
            searcher = OptunaSearch(metric=metric, mode="max", points_to_evaluate=[flat_point(point)],
                                    sampler=optuna.samplers.TPESampler(seed=cfg.tune.seed))
            scheduler = ASHAScheduler(time_attr="training_iteration", max_t=max_t,
                                      grace_period=min(cfg.tune.grace_period, max_t),
                                      reduction_factor=cfg.tune.reduction_factor)
            tune_config = tune.TuneConfig(metric=metric, mode="max", search_alg=searcher, scheduler=scheduler,
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


def best_trial(grid, metric: str):
    """Best trial by the best value it ever reported (ASHA-stopped trials included): Tune's
    ``get_best_result(scope="all")``; -> (its Result, that value)."""
    try:
        best = grid.get_best_result(metric=metric, mode="max", scope="all")
    except RuntimeError as exc:
        raise RuntimeError(f"no trial reported {metric!r}") from exc
    df = best.metrics_dataframe
    if df is None or metric not in df or df[metric].dropna().empty:
        raise RuntimeError(f"no trial reported {metric!r}")
    return best, float(df[metric].max())


def _latest_state(train_storage: str) -> dict:
    from ray.train import Result
    result = Result.from_path(join(train_storage, "train"))
    return engine.final_state(result)


def _trial_summary(grid, metric: str) -> list[dict]:
    rows = []
    for r in grid:
        df = r.metrics_dataframe
        rows.append({"trial_id": r.metrics.get("trial_id") if r.metrics else None,
                     "best": float(df[metric].max()) if df is not None and metric in df else None,
                     "epochs": int(len(df)) if df is not None else 0, "error": str(r.error) if r.error else None})
    return rows


def stage1(cfg: Config, ctx: dict, out: Outputs, n_train: int, classes: list[str]) -> dict:
    from .teacher import export_teacher

    record = out.read_record("stage1_teacher")
    if record:
        print(f"[stage1_teacher] done before: best {TEACHER_METRIC} {record['best_metric']:.2f}", flush=True)
        return record
    space, point = teacher_space(cfg, n_train)
    grid = run_tune_stage("stage1_teacher", teacher_trial, {**ctx, "stage": "stage1_teacher"}, cfg, space,
                          TEACHER_METRIC, cfg.tune.teacher_trials, point, max_t=cfg.tune.asha_max_t or cfg.teacher.epochs)
    best, value = best_trial(grid, TEACHER_METRIC)
    best_cfg = Config.from_dict(best.config)
    state = _latest_state(join(ctx["storage"], "stage1_teacher_runs", best.metrics["trial_id"]))
    export_teacher(best_cfg, state, out.local("best_teacher.pt"), classes)
    params = {k: best.config[k.split(".")[0]][k.split(".")[1]] for k in space}
    return out.write_record("stage1_teacher", {
        "best_metric": value, "metric": TEACHER_METRIC, "best_params": params, "paper_point": point,
        "best_config": best_cfg.to_dict(), "teacher": out.publish("best_teacher.pt"),
        "trials": _trial_summary(grid, TEACHER_METRIC)})


def stage2(cfg: Config, ctx: dict, out: Outputs, s1: dict) -> dict:
    record = out.read_record("stage2_student")
    if record:
        print(f"[stage2_student] done before: best {STUDENT_METRIC} {record['best_metric']:.2f}", flush=True)
        return record
    base = Config.from_dict({**s1["best_config"], "student": cfg.to_dict()["student"]})
    base = base.with_overrides({"student.mode": "distill"})
    space, point = student_space(base)
    grid = run_tune_stage("stage2_student", student_trial, {**ctx, "stage": "stage2_student", "teacher": s1["teacher"]},
                          base, space, STUDENT_METRIC, cfg.tune.student_trials, point,
                          max_t=cfg.tune.asha_max_t or base.student.epochs)
    best, value = best_trial(grid, STUDENT_METRIC)
    params = {k: best.config[k.split(".")[0]][k.split(".")[1]] for k in space}
    return out.write_record("stage2_student", {
        "best_metric": value, "metric": STUDENT_METRIC, "best_params": params, "paper_point": point,
        "best_config": Config.from_dict(best.config).to_dict(), "trials": _trial_summary(grid, STUDENT_METRIC)})


def final_members(cfg: Config, s1: dict, s2: dict, teacher: str) -> dict[str, dict]:
    """Stage-3 runs: supervised baseline and fine-tune (same budget), and the distilled members."""
    best = Config.from_dict(s2["best_config"])
    split = cfg.tune.final_train_split or best.data.train_split
    common = {"data.train_split": split}
    members = {
        "supervised": {"config": best.with_overrides({**common, "student.mode": "supervised"}).to_dict()},
        "finetune": {"config": best.with_overrides({**common, "student.mode": "finetune"}).to_dict(),
                     "teacher": teacher},
    }
    seeds = cfg.tune.final_seeds or list(range(cfg.tune.final_members))
    for i in range(cfg.tune.final_members):
        over = {**common, "student.mode": "distill", "student.seed": seeds[i % len(seeds)]}
        if cfg.tune.final_backbones:
            over["student.backbone"] = cfg.tune.final_backbones[i % len(cfg.tune.final_backbones)]
        members[f"distill_{i}"] = {"config": best.with_overrides(over).to_dict(), "teacher": teacher}
    return members


def stage3(cfg: Config, ctx: dict, out: Outputs, s1: dict, s2: dict, classes: list[str]) -> dict:
    from .student import export_student

    record = out.read_record("stage3_final")
    if record:
        print("[stage3_final] done before", flush=True)
        return record
    teacher = s1["teacher"]
    if cfg.tune.retrain_teacher_epochs:
        teacher = retrain_teacher(cfg, out, s1)
    members = final_members(cfg, s1, s2, teacher)
    for name, m in members.items():
        backbone = m["config"]["student"]["backbone"]
        if m.get("teacher") and backbone != s1["best_config"]["teacher"]["backbone"]:
            raise ConfigError(f"tune.final_backbones: member {name} uses {backbone}, but the teacher is a "
                              f"{s1['best_config']['teacher']['backbone']} (distillation needs the same architecture)")
    grid = run_tune_stage("stage3_final", final_trial, {**ctx, "stage": "stage3_final", "members": members}, cfg,
                          None, None, 1, grid=list(members))
    models = {}
    for result in grid:
        name = result.config["final"]
        if result.error:
            raise RuntimeError(f"[stage3_final] {name} failed: {result.error}")
        state = _latest_state(join(ctx["storage"], "stage3_final_runs", result.metrics["trial_id"]))
        export_student(Config.from_dict(members[name]["config"]), state, out.local(f"{name}.pt"), classes,
                       members[name].get("teacher"))
        models[name] = out.publish(f"{name}.pt")
    return out.write_record("stage3_final", {"models": models, "teacher": teacher})


def retrain_teacher(cfg: Config, out: Outputs, s1: dict) -> str:
    """Stage 3 option: retrain the best teacher config for longer (a plain Train run)."""
    from .teacher import pretrain

    best = Config.from_dict(s1["best_config"]).with_overrides(
        {"teacher.epochs": cfg.tune.retrain_teacher_epochs, "name": "teacher_long"})
    final = pretrain(best, run_dir=out.local("teacher_long", "teacher.pt").parent,
                     storage_path=out.path("teacher_long"), outputs=out.path("teacher_long"))
    out.publish("teacher_long")
    return out.path("teacher_long", Path(final["teacher"]).name)


# ---- test evaluation and summary -------------------------------------------------------
def evaluate_all(cfg: Config, out: Outputs, s1: dict, s3: dict) -> dict:
    """The paper-shaped table on the test split (each evaluation a Ray task, GPU when present)."""
    import ray

    from .evaluate import evaluate_models, probe_teacher, write_eval_outputs

    record = out.read_record("evaluation")
    if record:
        return record
    gpus = cfg.tune.eval_gpus or (1 if ray.cluster_resources().get("GPU", 0) >= 1 else 0)
    data = Config.from_dict(s1["best_config"]).data
    ev = ray.remote(num_cpus=cfg.tune.driver_cpus, num_gpus=gpus)(evaluate_models)
    pr = ray.remote(num_cpus=cfg.tune.driver_cpus, num_gpus=gpus)(probe_teacher)
    m = s3["models"]
    members = [m[k] for k in sorted(m) if k.startswith("distill_")]
    # reports come back to this driver and are written here, whichever node evaluated them
    jobs = {
        "supervised": ev.remote(data, "test", [m["supervised"]], out_dir=None),
        "finetune": ev.remote(data, "test", [m["finetune"]], out_dir=None),
        "distill": ev.remote(data, "test", members[:1], out_dir=None),
        "distill_10crop": ev.remote(data, "test", members[:1], ten_crop=True, out_dir=None),
        "ensemble_10crop": ev.remote(data, "test", members, ten_crop=True, out_dir=None),
    }
    probe = pr.remote(data, s3["teacher"], splits=("val", "test"))
    results = {k: ray.get(v) for k, v in jobs.items()}
    for name, report in results.items():
        write_eval_outputs(report, out.path("eval", name))
    probe_scores = ray.get(probe)
    rows = [
        ("supervised from scratch", results["supervised"]["top1"], m["supervised"]),
        ("phase 1 + linear probe", probe_scores["test_top1"], s3["teacher"]),
        ("phase 1 + fine-tune", results["finetune"]["top1"], m["finetune"]),
        ("phase 1 + phase 2 (distill)", results["distill"]["top1"], members[0]),
        ("+ 10-crop", results["distill_10crop"]["top1"], members[0]),
        (f"+ ensemble of {len(members)} (10-crop)", results["ensemble_10crop"]["top1"], ", ".join(members)),
    ]
    return out.write_record("evaluation", {
        "table": [{"configuration": r[0], "test_top1": r[1], "model": r[2]} for r in rows],
        "n_test_images": results["supervised"]["n_images"], "linear_probe_val_top1": probe_scores["val_top1"]})


def render_table(rows: list[dict]) -> str:
    lines = ["| configuration | test top-1 (%) |", "|---|---|"]
    lines += [f"| {r['configuration']} | {r['test_top1']:.2f} |" for r in rows]
    return "\n".join(lines)


def write_summary(out: Outputs, cfg: Config, s1: dict, s2: dict, s3: dict, ev: dict, command: str) -> dict:
    summary = {
        "experiment": cfg.tune.experiment, "command": command, "storage": out.location,
        "stage1_teacher": {k: s1[k] for k in ("metric", "best_metric", "best_params", "paper_point", "teacher")},
        "stage2_student": {k: s2[k] for k in ("metric", "best_metric", "best_params", "paper_point")},
        "models": s3["models"], "table": ev["table"], "n_test_images": ev["n_test_images"],
    }
    out.write_record("summary", summary)
    md = [f"# {cfg.tune.experiment}", "", f"Command: `{command}`", "",
          f"Test images: {ev['n_test_images']}", "", render_table(ev["table"]), "",
          "## Best parameters", "",
          f"- stage 1 (teacher, {s1['metric']} {s1['best_metric']:.2f}): {s1['best_params']}",
          f"- stage 2 (student, {s2['metric']} {s2['best_metric']:.2f}): {s2['best_params']}", "",
          "## Models", ""] + [f"- {k}: `{v}`" for k, v in {"teacher": s1["teacher"], **s3["models"]}.items()]
    storage.write_text(out.path("summary.md"), "\n".join(md) + "\n")
    return summary


# ---- entry point -----------------------------------------------------------------------
def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="tune_margin.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", help="YAML config (sections data/resources/teacher/student/tune)")
    p.add_argument("--data", help="data set root; default: generate the embedded demo data")
    p.add_argument("--storage", help="local folder or s3:// / gs:// URI for all outputs (tune.storage)")
    p.add_argument("--name", help="experiment name (tune.experiment); re-running a name resumes it")
    p.add_argument("--max-concurrent-trials", type=int, help="for autoscaling clusters whose nodes do not exist yet")
    p.add_argument("--smoke", action="store_true", help="tiny trials on demo data (minutes on a laptop)")
    p.add_argument("--verbose", action="store_true", help="Tune's own tables and Ray's logs as well")
    p.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. teacher.epochs=50")
    return overrides_anywhere(p, sys.argv[1:] if argv is None else argv)


def build_config(args: argparse.Namespace) -> Config:
    """Config file < preset (``--smoke``: raypipe/presets/smoke.yaml; neither --data nor --config:
    laptop.yaml) < flags (typed values, never re-parsed) < dotted overrides."""
    name = "smoke" if args.smoke else None if (args.data or args.config) else "laptop"
    flags = {"tune.storage": args.storage, "tune.experiment": args.name,
             "tune.max_concurrent_trials": args.max_concurrent_trials, "data.root": args.data}
    overrides = {**(preset(name) if name else {}), **{k: v for k, v in flags.items() if v is not None},
                 **parse_overrides(list(args.overrides))}
    return load_config(args.config, overrides)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    set_verbose(args.verbose)
    command = "python experiments/tune_margin.py " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:]))
    cfg = build_config(args)  # every config and storage error surfaces here, before Ray starts
    out = Outputs(join(storage.normalize(cfg.tune.storage), cfg.tune.experiment))
    storage.check_writable(out.location)
    if not cfg.data.root:
        cfg = cfg.with_overrides({"data.root": demo_data(out, args.smoke)})
    index = scan_dataset(cfg.data, ("train", "val", "test"))  # layout errors before Ray starts
    queue_candidates(cfg, len(index["train"]))
    cfg.dump(out.local("config.yaml"))
    out.publish("config.yaml")
    started = time.time()
    engine.ensure_ray()
    ctx = {"storage": out.location}
    classes = index["train"].classes
    s1 = stage1(cfg, ctx, out, len(index["train"]), classes)
    s2 = stage2(cfg, ctx, out, s1)
    s3 = stage3(cfg, ctx, out, s1, s2, classes)
    ev = evaluate_all(cfg, out, s1, s3)
    summary = write_summary(out, cfg, s1, s2, s3, ev, command)
    print(f"\n{cfg.tune.experiment}: test top-1 on {ev['n_test_images']} images "
          f"({time.time() - started:.0f} s this run)\n{render_table(ev['table'])}\n"
          f"\nbest teacher params: {short(s1['best_params'])}\nbest student params: {short(s2['best_params'])}\n"
          f"summary: {out.path('summary.md')}\ninspect: raypipe results {out.location}", flush=True)
    return summary


def demo_data(out: Outputs, smoke: bool) -> str:
    """The embedded demo data set, generated once into the experiment's storage (so every node
    of a cluster reads it from there); -> its location."""
    if not storage.is_dir(out.path("demo_data", "test")):
        from .demo import make_demo_data
        make_demo_data(out.local("demo_data"), SMOKE_DEMO if smoke else DEMO, size=32 if smoke else 64)
        out.publish("demo_data")
    return out.path("demo_data")


def short(params: dict) -> str:
    return ", ".join(f"{k} {progress.fmt(v)}" for k, v in params.items())


def cli_main(argv: list[str] | None = None) -> int:
    """``main`` with bad input reported as one line (exit 2) instead of a traceback."""
    from .data import DataError
    try:
        main(argv)
    except (ConfigError, DataError, engine.CheckpointError, FileNotFoundError) as exc:
        print(f"tune_margin: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(cli_main())
