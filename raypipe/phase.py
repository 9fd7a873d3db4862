"""The phase runner: the launch sequence both phases share (run folder, preflight, decode, Ray Data
views, TorchTrainer, export, metrics.json); a phase module only says what differs."""
from __future__ import annotations

import gc
import json
import signal
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from . import storage
from .checkpoints import LocalCheckpoints, best_weights, final_state
from .cluster import check_cluster_can_fit, preflight, resolve_use_gpu
from .config import Config, verbose


@dataclass
class Phase:
    """What one phase adds to the shared launch sequence of ``run_phase``."""

    name: str                                   # "pretrain", or the student's mode
    train_loop: Callable[[dict], None]          # runs on every Train worker
    views: Callable[[dict, bool], dict]         # decoded splits, views on device? -> the trainer's datasets
    export: Callable[[dict, Path], Path]        # final checkpoint state -> the model file
    model_file: str                             # "teacher.pt" / "student.pt"
    model_key: str                              # its key in metrics.json ("teacher" / "model")
    best_metric: str                            # ranks epochs: the exported weights are the best epoch's
    meta: Callable[[], dict] = dict             # extra values for the workers (called once Ray is up)
    check_decoded: Callable[[dict], None] | None = None  # e.g. enough images for one global batch
    augment: str = "student"                    # whose augmentation recipe (augment.on_device)


def run_phase(cfg: Config, phase: Phase, index: dict, run_dir: Path | None = None, callbacks: list | None = None,
              storage_path: str | None = None, print_epochs: bool = True, outputs: str | None = None,
              publish_model: bool = True) -> dict:
    """The launch sequence of a phase, after its own checks on the scanned ``index``: run folder and
    config.yaml, preflight, decode train/val once with Ray Data, data report, TorchTrainer (resumes
    a re-run), export of the best epoch's weights (by ``phase.best_metric``), metrics.json.
    ``outputs``: where the run's files are published (folder or URI; default run_dir, or
    output_dir/name when output_dir is a URI); ``publish_model=False`` keeps the model file local
    (a Tune trial: its stage exports what it keeps)."""
    from . import plugins
    from .augment import on_device
    from .data import decode_split

    run = prepare_run(cfg, run_dir, outputs)
    preflight(cfg)  # cluster can host the workers: checked before data is read
    decoded = {s: decode_split(index[s], cfg.data) for s in ("train", "val")}
    skipped = write_data_report(run, decoded)
    if phase.check_decoded:
        phase.check_decoded(decoded)
    device_views = on_device(cfg, phase.augment, resolve_use_gpu(cfg.resources))
    meta = {"n_train": decoded["train"].count, "num_classes": len(index["train"].classes),
            "print_epochs": print_epochs, "outputs": run.location, "score_metric": phase.best_metric,
            "device_views": device_views, **phase.meta()}
    loop_config = {"cfg": cfg.to_dict(), "meta": meta, "plugins": plugins.selected(cfg)}
    result = run_trainer(phase.train_loop, cfg, loop_config, phase.views(decoded, device_views), run,
                         callbacks=callbacks, storage_path=storage_path)
    state = final_state(result)
    exported = best_weights(state)
    phase.export(exported, run.local(phase.model_file))
    history = state["history"]
    final = {"phase": phase.name, "epochs": len(history), **history[-1],
             f"best_{phase.best_metric}": max((h.get(phase.best_metric, 0.0) for h in history), default=0.0),
             phase.model_key: run.publish(phase.model_file) if publish_model else str(run.local(phase.model_file)),
             "exported_epoch": exported["best_epoch"], "device_views": device_views, "skipped_images": skipped,
             "n_train": decoded["train"].count,
             "checkpoint": storage.location_of(result.checkpoint.filesystem, result.checkpoint.path)}
    write_run_outputs(run, final)
    return final


def run_trainer(train_fn: Callable, cfg: Config, loop_config: dict, datasets: dict, run,
                callbacks: list | None = None, storage_path: str | None = None):
    """Build and fit the TorchTrainer of one phase (``run``: its ``storage.Outputs``); re-running the
    same run resumes it."""
    from ray.train import CheckpointConfig, DataConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    res = cfg.resources
    use_gpu = resolve_use_gpu(res)
    check_cluster_can_fit(res, use_gpu)
    per_worker = {"CPU": res.cpus_per_worker}
    if use_gpu:
        per_worker["GPU"] = res.gpus_per_worker
    scaling = ScalingConfig(num_workers=res.num_workers, use_gpu=use_gpu,
                            resources_per_worker=per_worker if res.num_workers else None,
                            placement_strategy=res.placement_strategy)
    if storage_path:                  # given by the caller (a Tune trial's own folder)
        train_storage = storage_path
    elif res.storage_path:            # shared / remote storage from the config
        train_storage = f"{res.storage_path.rstrip('/')}/{cfg.name}"
    else:                             # the run's own location (its folder, or its URI)
        train_storage = run.location
    from ray.train import LoggingConfig

    run_config = RunConfig(
        name="train", storage_path=train_storage, callbacks=callbacks or [],
        # quiet: an early-stopped trial makes Train log an expected shutdown traceback as a warning
        logging_config=LoggingConfig(log_level="INFO" if verbose() else "ERROR"),
        checkpoint_config=CheckpointConfig(num_to_keep=res.keep_checkpoints),
        failure_config=FailureConfig(max_failures=res.max_failures))
    if res.num_workers == 0:   # Train's local mode keeps no checkpoints: the loop keeps them, in the run's outputs
        loop_config = {**loop_config, "local_checkpoints": LocalCheckpoints(
            str((run.scratch / "local_checkpoints").resolve()),
            run.path("local_checkpoints") if storage.is_uri(run.location) else None, res.keep_checkpoints)}
    trainer = TorchTrainer(train_fn, train_loop_config=loop_config, scaling_config=scaling,
                           run_config=run_config, datasets=datasets,
                           dataset_config=DataConfig(datasets_to_split=["train"]))
    # fit() installs a SIGINT handler that holds the Train controller's handle, which keeps the
    # controller and its dataset actors alive after the run; restoring the handler frees them.
    main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.getsignal(signal.SIGINT) if main_thread else None
    try:
        return trainer.fit()
    finally:
        if main_thread:
            signal.signal(signal.SIGINT, previous)
        del trainer
        gc.collect()



def write_run_outputs(run, final: dict) -> None:
    """``metrics.json`` (the run's summary); metrics.csv and TensorBoard were written epoch by
    epoch (EpochLog)."""
    run.local("metrics.json").write_text(json.dumps(final, indent=2, default=str))
    run.publish("metrics.json")


def prepare_run(cfg: Config, run_dir: Path | None = None, outputs: str | None = None):
    """The run's ``storage.Outputs``: files are made in ``run_dir`` (default output_dir/name) and
    published to ``outputs`` (a local folder or URI; default: run_dir itself); config.yaml first."""
    if run_dir is None and storage.is_uri(cfg.output_dir):   # made here, kept in the bucket
        run_dir, outputs = Path(tempfile.mkdtemp(prefix="raypipe-run-")), outputs or storage.join(cfg.output_dir, cfg.name)
    run_dir = Path(run_dir) if run_dir else Path(cfg.output_dir) / cfg.name
    run_dir.mkdir(parents=True, exist_ok=True)
    run = storage.Outputs(outputs or str(run_dir), scratch=run_dir)
    cfg.dump(run.local("config.yaml"))
    run.publish("config.yaml")
    return run



def write_data_report(run, decoded: dict) -> int:
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

