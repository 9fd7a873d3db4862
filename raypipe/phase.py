"""The phase runner: the launch sequence both phases share (run location and config.yaml,
preflight, decode, Ray Data views, TorchTrainer, export, metrics.json); a phase module says only
what differs (``teacher.TeacherPhase``, ``student.StudentPhase``)."""
from __future__ import annotations

import contextlib
import json
import shutil
import tempfile
from pathlib import Path

from . import registry, storage
from .storage import Outputs, join
from .checkpoints import best_weights
from .cluster import preflight, resolve_use_gpu
from .config import Config
from .console import verbose
from .registry import DISTILLERS
from .settings import TEACHER_CHOICE
from .data import decode_split, eval_dataset, scan_dataset, with_views
from .raytrain import final_state, run_trainer
from .student import StudentPhase
from .teacher import TeacherPhase
from .transforms import views_on_device


def run_location(cfg: Config) -> storage.Outputs:
    """Where a run's files go: ``output_dir/name`` (a local folder or a URI; for a URI they are made
    in a local scratch folder and published there as they are made)."""
    location = storage.join(storage.normalize(cfg.output_dir), cfg.name)
    scratch = Path(tempfile.mkdtemp(prefix="raypipe-run-")) if storage.is_uri(location) else None
    return storage.Outputs(location, scratch=scratch)


def pretrain(cfg: Config, out: storage.Outputs | None = None, callbacks: list | None = None,
             print_epochs: bool = True) -> dict:
    """Phase 1 end to end: check data, decode it with Ray Data, train, export ``teacher.pt``."""
    index = scan_dataset(cfg.data, ("train", "val"))  # layout errors before any Ray resource
    return run_phase(cfg, TeacherPhase(cfg, index), index, out, callbacks, print_epochs)


def train_student(cfg: Config, teacher_path: str | Path | None = None, out: storage.Outputs | None = None,
                  callbacks: list | None = None, print_epochs: bool = True) -> dict:
    """Phase 2 end to end: check teacher and data, train, export ``student.pt``."""
    index = scan_dataset(cfg.data, ("train", "val"))
    return run_phase(cfg, StudentPhase(cfg, index, teacher_path), index, out, callbacks, print_epochs)


def run_phase(cfg: Config, phase, index: dict, out: storage.Outputs | None = None, callbacks: list | None = None,
              print_epochs: bool = True) -> dict:
    """The launch sequence of a phase, after its own checks on the scanned ``index``: the run's
    location (``out``, default ``run_location(cfg)``; a Tune trial passes its own) and config.yaml,
    preflight, decode train/val once with Ray Data, data report, TorchTrainer (resumes a re-run),
    export of the best epoch's weights (by ``phase.best_metric``), metrics.json. Every file goes to
    the location as it is made; ``print_epochs=False`` leaves the epoch lines to Tune's callback."""
    run = out or run_location(cfg)
    cfg.dump(run.local("config.yaml"))
    run.publish("config.yaml")
    preflight(cfg.resources)  # cluster can host the workers: checked before data is read
    decoded = {s: decode_split(index[s], cfg.data) for s in ("train", "val")}
    skipped = write_data_report(run, decoded)
    phase.check_decoded(decoded)
    device_views = views_on_device(phase.recipes, cfg.data.augment_on, resolve_use_gpu(cfg.resources))
    datasets = {"train": with_views(decoded["train"], phase.recipes, cfg.data, on_device=device_views),
                **{name: eval_dataset(decoded[split], cfg.data) for name, split in phase.eval_splits.items()}}
    meta = {"n_train": decoded["train"].count, "num_classes": len(index["train"].classes),
            "print_epochs": print_epochs, "outputs": run.location, "score_metric": phase.best_metric,
            "device_views": device_views, **phase.meta()}
    loop_config = {"cfg": cfg.to_dict(), "meta": meta, "plugins": registry.snapshot(), "run": phase.run}
    result = run_trainer(cfg, loop_config, datasets, run, callbacks=callbacks)
    state = final_state(result)
    exported = best_weights(state)
    phase.export(exported, run.local(phase.model_file))
    if phase.final_file:   # the last epoch's weights as well: the state as it ended
        phase.export({**state, "best_epoch": None}, run.local(phase.final_file))
    history = state["history"]
    final = {"phase": phase.name, "epochs": len(history), **history[-1],
             f"best_{phase.best_metric}": max((h.get(phase.best_metric, 0.0) for h in history), default=0.0),
             phase.model_key: run.publish(phase.model_file), "exported_epoch": exported["best_epoch"],
             **({"final_model": run.publish(phase.final_file)} if phase.final_file else {}),
             "device_views": device_views, "skipped_images": skipped, "n_train": decoded["train"].count,
             "checkpoint": storage.location_of(result.checkpoint.filesystem, result.checkpoint.path)}
    run.local("metrics.json").write_text(json.dumps(final, indent=2, default=str))
    run.publish("metrics.json")   # metrics.csv and TensorBoard were written epoch by epoch (loop.EpochLog)
    return final


def write_data_report(run: storage.Outputs, decoded: dict) -> int:
    """``data_report.json``: images used and skipped (with paths and reasons) per split."""
    report = {name: {"images": d.count, "skipped": len(d.skipped), "skipped_files": d.skipped}
              for name, d in decoded.items()}
    run.local("data_report.json").write_text(json.dumps(report, indent=2))
    where = run.publish("data_report.json")
    total = sum(len(d.skipped) for d in decoded.values())
    if total:
        print(f"skipped {total} unreadable image(s); see {where}", flush=True)
        for name, d in decoded.items():
            for item in d.skipped[:5]:
                print(f"  [{name}] {item['path']}: {item['error']}", flush=True)
    return total


# ---- Tune trial drivers: each trial of the main job's search runs one phase ------------------
@contextlib.contextmanager
def trial_run(ctx: dict):
    """-> the trial's run location: a folder in the experiment's storage that holds the trial's
    Train run (checkpoints) and its files, which go there as they are made, named after the trial
    id (no timestamp, so a retried or restored trial resumes); its local scratch folder is removed
    afterwards."""
    from ray import tune
    location = join(ctx["storage"], f"{ctx['stage']}_runs", tune.get_context().get_trial_id())
    scratch = Path(tempfile.mkdtemp(prefix="raypipe-trial-"))
    try:
        yield Outputs(location, scratch=scratch)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def teacher_trial(config: dict, ctx: dict) -> None:
    from ray.tune.integration.ray_train import TuneReportCallback

    registry.install(ctx.get("plugins"))
    with trial_run(ctx) as out:
        pretrain(Config.from_dict(config), out, callbacks=[TuneReportCallback()], print_epochs=verbose())


def trial_teacher(config: dict, ctx: dict) -> tuple[dict, str | None]:
    """A student trial's config without the teacher choice, and its teacher: stage 1's
    ``teacher_rank``-th best (``ctx["teachers"]``) where the search chooses, else ``ctx["teacher"]``."""
    config = dict(config)
    rank = config.pop(TEACHER_CHOICE, None)
    return config, ctx["teachers"][rank - 1] if rank else ctx.get("teacher")


def student_trial(config: dict, ctx: dict) -> None:
    from ray.tune.integration.ray_train import TuneReportCallback

    registry.install(ctx.get("plugins"))
    config, teacher = trial_teacher(config, ctx)
    cfg = Config.from_dict(config)
    teacher = teacher if DISTILLERS.get_class(cfg.student.mode).uses_teacher else None
    with trial_run(ctx) as out:
        train_student(cfg, teacher, out, callbacks=[TuneReportCallback()], print_epochs=verbose())


def final_trial(config: dict, ctx: dict) -> None:
    """Stage 3: one of the final models (``config['final']`` says which), no early stopping."""
    member = ctx["members"][config["final"]]
    student_trial(member["config"], {**ctx, "teacher": member.get("teacher")})
