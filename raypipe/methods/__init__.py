"""Phase-1 self-supervised methods, selected by ``teacher.method``: the base class, its registry
decorator and the built-in methods (``moco``: MoCo v2 + the paper's margin loss)."""
from .base import SSLMethod, register_method
from .moco import MoCoMargin

__all__ = ["SSLMethod", "register_method", "MoCoMargin"]
