"""The worker side both phases share, free of Ray: device/AMP runtime, DDP, SGD and the lr
schedule, the epoch loop's state (resume, report, checkpoint) over a ``Session`` that supplies
batches and takes reports, per-epoch metrics and the run's metrics files. ``raypipe.raytrain``
binds a Session to Ray Train; ``MemorySession`` runs the same loop in a plain process."""
from __future__ import annotations

import contextlib
import inspect
import math
import random
import time
from dataclasses import dataclass
from typing import Iterable, Protocol

import numpy as np
import torch
import torch.nn as nn

from . import dist, storage
from .console import quiet_worker
from .settings import OptimConfig, ResourcesConfig

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


def make_runtime(res: ResourcesConfig, seed: int, session: Session) -> Runtime:
    """Device (the session's: cuda when Train gave this worker a GPU, else CPU), AMP and seeds for
    this worker, and how many distinct nodes the run's workers are on."""
    device = session.device
    quiet_worker()
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
    nodes = len(set(dist.all_gather_objects(session.node)))
    return Runtime(device, amp, gpu and res.channels_last, dist.world_size(), rank, nodes)


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


def rng_state() -> dict:
    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])


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


class Session(Protocol):
    """What a phase's worker loop gets from where it runs (Ray Train: ``raypipe.raytrain``;
    without Ray: ``MemorySession``): its device, its batches, the state to resume from, and where
    each epoch's metrics (and, when due, the checkpoint state) go."""

    device: torch.device
    node: str

    def batches(self, split: str, batch_size: int, shuffle_buffer: int = 0) -> Iterable[dict]: ...

    def resume_state(self) -> dict | None: ...

    def report(self, metrics: dict, state: dict | None) -> None: ...


class MemorySession:
    """A Session without Ray, for unit tests, benchmarks and notebooks: batches come from
    ``datasets`` (split -> a list of batch dicts, or a function that returns an iterable of them,
    called once per epoch); reports are kept in ``reports`` and the last checkpoint state in
    ``state`` (a new MemorySession given ``resume`` resumes from it)."""

    def __init__(self, datasets: dict, device: torch.device | str | None = None, resume: dict | None = None):
        self.datasets, self.resume = datasets, resume
        self.device = torch.device(device) if device else torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.node, self.reports, self.state = "local", [], None

    def batches(self, split: str, batch_size: int, shuffle_buffer: int = 0) -> Iterable[dict]:
        data = self.datasets[split]
        return data() if callable(data) else data

    def resume_state(self) -> dict | None:
        return self.resume

    def report(self, metrics: dict, state: dict | None) -> None:
        self.reports.append(metrics)
        if state is not None:
            self.state = state


class Loop:
    """The training loop's state both phases share: DDP wrapper, SGD, scaler, LR schedule,
    resume, the per-epoch report/checkpoint and the best weights so far. A phase only writes its
    own step. No Ray: batches, reports and checkpoints go through the ``session``.

    ``meta`` is what the phase runner sent: ``n_train``, ``print_epochs``, ``outputs`` (where
    metrics files go) and ``score_metric`` (the metric that ranks epochs)."""

    def __init__(self, model: nn.Module, opt: OptimConfig, cfg, rt: Runtime, session: Session, meta: dict):
        self.model, self.opt, self.cfg, self.rt, self.session = model, opt, cfg, rt, session
        self.print_epochs = meta.get("print_epochs", True)  # off under Tune: its callback prints the epoch line
        self.log = EpochLog(meta["outputs"]) if meta.get("outputs") and rt.is_main else None
        self.score_metric = meta.get("score_metric")
        resume = session.resume_state()
        if resume:
            model.load_state_dict(resume["model"])
        self.net = wrap_ddp(model, rt)
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.base_lr = scaled_lr(opt, rt.world_size)
        self.optimizer = make_sgd(self.params, opt, self.base_lr)
        self.scaler = rt.scaler()
        self.start_epoch, self.history, self.best = 0, [], None
        if resume:
            self.optimizer.load_state_dict(resume["optimizer"])
            self.scaler.load_state_dict(resume["scaler"])
            set_rng_state(resume["rng"][min(rt.rank, len(resume["rng"]) - 1)])
            self.start_epoch, self.history, self.best = resume["epoch"] + 1, resume["history"], resume.get("best")
        self.steps_per_epoch = max(1, meta["n_train"] // (opt.batch_size * rt.world_size))
        self.lr = self.base_lr

    def epochs(self) -> range:
        return range(self.start_epoch, self.opt.epochs)

    def batches(self, epoch: int):
        """This worker's training batches of one epoch; the LR follows the schedule per step."""
        for step, batch in enumerate(self.session.batches("train", self.opt.batch_size, self.cfg.data.shuffle_buffer)):
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
        score = metrics.get(self.score_metric) if self.score_metric else None
        if rt.is_main and score is not None and (self.best is None or score > self.best["score"]):
            # the best epoch's weights travel in every checkpoint: exported models are the best
            # by the ranking metric, whether or not that epoch fell on a checkpoint
            self.best = {"epoch": epoch, "score": score,
                         "model": {k: v.detach().cpu().clone() for k, v in self.model.state_dict().items()}}
        state = None
        if want_checkpoint(epoch, self.opt.epochs, self.cfg.resources.checkpoint_every):
            state = {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                     "scaler": self.scaler.state_dict(), "epoch": epoch, "history": self.history,
                     "rng": dist.all_gather_objects(rng_state()), "world_size": rt.world_size, "best": self.best}
        if rt.is_main and self.print_epochs:
            print_epoch(phase, metrics, print_keys)
        if self.log:
            self.log.write(phase, self.history)
        self.session.report(metrics, state)


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


class EpochLog:
    """``metrics.csv`` and TensorBoard events of a run, written by rank 0 after every epoch to the
    run's outputs location (a local folder or a URI), so they exist while the run goes, survive an
    early stop and outlive the node. A resumed run starts a new event file next to the old one."""

    def __init__(self, location: str):
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

