"""What both phases share: the TorchTrainer set-up, device/AMP, LR schedule, checkpoints,
evaluation reduction and the run-folder contract. Phase modules only hold their own step."""
from __future__ import annotations

import contextlib
import gc
import inspect
import json
import math
import os
import random
import re
import signal
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.nn as nn

from . import dist
from .config import VERBOSE_ENV, Config, ConfigError, OptimConfig, ResourcesConfig, verbose

STATE_FILE = "state.pt"
MODEL_FORMAT = "raypipe-model"
MODEL_FORMAT_VERSION = 1


class CheckpointError(RuntimeError):
    """A checkpoint or exported model file is unusable (torn, other format, other architecture)."""


# ---- inside a worker ----------------------------------------------------------------
@dataclass
class Runtime:
    device: torch.device
    amp_dtype: torch.dtype | None
    channels_last: bool
    world_size: int
    rank: int
    num_nodes: int = 1

    def autocast(self):
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    def scaler(self) -> torch.amp.GradScaler:
        return torch.amp.GradScaler(self.device.type, enabled=self.amp_dtype == torch.float16)

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def make_runtime(res: ResourcesConfig, seed: int) -> Runtime:
    """Device, AMP and seeds for this worker (cuda when Train gave us a GPU, else CPU)."""
    try:
        from ray.train.torch import get_device
        device = get_device()
    except Exception:  # outside Ray Train (plain loops, benchmarks)
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if not verbose():  # Train sets the workers' root logger to INFO; some of its logs bypass ray.train
        import logging
        logging.getLogger().setLevel(logging.WARNING)
        hide_internal_deprecations()
    gpu = device.type == "cuda"
    amp = None
    if gpu and res.amp != "off":
        amp = torch.float16 if res.amp == "fp16" else torch.bfloat16
    rank = dist.rank()
    random.seed(seed + rank)
    np.random.seed(seed + rank)
    torch.manual_seed(seed + rank)
    if gpu:
        torch.backends.cudnn.benchmark = True
    return Runtime(device, amp, gpu and res.channels_last, dist.world_size(), rank, count_nodes())


def count_nodes() -> int:
    """Distinct Ray nodes the workers of this run are on (1 outside Ray)."""
    try:
        import ray
        node = ray.get_runtime_context().get_node_id() if ray.is_initialized() else "local"
    except Exception:
        node = "local"
    return len(set(dist.all_gather_objects(node)))


def wrap_ddp(module: nn.Module, rt: Runtime) -> nn.Module:
    """DDP only for trainable modules and only with several workers."""
    module.to(rt.device)
    if rt.channels_last:
        module.to(memory_format=torch.channels_last)
    if not dist.is_distributed():
        return module
    # Buffers (queue, BN statistics) start equal on every rank, then stay rank-local per step
    # (torch >= 2.14 no longer syncs them at init with broadcast_buffers=False).
    dist.broadcast_buffers(module)
    ids = [rt.device.index] if rt.device.type == "cuda" else None
    no_sync = ({"forward_sync_buffers": False}
               if "forward_sync_buffers" in inspect.signature(nn.parallel.DistributedDataParallel).parameters
               else {"broadcast_buffers": False})
    return nn.parallel.DistributedDataParallel(module, device_ids=ids, **no_sync)


def unwrap(module: nn.Module) -> nn.Module:
    return module.module if isinstance(module, nn.parallel.DistributedDataParallel) else module


def scaled_lr(opt: OptimConfig, world_size: int) -> float:
    """Linear scaling rule: the config's lr is for a global batch of 256."""
    return opt.lr * opt.batch_size * world_size / 256


def lr_at(opt: OptimConfig, base_lr: float, epoch: float) -> float:
    """Warm-up (linear) then cosine / step / constant, as a function of fractional epoch."""
    if opt.warmup_epochs and epoch < opt.warmup_epochs:
        return base_lr * (epoch + 1e-3) / opt.warmup_epochs
    if opt.schedule == "cosine":
        span = max(1e-8, opt.epochs - opt.warmup_epochs)
        return base_lr * 0.5 * (1 + math.cos(math.pi * (epoch - opt.warmup_epochs) / span))
    if opt.schedule == "step":
        return base_lr * opt.step_gamma ** int(epoch // opt.step_epochs)
    return base_lr


def make_sgd(params, opt: OptimConfig, lr: float) -> torch.optim.SGD:
    return torch.optim.SGD(params, lr=lr, momentum=opt.momentum, weight_decay=opt.weight_decay,
                           nesterov=opt.nesterov and opt.momentum > 0)


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr


def optimizer_step(loss: torch.Tensor, optimizer, scaler, params, grad_clip: float, frozen=()) -> None:
    """``frozen``: parameters left exactly as they are this step (no gradient, weight decay or
    momentum: SGD skips a parameter whose grad is None), e.g. connectors before distillation starts."""
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    for p in frozen:
        p.grad = None
    if grad_clip > 0:
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(params, grad_clip)
    scaler.step(optimizer)
    scaler.update()


class Loop:
    """The training loop's state both phases share: DDP wrapper, SGD, scaler, LR schedule,
    resume and the per-epoch report/checkpoint. A phase only writes its own step."""

    def __init__(self, model: nn.Module, opt: OptimConfig, cfg: Config, rt: Runtime, n_train: int,
                 local_checkpoint_dir: str | None = None, print_epochs: bool = True, outputs: str | None = None):
        import ray.train

        self.model, self.opt, self.cfg, self.rt = model, opt, cfg, rt
        self.print_epochs = print_epochs  # off under Tune: its callback prints the epoch line
        self.log = EpochLog(outputs) if outputs and rt.is_main else None
        self.local_checkpoint_dir = local_checkpoint_dir
        resume = load_resume_state()
        if resume:
            model.load_state_dict(resume["model"])
        self.net = wrap_ddp(model, rt)
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.base_lr = scaled_lr(opt, rt.world_size)
        self.optimizer = make_sgd(self.params, opt, self.base_lr)
        self.scaler = rt.scaler()
        self.start_epoch, self.history = 0, []
        if resume:
            self.optimizer.load_state_dict(resume["optimizer"])
            self.scaler.load_state_dict(resume["scaler"])
            set_rng_state(resume["rng"][min(rt.rank, len(resume["rng"]) - 1)])
            self.start_epoch, self.history = resume["epoch"] + 1, resume["history"]
        self.steps_per_epoch = max(1, n_train // (opt.batch_size * rt.world_size))
        self.shard = ray.train.get_dataset_shard("train")
        self.lr = self.base_lr

    def epochs(self) -> range:
        return range(self.start_epoch, self.opt.epochs)

    def batches(self, epoch: int):
        """This worker's training batches of one epoch; the LR follows the schedule per step."""
        for step, batch in enumerate(self.shard.iter_torch_batches(
                batch_size=self.opt.batch_size, drop_last=True,
                local_shuffle_buffer_size=self.cfg.data.shuffle_buffer or None)):
            self.lr = lr_at(self.opt, self.base_lr, epoch + step / self.steps_per_epoch)
            set_lr(self.optimizer, self.lr)
            yield batch

    def step(self, loss: torch.Tensor, frozen=()) -> None:
        optimizer_step(loss, self.optimizer, self.scaler, self.params, self.opt.grad_clip, frozen)

    def end_epoch(self, phase: str, epoch: int, metrics: dict, print_keys: tuple[str, ...]) -> None:
        """Add the common metrics, keep the history, checkpoint when due, print, report."""
        rt = self.rt
        metrics.update({"epoch": epoch, "lr": self.lr, "start_epoch": self.start_epoch,
                        "world_size": rt.world_size, "nodes": rt.num_nodes})
        self.history.append(metrics)
        state = None
        if want_checkpoint(epoch, self.opt.epochs, self.cfg.resources.checkpoint_every):
            state = {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                     "scaler": self.scaler.state_dict(), "epoch": epoch, "history": self.history,
                     "rng": dist.all_gather_objects(rng_state()), "world_size": rt.world_size}
        if rt.is_main and self.print_epochs:
            print_epoch(phase, metrics, print_keys)
        if self.log:
            self.log.write(phase, self.history)
        report_epoch(metrics, state, rt, self.local_checkpoint_dir)


def rng_state() -> dict:
    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])


def load_resume_state() -> dict | None:
    """The newest readable checkpoint of this run (after a failure or a re-run), or None.

    Ray Train hands over its latest checkpoint; if that file is torn (a write interrupted half
    way), the previous complete checkpoint in the same storage folder is used instead.
    """
    import ray.train

    ckpt = ray.train.get_checkpoint()
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
    import pyarrow.fs as pafs
    from ray.train import Checkpoint

    parent = ckpt.path.rstrip("/").rsplit("/", 1)[0]
    infos = ckpt.filesystem.get_file_info(pafs.FileSelector(parent))
    folders = sorted((i.path for i in infos if i.type == pafs.FileType.Directory
                      and i.base_name.startswith("checkpoint_") and i.path.rstrip("/") != ckpt.path.rstrip("/")),
                     reverse=True)
    return [Checkpoint(path=f, filesystem=ckpt.filesystem) for f in folders]


def load_state_file(path: Path) -> dict:
    if not path.is_file():
        raise CheckpointError(f"checkpoint file missing: {path}")
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:
        raise CheckpointError(f"checkpoint file is unreadable (torn or corrupt): {path}: {exc}") from exc


def report_epoch(metrics: dict, state: dict | None, rt: Runtime, local_dir: str | None = None) -> None:
    """Every worker reports (Train's barrier); rank 0 attaches the checkpoint when given.

    ``local_dir``: Train's local mode (num_workers=0) does not persist checkpoints, so they are
    written there and kept instead of in a temporary folder that Train copies to storage.
    """
    import ray.train

    if state is None or not rt.is_main:
        ray.train.report(metrics)
        return
    if local_dir:
        folder = Path(local_dir) / f"checkpoint_epoch_{metrics['epoch']:04d}"
        folder.mkdir(parents=True, exist_ok=True)
        _write_state(state, folder)
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(str(folder)))
        return
    with tempfile.TemporaryDirectory(prefix="raypipe-ckpt-") as folder:
        _write_state(state, Path(folder))
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(folder))


def _write_state(state: dict, folder: Path) -> None:
    tmp = folder / (STATE_FILE + ".partial")
    torch.save(state, tmp)
    os.replace(tmp, folder / STATE_FILE)  # the file exists only once complete


def print_epoch(phase: str, m: dict, keys: tuple[str, ...]) -> None:
    parts = [f"{phase} epoch {m['epoch']:>3}"]
    for k in keys:
        if k in m and m[k] is not None:
            v = m[k]
            parts.append(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}")
    print("  ".join(parts), flush=True)


def want_checkpoint(epoch: int, epochs: int, every: int) -> bool:
    return (epoch + 1) % every == 0 or epoch + 1 == epochs


class EpochMeans:
    """Per-step metrics summed on the device (no host sync per step), averaged over the steps of
    all workers at the end of the epoch; ``steps`` is the per-worker step count."""

    def __init__(self, names: tuple[str, ...], device: torch.device):
        self.names, self.sums, self.steps = names, torch.zeros(len(names), device=device), 0

    def add(self, *values: torch.Tensor) -> None:
        self.sums += torch.stack([v.detach().float() for v in values])
        self.steps += 1

    def result(self) -> dict:
        total = torch.cat([self.sums.double().cpu(), torch.tensor([float(self.steps)], dtype=torch.float64)])
        dist.all_reduce_sum(total)
        n = max(1.0, total[-1].item())
        return {**{k: v / n for k, v in zip(self.names, total[:-1].tolist())},
                "steps": int(total[-1].item()) // dist.world_size()}


class Throughput:
    """Images per second over a timed span (global across workers)."""

    def __init__(self):
        self.start, self.images = time.perf_counter(), 0

    def add(self, n: int) -> None:
        self.images += n

    def rate(self, world_size: int) -> float:
        return self.images * world_size / max(1e-9, time.perf_counter() - self.start)


def eval_rows_mask(idx: torch.Tensor, rt: Runtime) -> torch.Tensor:
    """Each worker evaluates the rows whose global index falls to it: no row twice, none lost."""
    return (idx % rt.world_size) == rt.rank


# ---- on the driver -----------------------------------------------------------------
def resolve_use_gpu(res: ResourcesConfig) -> bool:
    """``auto``: GPUs when the cluster has (or, autoscaling, can launch) GPU nodes."""
    if res.use_gpu != "auto":
        return res.use_gpu == "true"
    return cluster_resources().get("GPU", 0) > 0


def cluster_resources() -> dict:
    """The cluster's resources; on an autoscaling cluster (RAYPIPE_AUTOSCALING=1) with the
    launcher's config on the head, what it can grow to (a cold cluster has no GPU node yet)."""
    import ray

    capacity = autoscaler_capacity() if os.environ.get("RAYPIPE_AUTOSCALING") == "1" else None
    return capacity or ray.cluster_resources()


CLUSTER_CONFIG_ENV = "RAYPIPE_CLUSTER_CONFIG"


def autoscaler_capacity(path: str | None = None) -> dict | None:
    """The resources an autoscaling cluster can grow to, read from the cluster launcher's config
    that ``ray up`` leaves on the head (``~/ray_bootstrap_config.yaml``; or $RAYPIPE_CLUSTER_CONFIG):
    the head plus each worker type at its ``max_workers``, at most the global ``max_workers``
    nodes in all, GPU types first. None when there is no such file."""
    import yaml

    path = Path(path or os.environ.get(CLUSTER_CONFIG_ENV) or Path.home() / "ray_bootstrap_config.yaml")
    if not path.is_file():
        return None
    cluster = yaml.safe_load(path.read_text())
    types = cluster.get("available_node_types") or {}
    head = types.get(cluster.get("head_node_type"), {})
    total = {k: float(v) for k, v in head.get("resources", {}).items()}
    nodes_left = cluster.get("max_workers", 0)
    workers = sorted((t for name, t in types.items() if name != cluster.get("head_node_type")),
                     key=lambda t: -t.get("resources", {}).get("GPU", 0))
    for t in workers:
        n = min(t.get("max_workers", 0), nodes_left)
        nodes_left -= n
        for k, v in t.get("resources", {}).items():
            total[k] = total.get(k, 0.0) + n * v
    return total




def check_cluster_can_fit(res: ResourcesConfig, use_gpu: bool) -> None:
    """Fail fast when no node set could ever host the workers (instead of waiting forever)."""
    import ray

    if res.num_workers == 0 or os.environ.get("RAYPIPE_AUTOSCALING") == "1":
        return
    total = ray.cluster_resources()
    need_cpu = res.num_workers * res.cpus_per_worker
    need_gpu = res.num_workers * res.gpus_per_worker if use_gpu else 0
    if need_cpu > total.get("CPU", 0) + 1e-6 or need_gpu > total.get("GPU", 0) + 1e-6:
        raise ConfigError(
            f"resources.num_workers={res.num_workers} x (CPU {res.cpus_per_worker}, GPU "
            f"{res.gpus_per_worker if use_gpu else 0}) needs CPU {need_cpu:g} / GPU {need_gpu:g}; the Ray "
            f"cluster has CPU {total.get('CPU', 0):g} / GPU {total.get('GPU', 0):g}. Lower "
            f"resources.num_workers or resources.cpus_per_worker (set RAYPIPE_AUTOSCALING=1 on an "
            f"autoscaling cluster)")


def preflight(cfg: Config) -> None:
    """Connect to Ray and check the workers can ever be placed: before data or trainers ask."""
    ensure_ray()
    check_cluster_can_fit(cfg.resources, resolve_use_gpu(cfg.resources))


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
        storage = storage_path
    elif res.storage_path:            # shared / remote storage from the config
        storage = f"{res.storage_path.rstrip('/')}/{cfg.name}"
    else:                             # the run's own location (its folder, or its URI)
        storage = run.location
    from ray.train import LoggingConfig

    run_config = RunConfig(
        name="train", storage_path=storage, callbacks=callbacks or [],
        # quiet: an early-stopped trial makes Train log an expected shutdown traceback as a warning
        logging_config=LoggingConfig(log_level="INFO" if verbose() else "ERROR"),
        checkpoint_config=CheckpointConfig(num_to_keep=res.keep_checkpoints),
        failure_config=FailureConfig(max_failures=res.max_failures))
    if res.num_workers == 0:
        loop_config = {**loop_config, "local_checkpoint_dir": str((run.scratch / "local_checkpoints").resolve())}
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


def final_state(result) -> dict:
    """The last checkpoint's state (history + weights) from a finished Train run."""
    if result.checkpoint is None:
        raise CheckpointError(f"the run at {result.path} finished without a checkpoint")
    with result.checkpoint.as_directory() as folder:
        return load_state_file(Path(folder) / STATE_FILE)


class EpochLog:
    """``metrics.csv`` and TensorBoard events of a run, written by rank 0 after every epoch to the
    run's outputs location (a local folder or a URI), so they exist while the run goes, survive an
    early stop and outlive the node. A resumed run starts a new event file next to the old one."""

    def __init__(self, location: str):
        from . import storage
        self.out, self.writer = storage.Outputs(location), None

    def write(self, phase: str, history: list[dict]) -> None:
        import pandas as pd

        pd.DataFrame(history).to_csv(self.out.local("metrics.csv"), index=False)
        self.out.publish("metrics.csv")
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:  # tensorboard is a declared dependency; tolerate a trimmed install
            return
        if self.writer is None:
            self.writer = SummaryWriter(str(self.out.local("tensorboard", "events").parent))
        row = history[-1]
        for k, v in row.items():
            if isinstance(v, (int, float)) and k != "epoch" and v is not None and math.isfinite(v):
                self.writer.add_scalar(f"{phase}/{k}", v, row["epoch"])
        self.writer.flush()
        self.out.publish("tensorboard")


def write_run_outputs(run, final: dict) -> None:
    """``metrics.json`` (the run's summary); metrics.csv and TensorBoard were written epoch by
    epoch (EpochLog)."""
    run.local("metrics.json").write_text(json.dumps(final, indent=2, default=str))
    run.publish("metrics.json")


def prepare_run(cfg: Config, run_dir: Path | None = None, outputs: str | None = None):
    """The run's ``storage.Outputs``: files are made in ``run_dir`` (default output_dir/name) and
    published to ``outputs`` (a local folder or URI; default: run_dir itself); config.yaml first."""
    from . import storage

    if run_dir is None and storage.is_uri(cfg.output_dir):   # made here, kept in the bucket
        run_dir, outputs = Path(tempfile.mkdtemp(prefix="raypipe-run-")), outputs or storage.join(cfg.output_dir, cfg.name)
    run_dir = Path(run_dir) if run_dir else Path(cfg.output_dir) / cfg.name
    run_dir.mkdir(parents=True, exist_ok=True)
    run = storage.Outputs(outputs or str(run_dir), scratch=run_dir)
    cfg.dump(run.local("config.yaml"))
    run.publish("config.yaml")
    return run


# ---- exported model files ------------------------------------------------------------
def save_model_file(path: Path, kind: str, state_dict: dict, cfg: Config, extra: dict[str, Any]) -> Path:
    payload = {"format": MODEL_FORMAT, "version": MODEL_FORMAT_VERSION, "kind": kind,
               "state_dict": {k: v.detach().cpu() for k, v in state_dict.items()},
               "config": cfg.to_dict(), **extra}
    tmp = path.with_suffix(path.suffix + ".partial")
    torch.save(payload, tmp)
    os.replace(tmp, path)
    return path


def load_model_file(path: str | Path, kind: str | None = None) -> dict:
    """Read an exported model (local path or storage URI), checking format, version and kind."""
    from . import storage
    try:
        path = storage.local_file(str(path))
    except (FileNotFoundError, storage.StorageError) as exc:
        raise CheckpointError(f"model file not found or unreadable: {exc}") from exc
    if not path.is_file():
        raise CheckpointError(f"model file not found: {path}")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)  # tensors and plain data only
    except Exception as exc:
        raise CheckpointError(f"model file is unreadable (torn or not a raypipe model): {path}: {exc}") from exc
    if not isinstance(payload, dict) or payload.get("format") != MODEL_FORMAT:
        raise CheckpointError(f"{path} is not a raypipe model file")
    if payload.get("version", 0) > MODEL_FORMAT_VERSION:
        raise CheckpointError(f"{path} has format version {payload['version']}; this raypipe reads "
                              f"up to {MODEL_FORMAT_VERSION}: upgrade raypipe")
    if kind and payload.get("kind") != kind:
        raise CheckpointError(f"{path} holds a {payload.get('kind')!r} model, expected {kind!r}")
    return payload


# ---- Ray and data on the driver --------------------------------------------------------
# RAY_IGNORE_UNHANDLED_ERRORS: Ray Data's stats actor raises a harmless KeyError when a dataset
# of a stopped trial reports late (fire-and-forget calls, never awaited); hide those tracebacks.
# Where S3-compatible storage is and its region: handed to the job's workers (credentials are not:
# nodes get them from their instance profile or their own environment).
STORAGE_ENV = ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_REGION", "AWS_DEFAULT_REGION")
# Deprecations Ray raises about its own internals, in whichever process builds a trainer.
RAY_INTERNAL_WARNINGS = ("`ExecutionOptions.exclude_resources` is deprecated", "The given NumPy array is not writable")
QUIET_ENV = {"RAY_DEDUP_LOGS": "0", "RAY_DATA_DISABLE_PROGRESS_BARS": "1", "RAY_USAGE_STATS_ENABLED": "0",
             "RAY_TRAIN_ENABLE_V2_MIGRATION_WARNINGS": "0", "RAY_IGNORE_UNHANDLED_ERRORS": "1"}


def ensure_ray(**init_kwargs) -> None:
    """Connect to the cluster named by RAY_ADDRESS (``ray submit``/``ray job``) or start a local one.

    Unless verbose (``--verbose``): Ray's logs show from WARNING up in the driver and from ERROR up
    in the job's workers and Train (their warnings are about Ray's own internals, e.g. the expected
    shutdown traceback of an early-stopped trial), Ray Data's from ERROR up. Train's print patch is
    off everywhere: it logs every ``print`` of a worker AND prints it, so each line appeared twice.
    """
    import logging

    import ray

    for k, v in QUIET_ENV.items():
        os.environ.setdefault(k, v)
    if not ray.is_initialized():
        runtime_env = dict(init_kwargs.pop("runtime_env", None) or {})
        job_env = {**{k: os.environ[k] for k in QUIET_ENV}, "RAY_TRAIN_ENABLE_PRINT_PATCH": "0",
                   VERBOSE_ENV: "1" if verbose() else "0", **{k: os.environ[k] for k in STORAGE_ENV if k in os.environ}}
        if not verbose():
            job_env.setdefault("RAY_DATA_LOG_LEVEL", os.environ.get("RAY_DATA_LOG_LEVEL", "ERROR"))
            job_env["PYTHONWARNINGS"] = ",".join([*filter(None, [os.environ.get("PYTHONWARNINGS")]),
                                                  *(f"ignore:{m}" for m in RAY_INTERNAL_WARNINGS)])
        if "address" not in init_kwargs and not os.environ.get("RAY_ADDRESS"):
            job_env["RAY_TRAIN_ENABLE_PREEMPTION_WATCHER"] = "0"  # one local node: nothing to preempt
        # No worker_process_setup_hook here: with one, Ray Data's task workers are not reused and a
        # phase-1 epoch ran 6x slower (docs/benchmarks.md).
        runtime_env["env_vars"] = {**job_env, **runtime_env.get("env_vars", {})}
        if not verbose():
            init_kwargs.setdefault("logging_config", ray.LoggingConfig(log_level="ERROR"))  # the job's workers
            init_kwargs.setdefault("logging_level", logging.WARNING)
        os.environ.update(job_env)  # a local cluster's raylet and workers inherit these too
        if not verbose():
            hide_ray_component_logs()
        ray.init(log_to_driver=True, runtime_env=runtime_env, **init_kwargs)
    quiet_ray_data()
    hide_internal_deprecations()


# Ray's C++ components (raylet, GCS, core workers) log in glog format, e.g.
# "[2026-11-29 19:47:42,055 E 21044 21044] (gcs_server) gcs_actor_scheduler.cc:538: ..."
# and the raylet warns about "N PYTHON worker processes have been started" when Ray Data tasks with
# fractional CPUs start workers in bursts (expected here; nothing for the user to change).
RAY_COMPONENT_LOG = re.compile(r"^\[\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d+ [IWEF] \d+ \d+\] "
                               r"|.*PYTHON worker processes have been started on node")


def hide_ray_component_logs() -> None:
    """Drop Ray's own C++ log lines (e.g. an actor killed twice at shutdown, logged as an error) and
    the raylet's worker start-up warning from what the cluster sends to this driver (worker logs and
    errors pushed to the driver); the job's own output, Python tracebacks and the raylet's other
    messages (e.g. OOM kills) pass. Wraps Ray's private ``print_to_stdstream`` (Ray is pinned
    < 2.61; if it moves, nothing is filtered); call before ``ray.init``, which binds it."""
    try:
        from ray._private import worker
        show = worker.print_to_stdstream
    except (ImportError, AttributeError):
        return
    if getattr(show, "raypipe_filter", False):
        return

    def filtered(data: dict, ignore_prefix: bool) -> None:
        lines = [line for line in data.get("lines", []) if not RAY_COMPONENT_LOG.match(line)]
        if lines:
            show({**data, "lines": lines}, ignore_prefix)
    filtered.raypipe_filter = True
    worker.print_to_stdstream = filtered


def hide_internal_deprecations() -> None:
    """Warnings Ray raises about its own internals (Train's DataConfig sets a deprecated Ray Data
    option on every run): nothing a user can change, so hidden unless verbose, in the driver and
    in Train workers (Ray's DatasetManager actor still prints the first one once per run)."""
    import warnings

    if not verbose():
        # the second: Ray Data hands read-only NumPy views to torch.as_tensor; the batch is copied anyway
        for message in RAY_INTERNAL_WARNINGS:
            warnings.filterwarnings("ignore", message=message)


def quiet_ray_data() -> None:
    import ray.data

    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.print_on_execution_start = False
    ctx.verbose_progress = False


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
