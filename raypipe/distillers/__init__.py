"""Phase-2 distillers, selected by ``student.mode``: the base class, its registry decorator and the
built-ins (``distill``: OFD self-distillation; ``finetune`` and ``supervised``: the baselines)."""
from .base import Classifier, Distiller, Supervised, register_distiller
from .ofd import OFD

__all__ = ["Classifier", "Distiller", "Supervised", "register_distiller", "OFD"]
