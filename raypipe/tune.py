"""The main job: Ray Tune + Optuna search of the teacher (margin, temperature, K, lr) and the
student (lambda, CE warm-up, lr), then the final models, the test evaluation and the summary.

Stages (each skipped on a re-run once finished, restored with ``Tuner.restore`` if interrupted):
  1. ``stage1_teacher``: each trial is a phase-1 TorchTrainer run, objective k-NN val top-1; the
     ``tune.stage2_teachers`` best teachers are exported;
  2. ``stage2_student``: each trial is a phase-2 run of the distiller ``student.mode`` (OFD by
     default) from one of them (with more than one, the teacher is a searched choice;
     docs/search.md), objective val top-1;
  3. ``stage3_final``: the baselines (``tune.baselines``: supervised, fine-tune) and the ensemble
     members of the searched distiller from the teacher of stage 2's best student (a Tune grid, so
     they run in parallel on a cluster), then the test evaluation.

What each plug-in searches is its own (``SSLMethod.search_space``, ``Distiller.search_space``).
"""
from __future__ import annotations

import argparse
import os
import shlex
import sys
import time

from . import cluster, progress, storage
from .config import Config, get_dotted, load_config, parse_args_with_overrides, parse_overrides, preset
from .console import set_verbose
from .data import scan_dataset
from .errors import USER_ERRORS, ConfigError
from .evaluate import evaluate_rows, probe_teacher, write_eval_outputs
from .phase import final_trial, pretrain, student_trial, teacher_trial, trial_teacher
from .registry import DISTILLERS
from .search import (best_state, best_trial, ranked_trials, run_tune_stage, student_space, teacher_space,
                     trial_concurrency, trial_summary)
from .settings import TEACHER_CHOICE
from .storage import Outputs, join
from .student import export_student
from .teacher import export_teacher

TEACHER_METRIC, STUDENT_METRIC = "knn_top1", "val_top1"
SMOKE_DEMO = {"train": 16, "val": 8, "test": 8}
DEMO = {"train": 50, "val": 20, "test": 20}


def stage1(cfg: Config, ctx: dict, out: Outputs, n_train: int, classes: list[str]) -> dict:
    record = out.read_record("stage1_teacher")
    if record:
        print(f"[stage1_teacher] done before: best {TEACHER_METRIC} {record['best_metric']:.2f}", flush=True)
        return record
    space, point = teacher_space(cfg, n_train)
    grid = run_tune_stage("stage1_teacher", teacher_trial, {**ctx, "stage": "stage1_teacher"}, cfg, space,
                          TEACHER_METRIC, cfg.tune.teacher_trials, [point],
                          max_t=cfg.tune.asha_max_t or cfg.teacher.epochs)
    teachers = []  # the best first: stage 2 chooses among them
    for rank, (result, value) in enumerate(ranked_trials(grid, TEACHER_METRIC)[:cfg.tune.stage2_teachers], 1):
        name = "best_teacher.pt" if rank == 1 else f"teacher_rank{rank}.pt"
        trial_cfg = Config.from_dict(result.config)
        export_teacher(trial_cfg, best_state(join(ctx["storage"], "stage1_teacher_runs", result.metrics["trial_id"])),
                       out.local(name), classes)
        teachers.append({"rank": rank, "metric": value, "params": {k: get_dotted(result.config, k) for k in space},
                         "config": trial_cfg.to_dict(), "teacher": out.publish(name)})
    best = teachers[0]
    return out.write_record("stage1_teacher", {
        "best_metric": best["metric"], "metric": TEACHER_METRIC, "best_params": best["params"], "paper_point": point,
        "best_config": best["config"], "teacher": best["teacher"], "teachers": teachers,
        "trials": trial_summary(grid, TEACHER_METRIC)})


def stage1_teachers(s1: dict) -> list[dict]:
    """Stage 1's exported teachers, best k-NN first (one in records written before the choice existed)."""
    return s1.get("teachers") or [{"rank": 1, "metric": s1["best_metric"], "params": s1["best_params"],
                                   "config": s1["best_config"], "teacher": s1["teacher"]}]


def chosen_teacher(s1: dict, s2: dict) -> dict:
    """The stage-1 teacher whose student won stage 2 on val: what stage 3 distils from."""
    return stage1_teachers(s1)[s2.get("teacher_rank", 1) - 1]


def stage2(cfg: Config, ctx: dict, out: Outputs, s1: dict) -> dict:
    record = out.read_record("stage2_student")
    if record:
        print(f"[stage2_student] done before: best {STUDENT_METRIC} {record['best_metric']:.2f}", flush=True)
        return record
    base = Config.from_dict({**s1["best_config"], "student": cfg.to_dict()["student"]})
    teachers = stage1_teachers(s1)[:cfg.tune.student_trials]
    space, points = student_space(base, len(teachers))
    stage_ctx = {**ctx, "stage": "stage2_student", "teacher": s1["teacher"], "teachers": [t["teacher"] for t in teachers]}
    grid = run_tune_stage("stage2_student", student_trial, stage_ctx, base, space, STUDENT_METRIC,
                          cfg.tune.student_trials, points,
                          max_t=cfg.tune.asha_max_t or base.student.epochs)
    best, value = best_trial(grid, STUDENT_METRIC)
    record = {"best_metric": value, "metric": STUDENT_METRIC, "best_params": {k: get_dotted(best.config, k) for k in space},
              "paper_point": points[0], "teacher_rank": best.config.get(TEACHER_CHOICE, 1),
              "trials": trial_summary(grid, STUDENT_METRIC)}
    chosen = chosen_teacher(s1, record)
    # the winner's config, its teacher section the chosen teacher's (what stage 3's members record)
    config, _ = trial_teacher(best.config, stage_ctx)
    record["best_config"] = Config.from_dict({**config, "teacher": chosen["config"]["teacher"]}).to_dict()
    if len(teachers) > 1:
        print(f"[stage2_student] distilling from stage 1's teacher {chosen['rank']} of {len(teachers)} "
              f"({TEACHER_METRIC} {chosen['metric']:.2f}): its student has the best {STUDENT_METRIC}", flush=True)
    return out.write_record("stage2_student", record)


def final_members(cfg: Config, s2: dict, teacher: str) -> dict[str, dict]:
    """Stage-3 runs: the baselines (``tune.baselines``, same budget; from the teacher where they use
    one) and the ensemble members of the searched distiller."""
    best = Config.from_dict(s2["best_config"])
    split = cfg.tune.final_train_split or best.data.train_split
    common = {"data.train_split": split}
    members = {}
    for mode in cfg.tune.baselines:
        members[mode] = {"config": best.with_overrides({**common, "student.mode": mode}).to_dict()}
        if DISTILLERS.get_class(mode).uses_teacher:
            members[mode]["teacher"] = teacher
    seeds = cfg.tune.final_seeds or list(range(cfg.tune.final_members))
    for i in range(cfg.tune.final_members):
        over = {**common, "student.seed": seeds[i % len(seeds)]}
        if cfg.tune.final_backbones:
            over["student.backbone"] = cfg.tune.final_backbones[i % len(cfg.tune.final_backbones)]
        members[f"distill_{i}"] = {"config": best.with_overrides(over).to_dict(), "teacher": teacher}
    return members


def stage3(cfg: Config, ctx: dict, out: Outputs, s1: dict, s2: dict, classes: list[str]) -> dict:
    record = out.read_record("stage3_final")
    if record:
        print("[stage3_final] done before", flush=True)
        return record
    chosen = chosen_teacher(s1, s2)
    teacher = retrain_teacher(cfg, out, chosen["config"]) if cfg.tune.retrain_teacher_epochs else chosen["teacher"]
    members = final_members(cfg, s2, teacher)
    for name, m in members.items():
        backbone, teacher_backbone = m["config"]["student"]["backbone"], chosen["config"]["teacher"]["backbone"]
        if m.get("teacher") and backbone != teacher_backbone:
            raise ConfigError(f"tune.final_backbones: member {name} uses {backbone}, but the teacher is a "
                              f"{teacher_backbone} (distillation needs the same architecture)")
    grid = run_tune_stage("stage3_final", final_trial, {**ctx, "stage": "stage3_final", "members": members}, cfg,
                          None, None, 1, grid=list(members))
    models = {}
    for result in grid:
        name = result.config["final"]
        if result.error:
            raise RuntimeError(f"[stage3_final] {name} failed: {result.error}")
        state = best_state(join(ctx["storage"], "stage3_final_runs", result.metrics["trial_id"]))
        export_student(Config.from_dict(members[name]["config"]), state, out.local(f"{name}.pt"), classes,
                       members[name].get("teacher"))
        models[name] = out.publish(f"{name}.pt")
    return out.write_record("stage3_final", {"models": models, "teacher": teacher})


def retrain_teacher(cfg: Config, out: Outputs, teacher_config: dict) -> str:
    """Stage 3 option: retrain the chosen teacher's config for longer (a plain Train run)."""
    best = Config.from_dict(teacher_config).with_overrides(
        {"teacher.epochs": cfg.tune.retrain_teacher_epochs, "name": "teacher_long"})
    run = Outputs(out.path("teacher_long"), scratch=out.local("teacher_long", "config.yaml").parent)
    return pretrain(best, run)["teacher"]


# ---- test evaluation and summary -------------------------------------------------------
def evaluate_all(cfg: Config, out: Outputs, s1: dict, s3: dict) -> dict:
    """The paper-shaped table on the test split (each evaluation a Ray task, GPU when present)."""
    import ray

    record = out.read_record("evaluation")
    if record:
        return record
    gpus = cfg.tune.eval_gpus or (1 if ray.cluster_resources().get("GPU", 0) >= 1 else 0)
    data = Config.from_dict(s1["best_config"]).data
    ev = ray.remote(num_cpus=cfg.tune.driver_cpus, num_gpus=gpus)(evaluate_rows)
    pr = ray.remote(num_cpus=cfg.tune.driver_cpus, num_gpus=gpus)(probe_teacher)
    m = s3["models"]
    members = [m[k] for k in sorted(m) if k.startswith("distill_")]
    # one task decodes the test split once and scores every model on it once per view; the
    # reports come back to this driver and are written here, whichever node evaluated them
    baselines = [b for b in cfg.tune.baselines if b in m]
    rows = {**{b: {"models": [m[b]]} for b in baselines},
            "distill": {"models": members[:1]}, "distill_10crop": {"models": members[:1], "ten_crop": True},
            "ensemble_10crop": {"models": members, "ten_crop": True}}
    evaluation = ev.remote(data, "test", rows)
    probe = pr.remote(data, s3["teacher"], splits=("val", "test"))
    results = ray.get(evaluation)
    for name, report in results.items():
        write_eval_outputs(report, out.path("eval", name))
    probe_scores = ray.get(probe)
    searched = DISTILLERS.get_class(cfg.student.mode).label
    label = {b: DISTILLERS.get_class(b).label for b in baselines}
    rows = [(label[b], results[b]["top1"], m[b]) for b in baselines if not DISTILLERS.get_class(b).uses_teacher]
    rows += [("phase 1 + linear probe", probe_scores["test_top1"], s3["teacher"])]
    rows += [(label[b], results[b]["top1"], m[b]) for b in baselines if DISTILLERS.get_class(b).uses_teacher]
    rows += [(searched, results["distill"]["top1"], members[0]),
             ("+ 10-crop", results["distill_10crop"]["top1"], members[0]),
             (f"+ ensemble of {len(members)} (10-crop)", results["ensemble_10crop"]["top1"], ", ".join(members))]
    return out.write_record("evaluation", {
        "table": [{"configuration": r[0], "test_top1": r[1], "model": r[2]} for r in rows],
        "n_test_images": results["distill"]["n_images"], "linear_probe_val_top1": probe_scores["val_top1"]})


def render_table(rows: list[dict]) -> str:
    lines = ["| configuration | test top-1 (%) |", "|---|---|"]
    lines += [f"| {r['configuration']} | {r['test_top1']:.2f} |" for r in rows]
    return "\n".join(lines)


def write_summary(out: Outputs, cfg: Config, s1: dict, s2: dict, s3: dict, ev: dict, command: str) -> dict:
    teachers = [{k: t[k] for k in ("rank", "metric", "params", "teacher")} for t in stage1_teachers(s1)]
    summary = {
        "experiment": cfg.tune.experiment, "command": command, "storage": out.location,
        "stage1_teacher": {**{k: s1[k] for k in ("metric", "best_metric", "best_params", "paper_point", "teacher")},
                           "teachers": teachers},
        "stage2_student": {**{k: s2[k] for k in ("metric", "best_metric", "best_params", "paper_point")},
                           "teacher_rank": s2.get("teacher_rank", 1)},
        "teacher": s3["teacher"], "models": s3["models"], "table": ev["table"], "n_test_images": ev["n_test_images"],
    }
    out.write_record("summary", summary)
    md = [f"# {cfg.tune.experiment}", "", f"Command: `{command}`", "",
          f"Test images: {ev['n_test_images']}", "", render_table(ev["table"]), "",
          "## Best parameters", ""]
    md += [f"- stage 1, teacher {t['rank']} ({s1['metric']} {t['metric']:.2f}): {t['params']}" for t in teachers]
    md += [f"- stage 2 (student, {s2['metric']} {s2['best_metric']:.2f}, from teacher {s2.get('teacher_rank', 1)}): "
           f"{s2['best_params']}", "", "## Models", ""]
    md += [f"- {k}: `{v}`" for k, v in {"teacher": s3["teacher"], **s3["models"]}.items()]
    storage.write_text(out.path("summary.md"), "\n".join(md) + "\n")
    return summary


# ---- entry point -----------------------------------------------------------------------
def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="tune_margin.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", help="YAML config (sections data/resources/teacher/student/tune)")
    p.add_argument("--data", help="data set root; default: generate the embedded demo data")
    p.add_argument("--storage", help="local folder or s3:// / gs:// URI for all outputs (output_dir)")
    p.add_argument("--name", help="experiment name (tune.experiment); re-running a name resumes it")
    p.add_argument("--max-concurrent-trials", type=int, help="for autoscaling clusters whose nodes do not exist yet")
    p.add_argument("--smoke", action="store_true", help="tiny trials on demo data (minutes on a laptop)")
    p.add_argument("--verbose", action="store_true", help="Tune's own tables and Ray's logs as well")
    p.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. teacher.epochs=50")
    return parse_args_with_overrides(p, sys.argv[1:] if argv is None else argv)


def build_config(args: argparse.Namespace) -> Config:
    """Config file < preset (``--smoke``: raypipe/presets/smoke.yaml; neither --data nor --config:
    laptop.yaml) < flags (typed values, never re-parsed) < dotted overrides."""
    name = "smoke" if args.smoke else None if (args.data or args.config) else "laptop"
    flags = {"output_dir": args.storage, "tune.experiment": args.name,
             "tune.max_concurrent_trials": args.max_concurrent_trials, "data.root": args.data}
    overrides = {**(preset(name) if name else {}), **{k: v for k, v in flags.items() if v is not None},
                 **parse_overrides(list(args.overrides))}
    return load_config(args.config, overrides)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    set_verbose(args.verbose)
    command = "python experiments/tune_margin.py " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:]))
    cfg = build_config(args)  # every config and storage error surfaces here, before Ray starts
    out = Outputs(join(storage.normalize(cfg.output_dir), cfg.tune.experiment))
    storage.check_writable(out.location)
    if not cfg.data.root:
        cfg = cfg.with_overrides({"data.root": demo_data(out, args.smoke)})
    index = scan_dataset(cfg.data, ("train", "val", "test"))  # layout errors before Ray starts
    teacher_space(cfg, len(index["train"]))   # e.g. queue sizes the data cannot fill: before Ray starts
    launcher = cluster.launcher_config() if os.environ.get("RAYPIPE_AUTOSCALING") == "1" else None
    if launcher:   # an autoscaling cluster: every bundle fits a node type it can launch, before anything is asked
        cluster.check_node_types(cfg, trial_concurrency(cfg, cluster.autoscaler_capacity()), *launcher)
    cfg.dump(out.local("config.yaml"))
    out.publish("config.yaml")
    started = time.time()
    cluster.ensure_ray()
    ctx = {"storage": out.location}
    classes = index["train"].classes
    s1 = stage1(cfg, ctx, out, len(index["train"]), classes)
    s2 = stage2(cfg, ctx, out, s1)
    s3 = stage3(cfg, ctx, out, s1, s2, classes)
    ev = evaluate_all(cfg, out, s1, s3)
    summary = write_summary(out, cfg, s1, s2, s3, ev, command)
    print(f"\n{cfg.tune.experiment}: test top-1 on {ev['n_test_images']} images "
          f"({time.time() - started:.0f} s this run)\n{render_table(ev['table'])}\n"
          f"\n{teacher_line(s1, s2)}\nbest student params: {short(s2['best_params'])}\n"
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


def teacher_line(s1: dict, s2: dict) -> str:
    chosen, n = chosen_teacher(s1, s2), len(stage1_teachers(s1))
    which = f" (stage 1's {chosen['rank']} of {n} by {s1['metric']}; its student won stage 2)" if n > 1 else ""
    return f"teacher params: {short(chosen['params'])}{which}"


def short(params: dict) -> str:
    return ", ".join(f"{k} {progress.fmt(v)}" for k, v in params.items())


def cli_main(argv: list[str] | None = None) -> int:
    """``main`` with bad input reported as one line (exit 2) instead of a traceback."""
    try:
        main(argv)
    except USER_ERRORS as exc:
        print(f"tune_margin: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(cli_main())
