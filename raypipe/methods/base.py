"""The base of a phase-1 self-supervised method (``teacher.method``).

A method is one file plus its registration. It is a thin class that owns everything about it:
  * ``Settings``: its config section ``teacher.<section>`` (a pydantic model: types, bounds, docs),
    and ``moved``, the old keys that now live there;
  * ``views(cfg)``: the random views of each image it trains on (recipes from ``raypipe.transforms``);
  * ``validate(cfg)`` (before anything runs) and ``check_data(cfg, n_train)`` (once the training
    set is counted);
  * ``search_space(cfg, n_train)``: what the main job's Tune stage 1 searches, and where it starts;
  * the module it trains (``model``, checkpointed whole and wrapped in DDP; frozen parts have
    ``requires_grad=False``), the encoder that is kept (``backbone``: monitored by k-NN, exported
    as the teacher, distilled in phase 2) and one training step on the views of a batch.
Losses are pure functions in ``raypipe.losses``; the epoch loop, lr schedule, checkpoints and k-NN
monitor are the trainer's (``raypipe.teacher``)."""
from __future__ import annotations

from typing import Any, Callable, ClassVar, TypeVar

import torch
import torch.nn as nn

from ..registry import METHODS
from ..settings import Section
from ..transforms import MocoView

T = TypeVar("T", bound=type)


class SSLMethod:
    """Base of a phase-1 method. Subclasses set ``self.model`` in ``__init__`` and implement
    ``backbone`` and ``training_step``; ``metric_names`` are the keys ``training_step`` returns."""

    class Settings(Section):
        """No settings of its own."""

    section: ClassVar[str | None] = None       # its config section (default: the name it is registered under)
    moved: ClassVar[dict[str, str]] = {}        # old dotted key -> field of Settings
    metric_names: tuple[str, ...] = ()

    def __init__(self, cfg, world_size: int = 1):
        self.cfg = cfg
        self.model: nn.Module

    # ---- what the method declares (class-level: used before anything is built) ----------
    @classmethod
    def settings(cls, cfg) -> Any:
        """This method's section of ``cfg``."""
        return getattr(cfg.teacher, cls.section)

    @classmethod
    def views(cls, cfg) -> list:
        """The random views of every training image (default: two MoCo v2 views)."""
        return [MocoView(cfg.data.resolution)] * 2

    @classmethod
    def validate(cls, cfg) -> None:
        """Cross-field checks of a config that selects this method (raise ConfigError)."""

    @classmethod
    def check_data(cls, cfg, n_train: int) -> None:
        """Checks that need the number of training images (raise ConfigError)."""

    @classmethod
    def search_space(cls, cfg, n_train: int) -> tuple[dict, dict]:
        """(Tune domains at dotted keys, the config's own point to start from); {} = nothing."""
        return {}, {}

    # ---- training ------------------------------------------------------------------------
    @property
    def backbone(self) -> nn.Module:
        """The torchvision encoder (fc = Identity) that the teacher file keeps."""
        raise NotImplementedError

    def training_step(self, net: nn.Module, views: list[torch.Tensor],
                      rt) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """One step on the normalised views of a batch (in ``views(cfg)``'s order). ``net`` is
        ``self.model`` as trained (DDP-wrapped with several workers: call it, not ``self.model``,
        for the forward pass); ``rt`` the Runtime (device, autocast)."""
        raise NotImplementedError

    def export_extras(self) -> dict:
        """Extra tensors/values stored in the teacher file beside the backbone (e.g. a head)."""
        return {}


def register_method(name: str) -> Callable[[T], T]:
    """Class decorator: ``@register_method("byol")`` makes ``teacher.method: byol`` select it."""
    return METHODS.register(name, SSLMethod)
