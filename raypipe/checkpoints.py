"""Checkpoints (Train's resumable state of a run) and exported model files (what phases hand
to each other and to users): writing them whole, reading them back safely, falling back to the
previous checkpoint when the newest is torn."""
from __future__ import annotations

import os
import random
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from . import storage
from .config import Config

STATE_FILE = "state.pt"
MODEL_FORMAT = "raypipe-model"
MODEL_FORMAT_VERSION = 1


class CheckpointError(RuntimeError):
    """A checkpoint or exported model file is unusable (torn, other format, other architecture)."""


def rng_state() -> dict:
    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])


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
        _write_state(state, folder)
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


def load_resume_state(local: LocalCheckpoints | None = None) -> dict | None:
    """The newest readable checkpoint of this run (after a failure or a re-run), or None.

    Ray Train hands over its latest checkpoint; if that file is torn (a write interrupted half
    way), the previous complete checkpoint in the same storage folder is used instead. In Train's
    local mode Train hands over none: the newest of ``local`` is the one.
    """
    import ray.train

    ckpt = ray.train.get_checkpoint()
    if ckpt is None and local and (folder := local.newest()):
        ckpt = ray.train.Checkpoint.from_directory(str(folder))
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


def report_epoch(metrics: dict, state: dict | None, rt, local: LocalCheckpoints | None = None) -> None:
    """Every worker reports (Train's barrier); rank 0 attaches the checkpoint when given, kept by
    ``local`` in Train's local mode, else in a temporary folder that Train copies to storage."""
    import ray.train

    if state is None or not rt.is_main:
        ray.train.report(metrics)
        return
    if local:
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(str(local.save(state, metrics["epoch"]))))
        return
    with tempfile.TemporaryDirectory(prefix="raypipe-ckpt-") as folder:
        _write_state(state, Path(folder))
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(folder))


def _write_state(state: dict, folder: Path) -> None:
    tmp = folder / (STATE_FILE + ".partial")
    torch.save(state, tmp)
    os.replace(tmp, folder / STATE_FILE)  # the file exists only once complete



def final_state(result) -> dict:
    """The last checkpoint's state (history + weights) from a finished Train run."""
    if result.checkpoint is None:
        raise CheckpointError(f"the run at {result.path} finished without a checkpoint")
    with result.checkpoint.as_directory() as folder:
        return load_state_file(Path(folder) / STATE_FILE)


def best_weights(state: dict) -> dict:
    """``state`` with the best epoch's weights (by the phase's ranking metric) as its model, and
    ``best_epoch`` set; a state from before best weights were kept is returned as it is."""
    best = state.get("best")
    if not best:
        return {**state, "best_epoch": state["epoch"]}
    return {**state, "model": best["model"], "best_epoch": best["epoch"]}



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

