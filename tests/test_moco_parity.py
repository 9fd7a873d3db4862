"""Parity: raypipe's phase-1 step (MoCo v2 + the margin loss) against an independent reference.

The reference below (``RefSplitBN``, ``ref_encoder``, ``RefMoCo``) is written from Algorithm 1 of
He et al., "Momentum Contrast for Unsupervised Visual Representation Learning" (plus the v2 MLP
head) and the distillation paper's margin loss, with torch/torchvision only: nothing of raypipe's
method, losses or dist helpers. It starts from raypipe's initial query-encoder weights and queue
(its key encoder is its own copy of its query encoder, as in Algorithm 1) and takes the same views,
next to raypipe's real path: ``teacher.build_method`` -> ``loop.Loop`` (DDP with two workers, SGD,
the lr schedule through ``Loop.batches``) -> ``method.training_step`` -> ``Loop.step``, as
``teacher.run`` drives them. For each of STEPS SGD steps the two must agree on the loss (each
worker's), the queue and its pointer, the key encoder that encoded the step's keys (parameters
and BN statistics) and the query encoder after SGD; on one worker and on two (gloo processes,
torch.multiprocessing, no Ray). Parametrised mutations give the reference a wrong key momentum
(0.99), temperature (0.1), margin sign (+m on the positive logit) or queue order (keys enqueued
reversed), and the same comparison must then fail.

What the reference computes, step by step (one worker; N = 8, K = 16):
  q = normalize(f_q(x_q)) with f_q's BatchNorm split into 2 groups (row i in group i % 2), MoCo's
  single-GPU split BN; keys from a shuffled batch: k = normalize(f_k(x_k[perm]))[argsort(perm)],
  so f_k's split-BN groups differ from the queries'; loss = mean_i -log softmax(
  [(q_i.k_i - m)/tau, q_i.queue/tau])_0 with the queue as it was before this batch; SGD on f_q
  (lr 0.03 x batch / 256, momentum 0.9, wd 1e-4); then f_k <- mu f_k + (1 - mu) f_q (parameters
  only) and the keys are written at the pointer.
  Two workers (N = 8 each, K = 32): per-worker BN (one group); shuffle BN as in MoCo's code
  (gather x_k from all workers in rank order, one permutation from rank 0, each worker encodes
  its slice, gather the keys and undo the permutation); gradients averaged over the workers; the
  keys of all workers are enqueued in rank order.

Where raypipe differs from Algorithm 1 (none changes what is trained; all are checked here):
- Momentum update timing: raypipe (like MoCo's released code) updates f_k at the start of the
  next forward, Algorithm 1 right after the SGD step. Both use the same f_q, so the key encoders
  that encode each step's keys are identical; raypipe's f_k after step t is compared with the
  reference's f_k *before* its update of step t (the one that encoded step t's keys).
- The margin (the distillation paper, not MoCo): subtracted from the positive logit before the
  temperature, ``[(l_pos - m), l_neg] / tau``, as the paper's equation and docs/method.md state;
  raypipe does exactly that.
- raypipe computes the logits and the loss in float32 by design (``q.float()``, ``k.float()``, so
  AMP embeddings meet a float32 loss), and its queue is float32.

Precision: the reference runs in float64; raypipe's encoders are converted to float64 here
(``model.double()``; the queue stays float32, as raypipe's float32 loss needs). With raypipe all
in float32 on CPU, split BN over groups of 4 amplifies float32 rounding: layer-4 gradients were
off by up to 7 % at step 2 against float64 (against 4e-7 with float64 encoders), which would have
forced tolerances loose enough to hide small errors. Measured differences with float64 encoders:
loss <= 5e-7 (rtol 2e-6 allowed), queue <= 3e-8 (atol 1e-6), encoders <= 6e-8 (atol 5e-7,
rtol 1e-5); the mutations move the loss by >= 9e-4 or the queue by >= 0.3.

The key shuffle's permutation comes from torch's global generator; the harness seeds it before
every step of both sides, so the reference draws the same permutation with its own randperm
(split BN makes the result depend on it: without the seed no parity is possible).
"""
from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
import torch.distributed as tdist
import torch.multiprocessing as mp
import torch.nn.functional as F
import torchvision
from torch import nn

from raypipe.config import load_config
from raypipe.loop import Loop, MemorySession, make_runtime
from raypipe.teacher import build_method

STEPS, BATCH, RES, HIDDEN, DIM = 3, 8, 16, 32, 16
MARGIN, TEMPERATURE, KEY_MOMENTUM, LR, SGD_MOMENTUM, WD, SPLITS = 0.4, 0.2, 0.999, 0.03, 0.9, 1e-4, 2
STEP_SEED = 1234


def config(world: int):
    queue = 16 if world == 1 else 32   # two (global) batches: the pointer wraps within STEPS
    return load_config(overrides=[
        f"data.resolution={RES}", "teacher.backbone=resnet18", "teacher.small_stem=true", "teacher.stem_stride=2",
        f"teacher.batch_size={BATCH}", "teacher.epochs=1", "teacher.schedule=constant", "teacher.warmup_epochs=0",
        f"teacher.lr={LR}", f"teacher.momentum={SGD_MOMENTUM}", f"teacher.weight_decay={WD}", "teacher.grad_clip=0",
        "teacher.nesterov=false", f"teacher.moco.queue_size={queue}", f"teacher.moco.proj_hidden={HIDDEN}",
        f"teacher.moco.proj_dim={DIM}", f"teacher.moco.margin={MARGIN}", f"teacher.moco.temperature={TEMPERATURE}",
        f"teacher.moco.key_momentum={KEY_MOMENTUM}", f"teacher.moco.bn_splits={SPLITS}",
        f"resources.num_workers={world if world > 1 else 0}", "resources.amp=off"])


def global_views(world: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per step, both views of the global batch (fixed tensors: no augmentation in the step)."""
    g = torch.Generator().manual_seed(7)
    shape = (world * BATCH, 3, RES, RES)
    return [(torch.randn(shape, generator=g), torch.randn(shape, generator=g)) for _ in range(STEPS)]


# ---------------------------------------------------------------- the reference (own code only)
class RefSplitBN(nn.Module):
    """Training-mode BatchNorm computed separately on ``groups`` interleaved groups of the batch
    (rows g, g + groups, ...); running statistics move by the groups' mean statistics."""

    def __init__(self, channels: int, groups: int):
        super().__init__()
        self.groups, self.eps, self.momentum = groups, 1e-5, 0.1
        self.weight, self.bias = nn.Parameter(torch.ones(channels)), nn.Parameter(torch.zeros(channels))
        self.register_buffer("running_mean", torch.zeros(channels))
        self.register_buffer("running_var", torch.ones(channels))
        self.register_buffer("num_batches_tracked", torch.tensor(0, dtype=torch.long))

    def forward(self, x):
        parts, means, variances = [], [], []
        for g in range(self.groups):
            xg = x[g::self.groups]
            mean, var = xg.mean(dim=(0, 2, 3)), xg.var(dim=(0, 2, 3), unbiased=False)
            parts.append((xg - mean[:, None, None]) / torch.sqrt(var[:, None, None] + self.eps)
                         * self.weight[:, None, None] + self.bias[:, None, None])
            n = xg.numel() // xg.shape[1]
            means.append(mean.detach())
            variances.append(var.detach() * n / (n - 1))
        with torch.no_grad():
            self.running_mean.mul_(1 - self.momentum).add_(self.momentum * torch.stack(means).mean(0))
            self.running_var.mul_(1 - self.momentum).add_(self.momentum * torch.stack(variances).mean(0))
            self.num_batches_tracked += 1
        return torch.stack(parts, dim=1).reshape(x.shape)   # row a * groups + g <- group g's row a


def ref_encoder(groups: int) -> nn.Module:
    """ResNet-18, 3x3 stride-2 stem without max-pool, MLP head 512 -> HIDDEN -> ReLU -> DIM."""
    net = torchvision.models.resnet18(weights=None, norm_layer=lambda c: RefSplitBN(c, groups))
    net.conv1, net.maxpool, net.fc = nn.Conv2d(3, 64, 3, 2, 1, bias=False), nn.Identity(), nn.Identity()
    return nn.Sequential(net, nn.Sequential(nn.Linear(512, HIDDEN), nn.ReLU(), nn.Linear(HIDDEN, DIM))).double()


class RefMoCo:
    """Algorithm 1 of the MoCo paper with the margin on the positive logit."""

    def __init__(self, init: dict, world: int, rank: int, momentum=KEY_MOMENTUM, temperature=TEMPERATURE,
                 margin=MARGIN, reverse_enqueue=False):
        self.world, self.rank = world, rank
        self.m, self.t, self.margin, self.reverse = momentum, temperature, margin, reverse_enqueue
        self.f_q = ref_encoder(SPLITS if world == 1 else 1)
        self.f_q.load_state_dict({k[len("encoder_q."):]: v for k, v in init.items() if k.startswith("encoder_q.")})
        self.f_k = copy.deepcopy(self.f_q)   # f_k.params = f_q.params
        for p in self.f_k.parameters():
            p.requires_grad_(False)
        self.queue, self.ptr = init["queue"].double().clone(), 0
        lr = LR * BATCH * world / 256   # MoCo's lr is for a batch of 256: scaled linearly
        self.opt = torch.optim.SGD(self.f_q.parameters(), lr=lr, momentum=SGD_MOMENTUM, weight_decay=WD)

    def gather(self, x):
        if self.world == 1:
            return x
        out = [torch.zeros_like(x) for _ in range(self.world)]
        tdist.all_gather(out, x.contiguous())
        return torch.cat(out)

    @torch.no_grad()
    def keys(self, x_k, seed: int):
        n = x_k.shape[0]
        xs = self.gather(x_k)
        torch.manual_seed(seed)
        perm = torch.randperm(xs.shape[0])
        if self.world > 1:
            tdist.broadcast(perm, 0)
        mine = perm[self.rank * n:(self.rank + 1) * n]
        k = self.gather(F.normalize(self.f_k(xs[mine]), dim=1))   # row j: the key of sample perm[j]
        return k[torch.argsort(perm)][self.rank * n:(self.rank + 1) * n]

    def step(self, x_q, x_k, seed: int) -> dict:
        q = F.normalize(self.f_q(x_q), dim=1)
        k = self.keys(x_k, seed)
        l_pos = torch.bmm(q.unsqueeze(1), k.unsqueeze(2)).view(-1, 1)
        l_neg = q @ self.queue.t()
        logits = torch.cat([l_pos - self.margin, l_neg], dim=1) / self.t
        loss = (torch.logsumexp(logits, dim=1) - logits[:, 0]).mean()   # cross-entropy, label 0
        self.opt.zero_grad()
        loss.backward()
        for p in self.f_q.parameters():   # data parallel: the gradient of the global mean
            if self.world > 1:
                tdist.all_reduce(p.grad)
                p.grad /= self.world
        self.opt.step()
        key_encoder = {name: v.clone() for name, v in self.f_k.state_dict().items()}   # encoded this step's keys
        with torch.no_grad():
            for pk, pq in zip(self.f_k.parameters(), self.f_q.parameters()):
                pk.copy_(self.m * pk + (1 - self.m) * pq)
            new = self.gather(k)   # all workers' keys, rank order
            if self.reverse:
                new = new.flip(0)
            self.queue[self.ptr:self.ptr + new.shape[0]] = new
            self.ptr = (self.ptr + new.shape[0]) % self.queue.shape[0]
        return {"loss": loss.detach(), "queue": self.queue.clone(), "ptr": self.ptr, "key": key_encoder,
                "query": {name: v.clone() for name, v in self.f_q.state_dict().items()}}


# name -> (the reference's wrong setting, the steps it runs: a wrong mu first shows at step 1, as step 0's
# update of a key encoder still equal to the query encoder is a no-op whatever mu is)
MUTATIONS = {"momentum": ({"momentum": 0.99}, 2), "temperature": ({"temperature": 0.1}, 1),
             "margin_sign": ({"margin": -MARGIN}, 1), "queue_order": ({"reverse_enqueue": True}, 1)}
# where each first shows (the comparison stops at its first failure)
CAUGHT_BY = {"momentum": "step 1 loss", "temperature": "step 0 loss", "margin_sign": "step 0 loss",
             "queue_order": "step 0 queue"}


# ---------------------------------------------------------------- both sides, one worker process
def run_worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    torch.set_num_threads(1)   # tiny convolutions: threads only spin on a busy host
    if world > 1:
        tdist.init_process_group("gloo", init_method=init_file, rank=rank, world_size=world)
    cfg = config(world)
    views = [(a[rank * BATCH:(rank + 1) * BATCH], b[rank * BATCH:(rank + 1) * BATCH]) for a, b in global_views(world)]
    session = MemorySession({"train": [{"view0": a.double(), "view1": b.double()} for a, b in views]}, device="cpu")
    rt = make_runtime(cfg.resources, cfg.teacher.seed, session)
    method = build_method(cfg, rt.world_size)
    method.model.double()   # float64 encoders; the loss stays float32 (raypipe casts q and k), so does the queue
    method.model.queue = method.model.queue.float()
    loop = Loop(method.model, cfg.teacher, cfg, rt, session,
                {"n_train": STEPS * BATCH * world, "print_epochs": False, "score_metric": None})
    init = {k: v.detach().clone() for k, v in method.model.state_dict().items()}   # after DDP's broadcast
    model, ours = method.model, []
    model.train()
    for step, batch in enumerate(loop.batches(0)):
        torch.manual_seed(STEP_SEED + step)
        loss, _ = method.training_step(loop.net, [batch["view0"], batch["view1"]], rt)
        loop.step(loss)
        ours.append({"loss": loss.detach().double(), "queue": model.queue.double().clone(),
                     "ptr": int(model.queue_ptr),
                     "key": {k: v.clone() for k, v in model.encoder_k.state_dict().items()},
                     "query": {k: v.clone() for k, v in model.encoder_q.state_dict().items()}})
    refs = {}
    for name, (mutation, steps) in {"exact": ({}, STEPS), **MUTATIONS}.items():
        ref = RefMoCo(init, world, rank, **mutation)
        refs[name] = [ref.step(a.double(), b.double(), STEP_SEED + s) for s, (a, b) in enumerate(views[:steps])]
    torch.save({"raypipe": ours, "ref": refs}, Path(out_dir) / f"rank{rank}.pt")
    if world > 1:
        tdist.destroy_process_group()


def close(actual, expected, what: str, **tolerance) -> None:
    torch.testing.assert_close(actual, expected, check_dtype=False, msg=lambda m: f"{what}: {m}", **tolerance)


def assert_agree(ours: list[dict], ref: list[dict]) -> None:
    """Per step the reference ran: the loss, the queue and its pointer, the key encoder that encoded
    the step's keys and the query encoder after SGD (parameters and BatchNorm statistics)."""
    assert 1 <= len(ref) <= len(ours) == STEPS
    for step, (a, b) in enumerate(zip(ours, ref)):
        close(a["loss"], b["loss"], f"step {step} loss", rtol=2e-6, atol=0)
        assert a["ptr"] == b["ptr"], f"step {step} queue pointer {a['ptr']} != {b['ptr']}"
        close(a["queue"], b["queue"], f"step {step} queue", rtol=0, atol=1e-6)
        for encoder in ("key", "query"):
            assert a[encoder].keys() == b[encoder].keys()
            for name in a[encoder]:
                close(a[encoder][name], b[encoder][name], f"step {step} {encoder} encoder {name}", rtol=1e-5, atol=5e-7)


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    """world -> per rank: raypipe's step records and each reference variant's."""
    cache = {}

    def get(world: int) -> list[dict]:
        if world not in cache:
            out = tmp_path_factory.mktemp(f"parity{world}")
            # fresh processes, one world too: the worker seeds torch, sets threads and the log level
            mp.spawn(run_worker, args=(world, (out / "pg").as_uri(), str(out)), nprocs=world, join=True)
            cache[world] = [torch.load(out / f"rank{r}.pt") for r in range(world)]
        return cache[world]
    return get


@pytest.mark.parametrize("world", [1, 2])
def test_raypipe_step_matches_reference(results, world):
    for res in results(world):
        assert len(res["ref"]["exact"]) == STEPS
        assert_agree(res["raypipe"], res["ref"]["exact"])
    if world > 1:   # one queue on every worker, different losses (different data)
        a, b = (r["raypipe"][-1] for r in results(world))
        assert torch.equal(a["queue"], b["queue"]) and a["ptr"] == b["ptr"] and not torch.equal(a["loss"], b["loss"])


@pytest.mark.parametrize("mutation", sorted(MUTATIONS))
@pytest.mark.parametrize("world", [1, 2])
def test_mutated_reference_disagrees(results, world, mutation):
    """The comparison catches each mutation (on rank 0; a wrong queue or momentum is global)."""
    res = results(world)[0]
    with pytest.raises(AssertionError, match=CAUGHT_BY[mutation]):
        assert_agree(res["raypipe"], res["ref"][mutation])
