"""Checkpoints (the resumable state of a run) and exported model files (what phases hand to each
other and to users): writing them whole, reading them back safely, loading a model file into its
torchvision network. No Ray here: the Ray Train side of checkpoints is ``raypipe.raytrain``."""
from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from . import storage
from .errors import CheckpointError
from .models import build_backbone, payload_arch

STATE_FILE = "state.pt"
MODEL_FORMAT = "raypipe-model"
MODEL_FORMAT_VERSION = 1


@dataclass
class LocalCheckpoints:
    """Train's local mode (num_workers=0) neither persists checkpoints nor hands them back to a
    re-run, so the loop keeps them in ``folder`` and, where the run's outputs are a URI, copies
    each to ``location`` too: a re-run on a fresh node resumes from there. The newest ``keep``
    are kept (``resources.keep_checkpoints``, as Train does)."""
    folder: str
    location: str | None = None
    keep: int = 2

    def save(self, state: dict, epoch: int) -> Path:
        folder = Path(self.folder) / f"checkpoint_epoch_{epoch:04d}"
        folder.mkdir(parents=True, exist_ok=True)
        write_state(state, folder)
        if self.location:
            storage.upload(folder, storage.join(self.location, folder.name))
        for old in sorted(Path(self.folder).glob("checkpoint_epoch_*"))[:-self.keep]:
            shutil.rmtree(old)
            if self.location:
                storage.remove_dir(storage.join(self.location, old.name))
        return folder

    def newest(self) -> Path | None:
        """The newest kept checkpoint folder; fetched from ``location`` when this node has none."""
        kept = sorted(Path(self.folder).glob("checkpoint_epoch_*"))
        if not kept and self.location:
            remote = [n for n, is_dir in storage.list_dir(self.location)
                      if is_dir and n.startswith("checkpoint_epoch_")
                      and storage.is_file(storage.join(self.location, n, STATE_FILE))]
            if remote:
                kept = [storage.download(storage.join(self.location, remote[-1]), Path(self.folder) / remote[-1])]
        return kept[-1] if kept else None


def load_state_file(path: Path) -> dict:
    if not path.is_file():
        raise CheckpointError(f"checkpoint file missing: {path}")
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:
        raise CheckpointError(f"checkpoint file is unreadable (torn or corrupt): {path}: {exc}") from exc


def write_state(state: dict, folder: Path) -> None:
    tmp = folder / (STATE_FILE + ".partial")
    torch.save(state, tmp)
    os.replace(tmp, folder / STATE_FILE)  # the file exists only once complete


def best_weights(state: dict) -> dict:
    """``state`` with the best epoch's weights (by the phase's ranking metric) as its model, and
    ``best_epoch`` set; a state from before best weights were kept is returned as it is."""
    best = state.get("best")
    if not best:
        return {**state, "best_epoch": state["epoch"]}
    return {**state, "model": best["model"], "best_epoch": best["epoch"]}


# ---- exported model files ------------------------------------------------------------
def save_model_file(path: Path, kind: str, state_dict: dict, cfg, extra: dict[str, Any]) -> Path:
    payload = {"format": MODEL_FORMAT, "version": MODEL_FORMAT_VERSION, "kind": kind,
               "state_dict": {k: v.detach().cpu() for k, v in state_dict.items()},
               "config": cfg.to_dict(), **extra}
    tmp = path.with_suffix(path.suffix + ".partial")
    torch.save(payload, tmp)
    os.replace(tmp, path)
    return path


def load_model_file(path: str | Path, kind: str | None = None) -> dict:
    """Read an exported model (local path or storage URI), checking format, version and kind."""
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


def load_exported(path: str | Path, kind: str | None = "classifier"):
    """An exported model file -> (eval-mode torchvision model, payload).

    ``kind="classifier"``: a student/baseline with its ``fc``; ``"teacher"``: the phase-1 backbone;
    ``None``: whichever the file holds.
    """
    payload = load_model_file(path, kind=kind)
    num_classes = len(payload["classes"]) if payload["kind"] == "classifier" else 0
    net, _ = build_backbone(**payload_arch(payload), num_classes=num_classes)
    try:
        net.load_state_dict(payload["state_dict"])
    except RuntimeError as exc:
        raise CheckpointError(f"{path}: weights do not fit {payload['backbone']}: {exc}") from exc
    return net.eval(), payload


def load_classifier(path: str | Path):
    return load_exported(path, "classifier")
