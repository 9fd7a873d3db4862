"""The thin adapter that binds the Ray-free worker loop (``raypipe.loop``) to Ray Train: the
TorchTrainer of a phase, the ``Session`` its workers run with (dataset shards, ``ray.train.report``
with checkpoints, Train's checkpoint to resume from, with a fallback past a torn one), and the
final checkpoint of a finished run."""
from __future__ import annotations

import dataclasses
import gc
import signal
import tempfile
import threading
from pathlib import Path

import pyarrow.fs as pafs
import ray.train
import torch
from ray.train import Checkpoint
from ray.train.torch import TorchConfig
from ray.train.torch.config import _TorchBackend   # private: ray is pinned (requirements/cluster.lock)

from . import registry, storage
from .checkpoints import STATE_FILE, LocalCheckpoints, load_state_file, write_state
from .cluster import check_cluster_can_fit, resolve_use_gpu
from .config import Config
from .console import verbose
from .errors import CheckpointError


class RaySession:
    """A Train worker's ``loop.Session``: its shard of ``train`` (and the whole eval splits), the
    device Train gave it, reports with checkpoints (rank 0's state; kept by ``local`` in Train's
    local mode, else in a temporary folder that Train copies to storage)."""

    def __init__(self, local: LocalCheckpoints | None = None):
        self.local = local
        self.device = worker_device()
        self.node = ray.get_runtime_context().get_node_id() if ray.is_initialized() else "local"

    def batches(self, split: str, batch_size: int, shuffle_buffer: int = 0):
        return ray.train.get_dataset_shard(split).iter_torch_batches(   # to this worker's device (not Train's guess)
            batch_size=batch_size, drop_last=split == "train", local_shuffle_buffer_size=shuffle_buffer or None,
            device=self.device)

    def resume_state(self) -> dict | None:
        return load_resume_state(self.local)

    def report(self, metrics: dict, state: dict | None) -> None:
        """Every worker reports (Train's barrier); the main one attaches the checkpoint when given."""
        if state is None or ray.train.get_context().get_world_rank() != 0:
            ray.train.report(metrics)
            return
        if self.local:
            ray.train.report(metrics, checkpoint=Checkpoint.from_directory(str(self.local.save(state, metrics["epoch"]))))
            return
        with tempfile.TemporaryDirectory(prefix="raypipe-ckpt-") as folder:
            write_state(state, Path(folder))
            ray.train.report(metrics, checkpoint=Checkpoint.from_directory(folder))


def worker_device() -> torch.device:
    """The device Train gave this worker, if torch can see it: a GPU Ray assigned without a CUDA
    device behind it (a logical GPU, e.g. on a test cluster) means CPU, said once by the first worker."""
    try:
        from ray.train.torch import get_device
        device = get_device()
    except Exception:  # Train's local mode may have no device context
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cuda" and not torch.cuda.is_available():
        if ray.train.get_context().get_world_rank() == 0:
            # one text for every worker and node: the job shows a note once (console.OnceNotes)
            print("note: Ray assigned GPUs that torch cannot see (no CUDA device on the node): training on CPU "
                  "(process group: gloo)", flush=True)
        return torch.device("cpu")
    return device


def _cuda_seen() -> bool:
    return torch.cuda.is_available()


class _SeenDeviceBackend(_TorchBackend):
    """Train's torch backend, with the process group's backend chosen from what the workers' torch
    sees: Train picks NCCL whenever GPUs are requested (TorchTrainer sets it on the driver), which
    fails on a GPU torch cannot see."""

    def on_start(self, worker_group, backend_config: TorchConfig):
        if backend_config.backend in (None, "nccl") and worker_group.get_resources_per_worker().get("GPU", 0) > 0 \
                and not all(worker_group.execute(_cuda_seen)):
            backend_config = dataclasses.replace(backend_config, backend="gloo")
        super().on_start(worker_group, backend_config)


class SeenDeviceTorchConfig(TorchConfig):
    @property
    def backend_cls(self):
        return _SeenDeviceBackend


def train_worker(loop_config: dict) -> None:
    """Every phase's ``train_loop_per_worker``: the config and plug-ins sent by the driver, then
    the phase's own Ray-free loop (``loop_config["run"]``: ``teacher.run`` / ``student.run``)."""
    registry.install(loop_config.get("plugins"))
    cfg = Config.from_dict(loop_config["cfg"])
    loop_config["run"](cfg, loop_config["meta"], RaySession(loop_config.get("local_checkpoints")))


def load_resume_state(local: LocalCheckpoints | None = None) -> dict | None:
    """The newest readable checkpoint of this run (after a failure or a re-run), or None.

    Ray Train hands over its latest checkpoint; if that file is torn (a write interrupted half
    way), the previous complete checkpoint in the same storage folder is used instead. In Train's
    local mode Train hands over none: the newest of ``local`` is the one.
    """
    ckpt = ray.train.get_checkpoint()
    if ckpt is None and local and (folder := local.newest()):
        ckpt = ray.train.Checkpoint.from_directory(str(folder))
    if ckpt is None:
        return None
    try:
        with ckpt.as_directory() as folder:
            return load_state_file(Path(folder) / STATE_FILE)
    except CheckpointError as exc:
        for older in _older_checkpoints(ckpt):
            try:
                with older.as_directory() as folder:
                    state = load_state_file(Path(folder) / STATE_FILE)
                print(f"WARNING: {exc}; resuming from the previous checkpoint {older.path} instead", flush=True)
                return state
            except CheckpointError:
                continue
        raise CheckpointError(f"{exc}; no older complete checkpoint next to it to fall back to") from exc


def _older_checkpoints(ckpt) -> list:
    """Sibling ``checkpoint_*`` folders of a Train checkpoint, newest first, excluding it."""
    parent = ckpt.path.rstrip("/").rsplit("/", 1)[0]
    infos = ckpt.filesystem.get_file_info(pafs.FileSelector(parent))
    folders = sorted((i.path for i in infos if i.type == pafs.FileType.Directory
                      and i.base_name.startswith("checkpoint_") and i.path.rstrip("/") != ckpt.path.rstrip("/")),
                     reverse=True)
    return [Checkpoint(path=f, filesystem=ckpt.filesystem) for f in folders]


def final_state(result) -> dict:
    """The last checkpoint's state (history + weights) from a finished Train run."""
    if result.checkpoint is None:
        raise CheckpointError(f"the run at {result.path} finished without a checkpoint")
    with result.checkpoint.as_directory() as folder:
        return load_state_file(Path(folder) / STATE_FILE)


def run_trainer(cfg: Config, loop_config: dict, datasets: dict, run: storage.Outputs, callbacks: list | None = None):
    """Build and fit the TorchTrainer of one phase, its Train run (checkpoints) in the run's
    location (``run``: its ``storage.Outputs``); re-running the same run resumes it."""
    from ray.train import CheckpointConfig, DataConfig, FailureConfig, LoggingConfig, RunConfig, ScalingConfig
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
    run_config = RunConfig(
        name="train", storage_path=run.location, callbacks=callbacks or [],
        # quiet: an early-stopped trial makes Train log an expected shutdown traceback as a warning
        logging_config=LoggingConfig(log_level="INFO" if verbose() else "ERROR"),
        checkpoint_config=CheckpointConfig(num_to_keep=res.keep_checkpoints),
        failure_config=FailureConfig(max_failures=res.max_failures))
    if res.num_workers == 0:   # Train's local mode keeps no checkpoints: the loop keeps them, in the run's outputs
        loop_config = {**loop_config, "local_checkpoints": LocalCheckpoints(
            str((run.scratch / "local_checkpoints").resolve()),
            run.path("local_checkpoints") if storage.is_uri(run.location) else None, res.keep_checkpoints)}
    trainer = TorchTrainer(train_worker, train_loop_config=loop_config, scaling_config=scaling,
                           run_config=run_config, datasets=datasets, torch_config=SeenDeviceTorchConfig(),
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
