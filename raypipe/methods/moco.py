"""MoCo v2 with the paper's margin loss (``teacher.method: moco``, the default): the query/key
encoders with split BatchNorm and the queue, and the method's training step."""
from __future__ import annotations

import copy

import torch
import torch.nn as nn
import torch.nn.functional as F

from .. import dist
from ..config import Config
from ..losses import contrastive_logits, margin_nce_loss
from ..models import arch_of, build_backbone, projection_head
from . import SSLMethod, register_method


class SplitBatchNorm2d(nn.BatchNorm2d):
    """BatchNorm whose training statistics are taken over ``num_splits`` groups of the batch
    (sample i in group i % num_splits): MoCo's single-GPU stand-in for per-GPU BN. Eval mode and
    the state_dict are plain BatchNorm2d's; running statistics are the groups' average."""

    def __init__(self, num_features: int, num_splits: int, **kwargs):
        super().__init__(num_features, **kwargs)
        self.num_splits = num_splits

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.num_splits == 1:
            return super().forward(x)
        n, c, h, w = x.shape
        s = self.num_splits
        if n % s:
            raise ValueError(f"batch of {n} does not split into {s} BatchNorm groups (teacher.bn_splits)")
        mean, var = self.running_mean.repeat(s), self.running_var.repeat(s)
        out = F.batch_norm(x.reshape(n // s, c * s, h, w), mean, var, self.weight.repeat(s), self.bias.repeat(s),
                           True, self.momentum, self.eps)
        with torch.no_grad():
            self.running_mean.copy_(mean.view(s, c).mean(0))
            self.running_var.copy_(var.view(s, c).mean(0))
            self.num_batches_tracked.add_(1)
        return out.view(n, c, h, w)


def split_batchnorm(module: nn.Module, num_splits: int) -> nn.Module:
    """Replace every BatchNorm2d in ``module`` (in place) by a SplitBatchNorm2d with its state."""
    for name, child in module.named_children():
        if isinstance(child, nn.BatchNorm2d) and not isinstance(child, SplitBatchNorm2d):
            split = SplitBatchNorm2d(child.num_features, num_splits, eps=child.eps, momentum=child.momentum)
            split.load_state_dict(child.state_dict())
            setattr(module, name, split)
        else:
            split_batchnorm(child, num_splits)
    return module


class MoCo(nn.Module):
    """Query encoder + momentum key encoder + queue of keys (buffers, so they checkpoint).

    ``bn_splits > 1`` (one worker): BOTH encoders normalise over groups of the batch, and keys are
    encoded from a shuffled batch, so a query and its key never share BN statistics (MoCo's
    shuffle-BN, as in its single-GPU CIFAR demo). With several workers BN is per worker and the
    keys are shuffled across workers instead; pass ``bn_splits=1`` there.
    """

    def __init__(self, arch: dict, proj_hidden: int, proj_dim: int,
                 queue_size: int, key_momentum: float, bn_splits: int = 1):
        super().__init__()
        net, dim = build_backbone(**arch)
        if bn_splits > 1:
            split_batchnorm(net, bn_splits)
        self.encoder_q = nn.Sequential(net, projection_head(dim, proj_hidden, proj_dim))
        self.encoder_k = copy.deepcopy(self.encoder_q)
        for p in self.encoder_k.parameters():
            p.requires_grad_(False)
        self.key_momentum = key_momentum
        self.register_buffer("queue", F.normalize(torch.randn(queue_size, proj_dim), dim=1))
        self.register_buffer("queue_ptr", torch.zeros((), dtype=torch.long))

    @property
    def backbone(self) -> nn.Module:
        return self.encoder_q[0]

    @torch.no_grad()
    def momentum_update(self) -> None:
        """theta_k = mu * theta_k + (1 - mu) * theta_q."""
        for pk, pq in zip(self.encoder_k.parameters(), self.encoder_q.parameters()):
            pk.mul_(self.key_momentum).add_(pq.detach(), alpha=1 - self.key_momentum)

    @torch.no_grad()
    def enqueue(self, keys: torch.Tensor) -> None:
        """Write globally gathered keys at the pointer (wrapping); every rank does the same."""
        n, size = keys.shape[0], self.queue.shape[0]
        if size % n:
            raise ValueError(f"queue size {size} is not a multiple of the global batch {n}")
        rows = (self.queue_ptr + torch.arange(n, device=keys.device)) % size  # on the device: no host sync per step
        self.queue.index_copy_(0, rows, keys.to(self.queue.dtype))
        self.queue_ptr.copy_((self.queue_ptr + n) % size)

    @torch.no_grad()
    def encode_keys(self, im_k: torch.Tensor) -> torch.Tensor:
        """Keys with shuffled BN: across ranks when distributed, else a shuffled batch whose
        split-BN groups differ from the queries'. Returned in input order."""
        if dist.is_distributed():
            gathered = dist.all_gather_cat(im_k)
            perm = dist.broadcast(torch.randperm(gathered.shape[0], device=im_k.device))
            n = im_k.shape[0]
            mine = perm.view(dist.world_size(), n)[dist.rank()]
            k = F.normalize(self.encoder_k(gathered[mine]), dim=1)
            k_all = dist.all_gather_cat(k)
            unshuffled = torch.empty_like(k_all)
            unshuffled[perm] = k_all
            return unshuffled.view(dist.world_size(), n, -1)[dist.rank()]
        perm = torch.randperm(im_k.shape[0], device=im_k.device)
        k = F.normalize(self.encoder_k(im_k[perm]), dim=1)
        out = torch.empty_like(k)
        out[perm] = k
        return out

    def forward(self, im_q: torch.Tensor, im_k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        q = F.normalize(self.encoder_q(im_q), dim=1)
        with torch.no_grad():
            self.momentum_update()
            k = self.encode_keys(im_k)
        return q, k


@register_method("moco")
class MoCoMargin(SSLMethod):
    """MoCo v2 trained with the margin loss; ``teacher.margin: 0`` is plain MoCo v2 (InfoNCE).

    Split BN (``teacher.bn_splits``) on one worker; per-worker BN + cross-worker key shuffle on several."""

    metric_names = ("pos_sim", "neg_sim")

    def __init__(self, cfg: Config, world_size: int = 1):
        super().__init__(cfg, world_size)
        t = cfg.teacher
        self.model = MoCo(arch_of(t), t.proj_hidden, t.proj_dim, t.queue_size, t.key_momentum,
                          bn_splits=t.bn_splits if world_size == 1 else 1)

    @property
    def backbone(self) -> nn.Module:
        return self.model.backbone

    def training_step(self, net, view1, view2, rt):
        """The margin loss against the queue as it was BEFORE this batch; then the batch's keys
        (gathered from all workers) are enqueued."""
        t = self.cfg.teacher
        with rt.autocast():
            q, k = net(view1, view2)
        l_pos, l_neg = contrastive_logits(q.float(), k.float(), self.model.queue.clone().detach())
        loss = margin_nce_loss(l_pos, l_neg, t.margin, t.temperature)
        self.model.enqueue(dist.all_gather_cat(k.float()))
        return loss, {"pos_sim": l_pos.detach().mean(), "neg_sim": l_neg.detach().mean()}

    def export_extras(self) -> dict:
        return {"head": self.model.encoder_q[1].state_dict()}
