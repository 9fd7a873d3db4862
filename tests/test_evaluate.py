import csv
import shutil

import pytest
import torch

from raypipe.evaluate import evaluate_models
from raypipe.metrics import classification_report, ensemble_scores
from raypipe.models import build_backbone
from raypipe.transforms import normalize


def models(n=2):
    torch.manual_seed(0)
    return [build_backbone("resnet18", True, 4)[0].eval() for _ in range(n)]


@pytest.mark.parametrize("average", ["logits", "probs"])
def test_ensemble_of_one_equals_the_model_and_order_is_irrelevant(average):
    a, b = models()
    x = torch.randint(0, 256, (3, 3, 16, 16), dtype=torch.uint8)
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


def test_table_rows_share_one_decode_and_equal_separate_evaluations(ray_cluster, tiny_config, tmp_path, monkeypatch):
    """evaluate_rows decodes the split once for every row (the main job's test table) and each row
    scores what evaluate_models scores for it alone."""
    from raypipe import data as D
    from raypipe import evaluate
    from raypipe.checkpoints import save_model_file
    from raypipe.evaluate import evaluate_rows
    cfg = tiny_config()
    files = [save_model_file(tmp_path / f"m{i}.pt", "classifier", net.state_dict(), cfg,
                             {"backbone": "resnet18", "small_stem": True,
                              "classes": ["circle", "square", "star", "stripes"], "mode": "supervised"})
             for i, net in enumerate(models(2))]
    rows = {"one": {"models": files[:1]}, "one_10crop": {"models": files[:1], "ten_crop": True},
            "pair_10crop": {"models": files, "ten_crop": True, "weights": [2.0, 1.0]}}
    alone = {name: evaluate_models(cfg.data, "val", row["models"], ten_crop=row.get("ten_crop", False),
                                   weights=row.get("weights"), out_dir=None) for name, row in rows.items()}
    decodes = []
    real = D.decode_split
    monkeypatch.setattr(evaluate, "decode_split", lambda *a, **k: decodes.append(1) or real(*a, **k))
    shared = evaluate_rows(cfg.data, "val", rows)
    assert len(decodes) == 1
    for name in rows:
        assert shared[name]["confusion"] == alone[name]["confusion"], name
        assert shared[name]["top1"] == pytest.approx(alone[name]["top1"]) and shared[name]["views"] == alone[name]["views"]
    assert shared["pair_10crop"]["weights"] == [2.0, 1.0] and shared["pair_10crop"]["n_images"] == 32
    # the weighted 10-crop ensemble, computed straight from ensemble_scores on the same views
    views = D.eval_dataset(real(D.scan_split(cfg.data.root, "val"), cfg.data), cfg.data, view="ten_crop")
    batches = list(views.iter_torch_batches(batch_size=64))
    scores = torch.cat([ensemble_scores(models(2), b["views"], [2.0, 1.0]) for b in batches])
    labels = torch.cat([b["label"] for b in batches])
    assert shared["pair_10crop"]["top1"] == pytest.approx(100 * (scores.argmax(1) == labels).float().mean().item())
