"""The evaluation jobs on the driver (no Train): ``raypipe evaluate`` (a model or an ensemble, with
or without 10-crop, report + confusion plot, submission CSV) and ``raypipe linear-probe`` (a frozen
teacher's linear probe and k-NN); the main job's test table runs them as Ray tasks."""
from __future__ import annotations

import csv
import io
from pathlib import Path

import numpy as np
import torch

from . import storage
from .checkpoints import load_classifier, load_exported
from .cluster import ensure_ray
from .data import decode_split, eval_dataset, scan_dataset, scan_split
from .metrics import PROBE_LRS, backbone_features, classification_report, ensemble_scores, gather_outputs, knn_top1, \
    linear_probe
from .models import build_backbone


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
        for batch in eval_dataset(decoded, data_cfg, "ten_crop" if ten_crop else "eval").iter_torch_batches(
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
        ds = eval_dataset(decode_split(idx, data_cfg), data_cfg)
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
