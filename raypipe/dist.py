"""torch.distributed helpers that also work with one process and no process group."""
from __future__ import annotations

import torch
import torch.distributed as dist


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


@torch.no_grad()
def all_gather_cat(x: torch.Tensor) -> torch.Tensor:
    """Concatenate equal-shaped tensors from all ranks along dim 0 (identity on one process)."""
    if not is_distributed():
        return x
    parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, x.contiguous())
    return torch.cat(parts)


def all_gather_objects(obj) -> list:
    if not is_distributed():
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def all_reduce_sum(x: torch.Tensor) -> torch.Tensor:
    if is_distributed():
        dist.all_reduce(x, op=dist.ReduceOp.SUM)
    return x


@torch.no_grad()
def broadcast_buffers(module: torch.nn.Module, src: int = 0) -> None:
    """Every buffer of ``module`` (queue, BN statistics) from rank ``src`` to all ranks."""
    if is_distributed():
        for buf in module.buffers():
            dist.broadcast(buf, src)


@torch.no_grad()
def average_bn_statistics(module: torch.nn.Module) -> None:
    """Replace each rank's BatchNorm running statistics by their mean over ranks.

    Under DDP (buffers not broadcast per step) every worker keeps its own statistics; averaging
    them before evaluation and checkpointing gives one consistent model on every rank.
    """
    if not is_distributed():
        return
    stats = [b for m in module.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)
             and m.track_running_stats for b in (m.running_mean, m.running_var)]
    if not stats:
        return
    flat = torch.cat([b.float().flatten() for b in stats])
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    flat /= dist.get_world_size()
    for b, v in zip(stats, flat.split([b.numel() for b in stats])):
        b.copy_(v.view_as(b))


def broadcast(x: torch.Tensor, src: int = 0) -> torch.Tensor:
    if is_distributed():
        dist.broadcast(x, src)
    return x
