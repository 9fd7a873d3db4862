"""MoCo v2 with the paper's margin loss (``teacher.method: moco``, the default), in one file: its
settings (``teacher.moco.*``), views, checks and search space, the query/key encoders with split
BatchNorm and the queue, and the training step."""
from __future__ import annotations

import copy

import torch
import torch.nn as nn
import torch.nn.functional as F

from .. import dist
from ..errors import ConfigError
from ..losses import contrastive_logits, margin_nce_loss
from ..models import arch_of, build_backbone, projection_head
from ..settings import Section, check_range, opt, start_point
from ..transforms import MocoView
from .base import SSLMethod, register_method


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
            raise ValueError(f"batch of {n} does not split into {s} BatchNorm groups (teacher.moco.bn_splits)")
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


class MoCoSettings(Section):
    """``teacher.moco``: MoCo v2 with the paper's margin loss, its views and its search space."""

    margin: float = opt(0.4, "subtracted from the positive logit", ge=0.0, le=2.0)
    temperature: float = opt(0.2, gt=0.0, le=10.0)
    queue_size: int = opt(4096, "K; a multiple of the global batch, <= train images", ge=1)
    key_momentum: float = opt(0.999, ge=0.0, le=1.0)
    proj_hidden: int = opt(2048, ge=1)
    proj_dim: int = opt(128, ge=1)
    bn_splits: int = opt(2, "one worker: BN of both encoders over this many groups of the batch, keys shuffled "
                            "(MoCo's split BN; its CIFAR demo: 8 groups of 64)", ge=1)
    crop_min_scale: float = opt(0.2, "views' random-resized-crop scale (x, 1)", gt=0.0, le=1.0)
    blur_prob: float = opt(0.5, "views' Gaussian blur probability", ge=0.0, le=1.0)
    margin_range: list[float] = opt([0.0, 0.8], "main job, stage 1: margin searched uniformly in [lo, hi]")
    temperature_range: list[float] = opt([0.07, 0.5], "main job, stage 1: temperature searched log-uniformly")
    queue_sizes: list[int] = opt([], "main job, stage 1: candidates for K; [] = multiples of the global batch "
                                     "the data can fill")


@register_method("moco")
class MoCoMargin(SSLMethod):
    """MoCo v2 trained with the margin loss; ``teacher.moco.margin: 0`` is plain MoCo v2 (InfoNCE).

    Split BN (``bn_splits``) on one worker; per-worker BN + cross-worker key shuffle on several."""

    Settings = MoCoSettings
    section = "moco"
    moved = {**{f"teacher.{k}": k for k in ("margin", "temperature", "queue_size", "key_momentum", "proj_hidden",
                                            "proj_dim", "bn_splits", "crop_min_scale", "blur_prob")},
             **{f"tune.{k}": k for k in ("margin_range", "temperature_range", "queue_sizes")}}
    metric_names = ("pos_sim", "neg_sim")

    @classmethod
    def views(cls, cfg) -> list:
        m = cls.settings(cfg)
        return [MocoView(cfg.data.resolution, m.crop_min_scale, m.blur_prob)] * 2

    @classmethod
    def validate(cls, cfg) -> None:
        m, t = cls.settings(cfg), cfg.teacher
        global_batch = cfg.global_batch("teacher")
        if m.queue_size % global_batch:
            raise ConfigError(
                f"teacher.moco.queue_size={m.queue_size} must be a multiple of the global batch "
                f"(teacher.batch_size {t.batch_size} x resources.num_workers {max(1, cfg.resources.num_workers)} "
                f"= {global_batch}); e.g. {max(1, m.queue_size // global_batch) * global_batch}")
        if cfg.resources.num_workers <= 1 and t.batch_size % m.bn_splits:
            raise ConfigError(f"teacher.batch_size={t.batch_size} must be a multiple of teacher.moco.bn_splits="
                              f"{m.bn_splits} (split BatchNorm groups on one worker)")
        check_range("teacher.moco.margin_range", m.margin_range)
        check_range("teacher.moco.temperature_range", m.temperature_range)

    @staticmethod
    def max_queue_size(cfg, n_train: int) -> int:
        """The longest queue (K) ``n_train`` images fill without duplicates: whole global batches."""
        return n_train // cfg.global_batch("teacher") * cfg.global_batch("teacher")

    @classmethod
    def check_data(cls, cfg, n_train: int) -> None:
        queue, fit, gb = cls.settings(cfg).queue_size, cls.max_queue_size(cfg, n_train), cfg.global_batch("teacher")
        if queue > fit:
            hint = f"use at most {fit}" if fit else f"the global batch {gb} alone exceeds the data"
            raise ConfigError(f"teacher.moco.queue_size={queue} exceeds the {n_train} training images "
                              f"(the queue would hold stale duplicate keys); {hint}")

    @classmethod
    def queue_candidates(cls, cfg, n_train: int) -> list[int]:
        """K values Tune may pick: multiples of the global batch the training set can fill."""
        m, gb, cap = cls.settings(cfg), cfg.global_batch("teacher"), cls.max_queue_size(cfg, n_train)
        if cap < gb:
            raise ConfigError(f"{n_train} training images cannot fill one global batch of {gb}")
        if m.queue_sizes:
            bad = [k for k in m.queue_sizes if k % gb or k > cap]
            if bad:
                raise ConfigError(f"teacher.moco.queue_sizes {bad} must be multiples of the global batch {gb} and "
                                  f"<= {cap} (the training images rounded down to whole batches)")
            return sorted(set(m.queue_sizes))
        sizes, k = [], gb
        while k <= cap:
            sizes.append(k)
            k *= 2
        return sorted(set(sizes + [min(cap, m.queue_size)]))

    @classmethod
    def search_space(cls, cfg, n_train: int) -> tuple[dict, dict]:
        """Margin (uniform), temperature (log-uniform) and K (a choice), from the config's values."""
        from ray import tune

        m = cls.settings(cfg)
        queues = cls.queue_candidates(cfg, n_train)
        space = {"teacher.moco.margin": tune.uniform(*m.margin_range),
                 "teacher.moco.temperature": tune.loguniform(*m.temperature_range),
                 "teacher.moco.queue_size": tune.choice(queues)}
        point = {"teacher.moco.margin": start_point(m.margin, m.margin_range),
                 "teacher.moco.temperature": start_point(m.temperature, m.temperature_range),
                 "teacher.moco.queue_size": min(queues, key=lambda k: (abs(k - m.queue_size), -k))}
        return space, point

    def __init__(self, cfg, world_size: int = 1):
        super().__init__(cfg, world_size)
        m = self.settings(cfg)
        self.model = MoCo(arch_of(cfg.teacher), m.proj_hidden, m.proj_dim, m.queue_size, m.key_momentum,
                          bn_splits=m.bn_splits if world_size == 1 else 1)

    @property
    def backbone(self) -> nn.Module:
        return self.model.backbone

    def training_step(self, net, views, rt):
        """The margin loss against the queue as it was BEFORE this batch; then the batch's keys
        (gathered from all workers) are enqueued."""
        m = self.settings(self.cfg)
        view1, view2 = views
        with rt.autocast():
            q, k = net(view1, view2)
        l_pos, l_neg = contrastive_logits(q.float(), k.float(), self.model.queue.clone().detach())
        loss = margin_nce_loss(l_pos, l_neg, m.margin, m.temperature)
        self.model.enqueue(dist.all_gather_cat(k.float()))
        return loss, {"pos_sim": l_pos.detach().mean(), "neg_sim": l_neg.detach().mean()}

    def export_extras(self) -> dict:
        return {"head": self.model.encoder_q[1].state_dict()}
