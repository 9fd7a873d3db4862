import csv
import shutil

import pytest
import torch

from raypipe.evaluate import classification_report, ensemble_scores, evaluate_models
from raypipe.models import build_backbone


def models(n=2):
    torch.manual_seed(0)
    return [build_backbone("resnet18", True, 4)[0].eval() for _ in range(n)]


@pytest.mark.parametrize("average", ["logits", "probs"])
def test_ensemble_of_one_equals_the_model_and_order_is_irrelevant(average):
    a, b = models()
    x = torch.randint(0, 256, (3, 3, 16, 16), dtype=torch.uint8)
    from raypipe.data import normalize
    with torch.no_grad():
        single = a(normalize(x))
    single = single.softmax(1) if average == "probs" else single
    assert torch.allclose(ensemble_scores([a], x, average=average), single, atol=1e-5)
    assert torch.allclose(ensemble_scores([a, b], x, average=average), ensemble_scores([b, a], x, average=average),
                          atol=1e-5)
    assert torch.allclose(ensemble_scores([a, b], x, [1.0, 0.0], average=average), single, atol=1e-5)
    views = torch.stack([x] * 10, dim=1)   # 10 identical views average to the single view
    assert torch.allclose(ensemble_scores([a], views, average=average), single, atol=1e-5)


def test_ten_crop_averages_logits_or_probabilities_as_asked():
    a, b = models()
    views = torch.randint(0, 256, (2, 10, 3, 16, 16), dtype=torch.uint8)
    from raypipe.data import normalize
    with torch.no_grad():
        la, lb = (m(normalize(views.flatten(0, 1))).view(2, 10, -1) for m in (a, b))
    assert torch.allclose(ensemble_scores([a, b], views, average="logits"), (la.mean(1) + lb.mean(1)) / 2, atol=1e-5)
    probs = (la.softmax(-1).mean(1) + lb.softmax(-1).mean(1)) / 2
    assert torch.allclose(ensemble_scores([a, b], views, average="probs"), probs, atol=1e-6)
    # the two rules differ on these inputs, so a swapped rule fails the lines above
    assert not torch.allclose(ensemble_scores([a, b], views, average="logits").softmax(-1), probs, atol=1e-4)
    with pytest.raises(ValueError, match="average"):
        ensemble_scores([a], views, average="votes")


def test_report_counts():
    probs = torch.tensor([[0.9, 0.1], [0.2, 0.8], [0.6, 0.4]])
    rep = classification_report(probs, torch.tensor([0, 1, 1]), ["a", "b"])
    assert rep["top1"] == pytest.approx(200 / 3) and rep["per_class_top1"] == {"a": 100.0, "b": 50.0}
    assert rep["confusion"] == [[1, 0], [1, 1]] and rep["n_images"] == 3


@pytest.fixture
def classifier_file(tmp_path, tiny_config):
    from raypipe.checkpoints import save_model_file
    net = models(1)[0]
    cfg = tiny_config()
    return save_model_file(tmp_path / "m.pt", "classifier", net.state_dict(), cfg,
                           {"backbone": "resnet18", "small_stem": True,
                            "classes": ["circle", "square", "star", "stripes"], "mode": "supervised"})


def test_evaluate_report_ten_crop_and_submission(ray_cluster, tiny_data, tiny_config, classifier_file, tmp_path):
    cfg = tiny_config()
    report = evaluate_models(cfg.data, "val", [classifier_file], ten_crop=True, out_dir=tmp_path / "ev")
    assert report["n_images"] == 32 and 0 <= report["top1"] <= report["top5"] <= 100
    assert (tmp_path / "ev" / "report.json").is_file() and (tmp_path / "ev" / "confusion.png").is_file()
    # VIPriors layout: unlabelled test/imgs -> submission CSV in sorted-folder class order
    vip = tmp_path / "vip"
    shutil.copytree(tiny_data / "train", vip / "train")
    (vip / "test" / "imgs").mkdir(parents=True)
    files = sorted((tiny_data / "test").rglob("*.jpg"))[:6]
    for i, f in enumerate(files):
        shutil.copy(f, vip / "test" / "imgs" / f"{i:05d}.jpg")
    sub = tmp_path / "sub.csv"
    vcfg = cfg.with_overrides({"data.root": str(vip)})
    evaluate_models(vcfg.data, "test", [classifier_file], out_dir=tmp_path / "ev2", submission=sub)
    rows = list(csv.reader(sub.open()))
    assert rows[0] == ["Image IDs", "Predictions"] and len(rows) == 7
    assert [r[0] for r in rows[1:]] == [f"{i:05d}.jpg" for i in range(6)]
    assert all(0 <= int(r[1]) < 4 for r in rows[1:])
