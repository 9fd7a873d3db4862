"""Models for use outside raypipe: a plain torchvision ``state_dict``, an ONNX classifier and a
JSON card (classes, input size, normalisation, how to rebuild the network). The README
("The phases one by one") has the torch + torchvision loading recipe; tests/test_export.py runs it.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from .errors import ConfigError
from .checkpoints import load_exported
from .transforms import MEAN, STD
from .models import payload_arch
from .storage import Outputs


def export_model(model_path: str, out_dir: str | Path, onnx: bool = True) -> dict[str, str]:
    """Write ``<name>.state_dict.pt``, ``<name>.json`` and (classifiers, ``onnx``) ``<name>.onnx``."""

    net, payload = load_exported(model_path, kind=None)  # read once, whichever kind it holds
    kind = payload["kind"]
    out = Outputs(str(out_dir))   # a local folder or a URI
    name = Path(str(model_path).rstrip("/").rsplit("/", 1)[-1]).stem
    made = {"state_dict": f"{name}.state_dict.pt"}
    torch.save(net.state_dict(), out.local(made["state_dict"]))
    arch = payload_arch(payload)
    res = payload.get("resolution", 224)
    if onnx and kind == "classifier":
        made["onnx"] = f"{name}.onnx"
        export_onnx(net, res, str(out.local(made["onnx"])))
    card = {"kind": kind, "arch": arch, "classes": payload.get("classes"),
            "num_classes": len(payload["classes"]) if kind == "classifier" else 0,
            "input": {"size": [3, res, res], "range": "RGB in [0, 1], then (x - mean) / std",
                      "mean": list(MEAN), "std": list(STD)},
            "epochs_trained": payload.get("epochs_trained"), "source": str(model_path), "files": made}
    made["card"] = f"{name}.json"
    out.local(made["card"]).write_text(json.dumps(card, indent=2))
    return {k: out.publish(v) for k, v in made.items()}


def export_onnx(net: torch.nn.Module, resolution: int, path: str) -> None:
    """The classifier on normalised (N, 3, R, R) float input -> logits, any batch size."""
    try:
        import onnx  # noqa: F401
        import onnxscript  # noqa: F401
    except ImportError as exc:
        raise ConfigError(f"ONNX export needs the export extra (pip install 'raypipe[export]'), or pass "
                          f"--no-onnx: {exc}") from exc
    dummy = torch.zeros(1, 3, resolution, resolution)
    batch = torch.export.Dim("batch", min=1)
    torch.onnx.export(net.eval(), (dummy,), path, input_names=["image"], output_names=["logits"],
                      dynamic_shapes=({0: batch},), verbose=False)
