"""`raypipe export`: exported weights load into plain torchvision / onnxruntime with the same outputs."""
import json

import pytest
import torch
import torch.nn as nn
import torchvision

from raypipe.cli import main
from raypipe.config import load_config
from raypipe.checkpoints import CheckpointError, load_classifier, load_model_file, save_model_file
from raypipe.models import build_backbone

CLASSES = ["circle", "square", "star", "stripes"]


def trained_like(net: nn.Module) -> nn.Module:
    """Non-trivial BN statistics and weights, so a mis-loaded layer changes the logits."""
    torch.manual_seed(1)
    net.train()
    for _ in range(3):
        net(torch.randn(8, 3, 32, 32))
    return net.eval()


@pytest.fixture(params=[(True, 2), (False, 1)], ids=["small_stem", "standard_stem"])
def model_file(request, tmp_path):
    small_stem, stride = request.param
    net, _ = build_backbone("resnet18", small_stem, len(CLASSES), stem_stride=stride)
    trained_like(net)
    cfg = load_config(overrides=["data.resolution=32"])
    return save_model_file(tmp_path / "student.pt", "classifier", net.state_dict(), cfg,
                           {"backbone": "resnet18", "small_stem": small_stem, "stem_stride": stride,
                            "classes": CLASSES, "mode": "distill", "resolution": 32})


def test_exported_state_dict_loads_into_torchvision_resnet_with_the_same_logits(model_file, tmp_path, capsys):
    assert main(["export", str(model_file), "--out", str(tmp_path / "out")]) == 0
    card = json.loads((tmp_path / "out" / "student.json").read_text())
    assert card["classes"] == CLASSES and card["num_classes"] == 4 and card["input"]["size"] == [3, 32, 32]
    # the recipe of raypipe/export.py, with nothing from raypipe
    net = torchvision.models.resnet18(num_classes=card["num_classes"])
    if card["arch"]["small_stem"]:
        net.conv1 = nn.Conv2d(3, 64, 3, card["arch"]["stem_stride"], 1, bias=False)
        net.maxpool = nn.Identity()
    net.load_state_dict(torch.load(tmp_path / "out" / "student.state_dict.pt", weights_only=True))
    ours, _ = load_classifier(model_file)
    x = torch.randn(5, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(net.eval()(x), ours(x), atol=1e-5)

    ort = pytest.importorskip("onnxruntime", reason="onnxruntime is a test extra: pip install -e '.[test]'")
    session = ort.InferenceSession(str(tmp_path / "out" / "student.onnx"))
    onnx_logits = torch.from_numpy(session.run(None, {"image": x.numpy()})[0])
    with torch.no_grad():
        ref = ours(x)
    assert torch.equal(onnx_logits.argmax(1), ref.argmax(1)) and torch.allclose(onnx_logits, ref, atol=1e-4)


def test_model_files_load_safely_and_reject_code(tmp_path):
    class Evil:
        def __reduce__(self):
            return (print, ("pickled code ran",))

    cfg = load_config()
    net, _ = build_backbone("resnet18", True, 2)
    path = save_model_file(tmp_path / "m.pt", "classifier", net.state_dict(), cfg,
                           {"backbone": "resnet18", "small_stem": True, "classes": ["a", "b"]})
    assert load_model_file(path, "classifier")["classes"] == ["a", "b"]   # weights_only=True suffices
    payload = torch.load(path, weights_only=True)
    payload["extra"] = Evil()
    torch.save(payload, tmp_path / "evil.pt")
    with pytest.raises(CheckpointError, match="evil.pt"):
        load_model_file(tmp_path / "evil.pt")
