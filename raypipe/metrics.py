"""Evaluation as pure tensor functions: features gathered over workers, the weighted k-NN monitor,
the linear probe (MoCo's protocol on cached features), ensemble / 10-crop scores and the
classification report. The jobs that run them on a data set are in ``raypipe.evaluate``."""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import dist
from .settings import AVERAGES, PROBE_LRS
from .transforms import normalize


# ---- features ------------------------------------------------------------------------
@torch.no_grad()
def gather_outputs(fn, batches, device, mask_fn=None, key: str = "image") -> dict[str, torch.Tensor]:
    """Run ``fn`` over uint8 image batches; gather outputs, labels and row ids from all ranks,
    ordered by row id. ``mask_fn(idx)`` picks this rank's rows (each row on exactly one rank)."""
    outs, labels, idxs = [], [], []
    for batch in batches:
        idx = batch["idx"].cpu()
        keep = mask_fn(idx) if mask_fn is not None else torch.ones_like(idx, dtype=torch.bool)
        if not keep.any():
            continue
        images = batch[key][keep.to(batch[key].device)].to(device, non_blocking=True)
        outs.append(fn(images).float().cpu())
        labels.append(batch["label"].cpu()[keep])
        idxs.append(idx[keep])
    local = (torch.cat(outs) if outs else torch.empty(0), torch.cat(labels) if labels else torch.empty(0, dtype=torch.long),
             torch.cat(idxs) if idxs else torch.empty(0, dtype=torch.long))
    parts = [p for p in dist.all_gather_objects(local) if p[2].numel()]
    out = torch.cat([p[0] for p in parts])
    lab = torch.cat([p[1] for p in parts])
    ids = torch.cat([p[2] for p in parts])
    order = torch.argsort(ids)
    if torch.unique(ids).numel() != ids.numel():
        raise RuntimeError("evaluation saw a row twice: rows must be split by global index")
    return {"out": out[order], "label": lab[order], "idx": ids[order]}


def backbone_features(net: nn.Module, channels_last: bool = False):
    def fn(images):
        return net(normalize(images, channels_last))
    return fn


def knn_top1(bank: torch.Tensor, bank_labels: torch.Tensor, query: torch.Tensor, query_labels: torch.Tensor,
             k: int, t: float, num_classes: int, chunk: int = 1024) -> float:
    """Weighted k-NN (InstDisc): cosine similarity, top-k neighbours vote with exp(sim / t)."""
    bank = F.normalize(bank.float(), dim=1)
    query = F.normalize(query.float(), dim=1)
    k = min(k, bank.shape[0])
    correct = 0
    for start in range(0, query.shape[0], chunk):
        q = query[start:start + chunk]
        sim, nn_idx = (q @ bank.t()).topk(k, dim=1)
        votes = torch.zeros(q.shape[0], num_classes)
        votes.scatter_add_(1, bank_labels[nn_idx], (sim / t).exp())
        correct += (votes.argmax(1) == query_labels[start:start + chunk]).sum().item()
    return 100.0 * correct / max(1, query.shape[0])


# ---- linear probe (MoCo protocol on frozen, cached features) -------------------------
def train_linear(feats: torch.Tensor, labels: torch.Tensor, num_classes: int, lr: float, epochs: int = 100,
                 milestones=(60, 80), batch_size: int = 256, seed: int = 0) -> nn.Linear:
    """MoCo's ``main_lincls`` on cached features: raw features, fc ~ N(0, 0.01) with zero bias,
    SGD momentum 0.9, no weight decay, lr x0.1 at the milestones. (MoCo also augments the images
    each epoch; cached centre-crop features are the cheap equivalent used here.)"""
    g = torch.Generator().manual_seed(seed)
    clf = nn.Linear(feats.shape[1], num_classes)
    with torch.no_grad():
        clf.weight.normal_(0.0, 0.01, generator=g)
        clf.bias.zero_()
    opt = torch.optim.SGD(clf.parameters(), lr=lr, momentum=0.9, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.MultiStepLR(opt, list(milestones), 0.1)
    for _ in range(epochs):
        perm = torch.randperm(feats.shape[0], generator=g)
        for start in range(0, feats.shape[0], batch_size):
            b = perm[start:start + batch_size]
            loss = F.cross_entropy(clf(feats[b]), labels[b])
            opt.zero_grad()
            loss.backward()
            opt.step()
        sched.step()
    return clf


@torch.no_grad()
def top1(clf: nn.Module, feats: torch.Tensor, labels: torch.Tensor) -> float:
    return 100.0 * (clf(feats).argmax(1) == labels).float().mean().item()


def extend_lr_grid(score, lrs, max_extra: int = 2, factor: float = 10.0) -> dict:
    """``{lr: score(lr)}`` over ``lrs``; while the best lr is the grid's smallest or largest, one
    more lr ``factor`` beyond that edge is tried (at most ``max_extra``), so the choice is not
    cut off by the grid. Ties go to the first lr tried."""
    scores = {lr: score(lr) for lr in lrs}
    for _ in range(max_extra if len(scores) > 1 else 0):   # one lr given: the user's choice
        best = max(scores, key=scores.get)
        if min(scores) < best < max(scores):
            break
        beyond = best / factor if best == min(scores) else best * factor
        scores[beyond] = score(beyond)
    return scores


def linear_probe(train_feats, train_labels, eval_feats: dict[str, tuple], num_classes: int,
                 epochs: int = 100, lrs=PROBE_LRS, select_on: str = "val", batch_size: int = 256,
                 seed: int = 0, max_extra_lrs: int = 2) -> dict:
    """A linear classifier per learning rate in ``lrs`` (plus up to ``max_extra_lrs`` beyond the
    grid's edge while the best lr sits on it); the one with the best top-1 on the ``select_on``
    split (the first evaluation split if absent) is kept. Returns ``{"top1": {split: score},
    "lr": chosen lr, "select_on": split, "lr_scores": {lr: score}, "lr_at_edge": bool}``
    (``lr_at_edge``: the chosen lr is still the smallest or largest tried)."""
    select_on = select_on if select_on in eval_feats else next(iter(eval_feats))
    milestones = (int(epochs * 0.6), int(epochs * 0.8))
    trained = {}

    def val_top1(lr):
        trained[lr] = train_linear(train_feats, train_labels, num_classes, lr, epochs, milestones, batch_size, seed)
        return top1(trained[lr], *eval_feats[select_on])

    lr_scores = extend_lr_grid(val_top1, lrs, max_extra_lrs)
    best = max(lr_scores, key=lr_scores.get)
    return {"top1": {name: top1(trained[best], f, y) for name, (f, y) in eval_feats.items()},
            "lr": best, "select_on": select_on, "lr_scores": lr_scores,
            "lr_at_edge": len(lr_scores) > 1 and best in (min(lr_scores), max(lr_scores))}


# ---- classification: single model, ensemble, 10-crop ---------------------------------
@torch.no_grad()
def ensemble_scores(models: list[nn.Module], images: torch.Tensor, weights: list[float] | None = None,
                    channels_last: bool = False, average: str = "logits") -> torch.Tensor:
    """Class scores averaged over models (weighted) and, for (N,V,C,H,W) input, over views.

    ``average="logits"`` averages raw logits (the paper's 10-crop); ``"probs"`` averages softmax
    probabilities. Both rank classes; only ``probs`` sums to 1.
    """
    if average not in AVERAGES:
        raise ValueError(f"average={average!r}: choose one of {AVERAGES}")
    views = images.dim() == 5
    n = images.shape[0]
    flat = images.flatten(0, 1) if views else images
    x = normalize(flat, channels_last)
    weights = weights or [1.0] * len(models)
    total = None
    for w, model in zip(weights, models):
        p = model(x).float()
        if average == "probs":
            p = p.softmax(dim=1)
        if views:
            p = p.view(n, -1, p.shape[1]).mean(dim=1)
        total = p * w if total is None else total + p * w
    return total / sum(weights)


def classification_report(scores: torch.Tensor, labels: torch.Tensor, classes: list[str]) -> dict:
    pred = scores.argmax(1)
    top5 = scores.topk(min(5, scores.shape[1]), dim=1).indices
    n = len(classes)
    confusion = torch.zeros(n, n, dtype=torch.long)
    confusion.index_put_((labels, pred), torch.ones_like(labels), accumulate=True)
    per_class = {c: (100.0 * confusion[i, i].item() / max(1, confusion[i].sum().item())) for i, c in enumerate(classes)}
    return {"top1": 100.0 * (pred == labels).float().mean().item(),
            "top5": 100.0 * (top5 == labels[:, None]).any(1).float().mean().item(),
            "n_images": int(labels.numel()), "per_class_top1": per_class,
            "confusion": confusion.tolist()}
