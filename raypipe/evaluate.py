"""Evaluators: weighted k-NN monitor, linear probe, and (ensemble, 10-crop) classification."""
from __future__ import annotations

import csv
import io
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from . import dist, storage
from .config import AVERAGES, PROBE_LRS
from .data import normalize


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


def plot_confusion(confusion: list[list[int]], classes: list[str], path: Path, title: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    m = np.asarray(confusion, dtype=float)
    m = m / np.maximum(1, m.sum(1, keepdims=True))
    size = min(20, 3 + 0.4 * len(classes))
    fig, ax = plt.subplots(figsize=(size, size))
    ax.imshow(m, cmap="Blues", vmin=0, vmax=1)
    if len(classes) <= 50:
        ax.set_xticks(range(len(classes)), classes, rotation=90, fontsize=7)
        ax.set_yticks(range(len(classes)), classes, fontsize=7)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def write_submission(location: str, image_ids: list[str], predictions: list[int]) -> None:
    """The VIPriors CSV: ``Image IDs,Predictions`` (class index in sorted-folder order); local or URI."""
    text = io.StringIO(newline="")
    writer = csv.writer(text)
    writer.writerow(["Image IDs", "Predictions"])
    writer.writerows(zip(image_ids, predictions))
    storage.write_text(str(location), text.getvalue())


# ---- driver-side runs (no Train): `raypipe evaluate`, `raypipe linear-probe` ----------
def _device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def evaluate_rows(data_cfg, split: str, rows: dict[str, dict], batch_size: int = 64,
                  average: str = "logits", keep_scores: bool = False) -> dict[str, dict]:
    """Several evaluations of one split that is decoded ONCE. Each row is ``{"models": [paths],
    "ten_crop": bool, "weights": [...] or None}``: every model's scores on each view that some row
    needs (centre crop, 10-crop) are computed once, and a row is their weighted average (one model,
    or an ensemble; logits or probabilities averaged, ``average``). -> {row name: report};
    ``keep_scores``: each report also holds the image ``ids`` and their ``scores`` (a tensor)."""
    from .cluster import ensure_ray
    from .data import decode_split, scan_split, with_view
    from .student import load_classifier

    for name, row in rows.items():
        if row.get("weights") and len(row["weights"]) != len(row["models"]):
            raise ValueError(f"{name}: --weights has {len(row['weights'])} values for {len(row['models'])} models")
    paths = list(dict.fromkeys(str(p) for row in rows.values() for p in row["models"]))
    loaded = {p: load_classifier(p) for p in paths}
    classes = loaded[paths[0]][1]["classes"]
    for path, (_, payload) in loaded.items():
        if payload["classes"] != classes:
            raise ValueError(f"{path} was trained on other classes than {paths[0]}")
    split_name = {"train": data_cfg.train_split, "val": data_cfg.val_split, "test": data_cfg.test_split}.get(split, split)
    index = scan_split(data_cfg.root, split_name, classes=classes)
    ensure_ray()
    decoded = decode_split(index, data_cfg)
    device = _device()
    models = {p: m.to(device) for p, (m, _) in loaded.items()}
    scores, labels, idxs = {}, None, None
    for ten_crop in sorted({bool(row.get("ten_crop")) for row in rows.values()}):
        needed = list(dict.fromkeys(str(p) for row in rows.values() if bool(row.get("ten_crop")) == ten_crop
                                    for p in row["models"]))
        key = "views" if ten_crop else "image"
        parts = {p: [] for p in needed}
        lab, idx = [], []
        for batch in with_view(decoded, "ten_crop" if ten_crop else "eval", data_cfg).iter_torch_batches(
                batch_size=batch_size):
            images = batch[key].to(device)
            for p in needed:
                parts[p].append(ensemble_scores([models[p]], images, average=average).cpu())
            lab.append(batch["label"].cpu())
            idx.append(batch["idx"].cpu())
        order = torch.argsort(torch.cat(idx))
        labels, idxs = torch.cat(lab)[order], torch.cat(idx)[order]
        scores.update({(p, ten_crop): torch.cat(parts[p])[order] for p in needed})
    reports = {}
    for name, row in rows.items():
        ten_crop, weights = bool(row.get("ten_crop")), row.get("weights")
        w = weights or [1.0] * len(row["models"])
        combined = sum(wi * scores[(str(p), ten_crop)] for wi, p in zip(w, row["models"])) / sum(w)
        report = {"split": split_name, "models": [str(p) for p in row["models"]], "weights": weights,
                  "views": "10-crop" if ten_crop else "centre crop", "average": average,
                  "skipped_images": decoded.skipped, "n_images": int(labels.numel())}
        if keep_scores:
            report.update(ids=[storage.name(index.paths[i]) for i in idxs.tolist()], scores=combined)
        if index.labelled:
            report.update(classification_report(combined, labels, classes))
        reports[name] = report
    return reports


def evaluate_models(data_cfg, split: str, model_paths: list[str], ten_crop: bool = False,
                    weights: list[float] | None = None, out_dir: str | Path | None = "eval",
                    submission: str | Path | None = None, batch_size: int = 64, average: str = "logits") -> dict:
    """One model or an ensemble (logits or probabilities averaged, optional weights), with or without 10-crop,
    on a labelled split (JSON report + confusion PNG in ``out_dir``, unless None) or an
    unlabelled one (submission CSV)."""
    rows = {"row": {"models": model_paths, "ten_crop": ten_crop, "weights": weights}}
    report = evaluate_rows(data_cfg, split, rows, batch_size=batch_size, average=average, keep_scores=True)["row"]
    ids, scores = report.pop("ids"), report.pop("scores")
    if submission:
        write_submission(str(submission), ids, scores.argmax(1).tolist())
        report["submission"] = str(submission)
    if out_dir is not None:
        write_eval_outputs(report, out_dir)
    return report


def write_eval_outputs(report: dict, out_dir: str | Path) -> None:
    """``report.json`` and, for a labelled split, ``confusion.png`` in a local folder or URI."""
    out = storage.Outputs(str(out_dir))
    if "confusion" in report:
        plot_confusion(report["confusion"], list(report["per_class_top1"]), out.local("confusion.png"),
                       f"{report['split']}: top-1 {report['top1']:.2f}% ({report['views']}, "
                       f"{len(report['models'])} model(s))")
        out.publish("confusion.png")
    storage.write_json(out.path("report.json"), report)


def probe_teacher(data_cfg, teacher: str | dict, splits: tuple[str, ...] = ("val",), epochs: int = 100,
                  lrs=PROBE_LRS, batch_size: int = 128, seed: int = 0, knn_k: int = 50,
                  knn_t: float = 0.1) -> dict:
    """Frozen phase-1 teacher on each split: linear probe (lr chosen on val) and weighted k-NN,
    both fit on train. ``teacher``: a teacher file, or an architecture dict (``arch_of``) for
    random weights drawn with ``seed``."""
    from .cluster import ensure_ray
    from .data import decode_split, scan_dataset, with_view
    from .models import build_backbone
    from .student import load_exported

    if isinstance(teacher, dict):
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            net = build_backbone(**teacher)[0].eval()
    else:
        net, _ = load_exported(teacher, "teacher")
    index = scan_dataset(data_cfg, tuple(dict.fromkeys(("train", "val", *splits))))
    ensure_ray()
    device = _device()
    net = net.to(device)
    feats = {}
    for name, idx in index.items():
        ds = with_view(decode_split(idx, data_cfg), "eval", data_cfg)
        out = gather_outputs(backbone_features(net), ds.iter_torch_batches(batch_size=batch_size), device)
        feats[name] = (out["out"], out["label"])
    num_classes = len(index["train"].classes)
    probe = linear_probe(*feats["train"], {s: feats[s] for s in index if s != "train"}, num_classes,
                         epochs=epochs, lrs=tuple(lrs), select_on="val", seed=seed)
    out = {f"{s}_top1": probe["top1"][s] for s in splits}
    for s in splits:
        out[f"{s}_knn_top1"] = knn_top1(*feats["train"], *feats[s], k=knn_k, t=knn_t, num_classes=num_classes)
    return {**out, "probe_lr": probe["lr"], "probe_lr_chosen_on": probe["select_on"],
            "probe_lr_at_edge": probe["lr_at_edge"],
            "probe_val_top1_by_lr": {str(k): v for k, v in sorted(probe["lr_scores"].items())}}
