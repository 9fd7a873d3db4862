"""Phase-1 self-supervised methods, selected by ``teacher.method``.

A method is a thin class: it builds the module it trains (``model``, checkpointed whole and
wrapped in DDP; its frozen parts have ``requires_grad=False``), names the encoder that is kept
(``backbone``: monitored by k-NN, exported as the teacher, distilled in phase 2) and does one
training step on two views of a batch, returning the loss and a few metrics. Losses are pure
functions in ``raypipe.losses``; the epoch loop, lr schedule, checkpoints and k-NN monitor are
the trainer's (``raypipe.teacher``)."""
from __future__ import annotations

import torch
import torch.nn as nn

from ..config import Config
from ..plugins import Registry


class SSLMethod:
    """Base of a phase-1 method. Subclasses set ``self.model`` in ``__init__`` and implement
    ``backbone`` and ``training_step``; ``metric_names`` are the keys ``training_step`` returns."""

    metric_names: tuple[str, ...] = ()

    def __init__(self, cfg: Config, world_size: int = 1):
        self.cfg = cfg
        self.model: nn.Module

    @property
    def backbone(self) -> nn.Module:
        """The torchvision encoder (fc = Identity) that the teacher file keeps."""
        raise NotImplementedError

    def training_step(self, net: nn.Module, view1: torch.Tensor, view2: torch.Tensor,
                      rt) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """One step on two normalised views. ``net`` is ``self.model`` as trained (DDP-wrapped with
        several workers: call it, not ``self.model``, for the forward pass); ``rt`` the Runtime."""
        raise NotImplementedError

    def export_extras(self) -> dict:
        """Extra tensors/values stored in the teacher file beside the backbone (e.g. a head)."""
        return {}


METHODS = Registry("teacher.method", SSLMethod)
register_method = METHODS.register

from . import moco  # noqa: E402,F401  (registers the built-in methods)
