"""Phase 1 on real Ray Train (CPU, gloo): local mode, two workers, resume."""
import io
import json
import math

import pandas as pd
import pytest

import torch
import torch.nn.functional as F

from raypipe.metrics import knn_top1, linear_probe
from raypipe.phase import pretrain


def _queue_probe(config):
    from raypipe import dist
    from raypipe.methods.moco import MoCo
    torch.manual_seed(0)  # same weights on both ranks, as DDP + EMA keep them in training
    m = MoCo({"backbone": "resnet18", "small_stem": True}, proj_hidden=16, proj_dim=4, queue_size=8, key_momentum=0.99)
    rank = dist.rank()
    m.enqueue(dist.all_gather_cat(torch.full((2, 4), float(rank + 1))))
    queues = dist.all_gather_objects(m.queue.clone())
    m.eval()  # BN on running stats: the cross-rank shuffle must return every key to its owner
    x = torch.randn(3, 3, 16, 16, generator=torch.Generator().manual_seed(rank))
    shuffled, direct = m.encode_keys(x), F.normalize(m.encoder_k(x), dim=1)
    ok = dist.all_gather_objects(bool(torch.allclose(shuffled, direct, atol=1e-5)))
    return ({"world": dist.world_size(), "queues_equal": all(torch.equal(q, queues[0]) for q in queues),
                      "queue_values": m.queue[:4, 0].tolist(), "ptr": int(m.queue_ptr),
            "shuffle_ok": all(ok)})


def test_two_workers_gather_keys_into_identical_queues(ray_cluster, tmp_path):
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer
    result = TorchTrainer(_queue_probe, scaling_config=ScalingConfig(num_workers=2, resources_per_worker={"CPU": 0.5}),
                          run_config=RunConfig(name="probe", storage_path=str(tmp_path))).fit()
    m = result.return_value  # rank 0's return value
    assert m["world"] == 2 and m["queues_equal"] and m["shuffle_ok"]
    assert m["queue_values"] == [1.0, 1.0, 2.0, 2.0] and m["ptr"] == 4   # 2 keys from each rank, in rank order


def test_local_mode_run_writes_the_run_folder(trained_teacher):
    run = trained_teacher.parent
    for name in ("config.yaml", "metrics.csv", "metrics.json", "teacher.pt", "data_report.json"):
        assert (run / name).is_file(), name
    assert any((run / "tensorboard").iterdir())
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["epochs"] == 1 and 0 <= metrics["knn_top1"] <= 100 and metrics["world_size"] == 1
    assert metrics["images_per_s"] > 0 and metrics["skipped_images"] == 0


def test_linear_probe_command_writes_linear_and_knn_scores(trained_teacher, tiny_data, tmp_path):
    from raypipe.cli import main
    from conftest import TINY

    out = tmp_path / "probe" / "scores.json"
    assert main(["linear-probe", str(tiny_data), *TINY, "--teacher", str(trained_teacher),
                 "--split", "val", "test", "--epochs", "5", "--out", str(out)]) == 0
    scores = json.loads(out.read_text())
    assert scores["teacher"] == str(trained_teacher)
    for key in ("val_top1", "test_top1", "val_knn_top1", "test_knn_top1"):
        assert 0 <= scores[key] <= 100, key
    # every score is a whole number of correct images of its split
    for split in ("val", "test"):
        n = sum(1 for f in (tiny_data / split).rglob("*") if f.is_file())
        for key in (f"{split}_top1", f"{split}_knn_top1"):
            assert abs(scores[key] * n / 100 - round(scores[key] * n / 100)) < 1e-4, (key, n)


@pytest.mark.parametrize("workers,on_s3", [pytest.param(0, False, id="local_mode"),
                                            pytest.param(0, True, id="local_mode_s3"),
                                            pytest.param(2, False, id="two_workers")])
@pytest.mark.e2e
@pytest.mark.timeout(600)
def test_run_then_resume_continues_at_next_epoch(ray_cluster, s3_server, tiny_config, tmp_path, workers, on_s3):
    # Train's local mode hands back no checkpoint: the run keeps its own, in its outputs; on S3 the
    # second run starts on an empty local folder (a fresh node) and resumes from the bucket alone
    from raypipe import storage

    output_dir = f"{s3_server}/{tmp_path.name}" if on_s3 else str(tmp_path / "runs")
    cfg = tiny_config("name=resume", f"output_dir={output_dir}", f"resources.num_workers={workers}",
                      "teacher.moco.queue_size=32")

    def history():
        return pd.read_csv(io.StringIO(storage.read_text(storage.join(output_dir, "resume", "metrics.csv"))))

    first = pretrain(cfg)
    assert first["world_size"] == max(1, workers) and first["epochs"] == 1
    history_1 = history()
    second = pretrain(cfg.with_overrides({"teacher.epochs": 2}))
    history_2 = history()
    assert history_2["epoch"].tolist() == [0, 1]
    assert history_2["start_epoch"].tolist() == [0, 1]          # epoch 1 ran in the resumed run only
    pd.testing.assert_series_equal(history_1.loc[0, ["loss", "knn_top1"]], history_2.loc[0, ["loss", "knn_top1"]])
    assert second["epochs"] == 2


def test_knn_separable_is_perfect_and_shuffled_is_chance():
    g = torch.Generator().manual_seed(0)
    centres = torch.eye(4, 32) * 10
    labels = torch.arange(4).repeat_interleave(50)
    feats = centres[labels] + torch.randn(200, 32, generator=g)
    assert knn_top1(feats[::2], labels[::2], feats[1::2], labels[1::2], k=10, t=0.1, num_classes=4) == 100.0
    accs = []
    for _ in range(20):
        shuffled = labels[torch.randperm(200, generator=g)]
        accs.append(knn_top1(feats[::2], shuffled[::2], feats[1::2], labels[1::2], 10, 0.1, 4))
    assert 18 <= sum(accs) / len(accs) <= 32   # chance is 25%


def test_linear_probe_learns_separable_features_and_not_noise():
    g = torch.Generator().manual_seed(0)
    labels = torch.arange(4).repeat_interleave(40)
    feats = torch.eye(4, 16)[labels] * 5 + torch.randn(160, 16, generator=g)
    noise = torch.randn(160, 16, generator=g)
    probe = linear_probe(feats[::2], labels[::2], {"val": (feats[1::2], labels[1::2]),
                                                    "noise": (noise[1::2], labels[1::2])}, 4, epochs=30)
    assert probe["top1"]["val"] >= 95.0 and probe["top1"]["noise"] < 60   # chance is 25%


def test_linear_probe_follows_moco_lincls_and_picks_the_lr_on_val():
    from raypipe.metrics import train_linear
    g = torch.Generator().manual_seed(1)
    labels = torch.arange(5).repeat_interleave(60)
    centres = torch.randn(5, 32, generator=g)
    feats = (centres[labels] + 1.5 * torch.randn(300, 32, generator=g)).relu()  # raw, un-standardised
    # MoCo's init: fc ~ N(0, 0.01), zero bias (0 epochs: the classifier as initialised)
    clf = train_linear(feats, labels, 5, lr=1.0, epochs=0)
    assert torch.all(clf.bias == 0) and 0.005 < clf.weight.std().item() < 0.015
    # raw features, not standardised: scaling them changes what the classifier learns
    a = train_linear(feats, labels, 5, lr=0.1, epochs=5, milestones=(3, 4))
    b = train_linear(feats * 10, labels, 5, lr=0.1, epochs=5, milestones=(3, 4))
    assert not torch.allclose(a.weight, b.weight, atol=1e-3)
    val, test = (feats[::3], labels[::3]), (feats[1::3], labels[1::3])
    probe = linear_probe(feats[2::3], labels[2::3], {"val": val, "test": test}, 5, epochs=20, lrs=(1e-4, 0.1, 1.0),
                         max_extra_lrs=0)
    assert probe["select_on"] == "val" and set(probe["lr_scores"]) == {1e-4, 0.1, 1.0}
    assert probe["lr_scores"][probe["lr"]] == max(probe["lr_scores"].values()) == probe["top1"]["val"]
    assert probe["lr"] != 1e-4 and probe["lr_scores"][1e-4] < probe["top1"]["val"]   # a tiny lr barely moves


def test_probe_lr_grid_extends_past_the_edge_the_best_lr_sits_on():
    from raypipe.metrics import extend_lr_grid
    peak = lambda best: (lambda lr: -abs(math.log10(lr) - math.log10(best)))   # val top-1 peaks at `best`
    grid = (0.1, 1.0, 10.0, 30.0)
    assert set(extend_lr_grid(peak(1.0), grid)) == set(grid)                     # interior best: grid as given
    assert set(extend_lr_grid(peak(0.005), grid)) == {*grid, 0.01, 0.001}        # low edge: down, twice
    assert set(extend_lr_grid(peak(0.01), grid)) == {*grid, 0.01, 0.001}         # 0.01 wins, 0.001 makes it interior
    assert set(extend_lr_grid(peak(50.0), grid)) == {*grid, 300.0}               # high edge: up, then interior
    assert set(extend_lr_grid(peak(1e-6), grid, max_extra=1)) == {*grid, 0.01}   # bounded
    assert set(extend_lr_grid(peak(1e-6), (0.1,))) == {0.1}                      # one lr: the user's choice
