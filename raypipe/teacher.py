"""Phase 1: the teacher, trained by the method ``teacher.method`` selects (raypipe.methods;
default MoCo v2 with the margin loss), with a k-NN monitor on val. ``run`` is the worker loop
(no Ray: it runs over any ``loop.Session``); ``TeacherPhase`` is what the phase runner
(``raypipe.phase``) needs to launch it on Ray Train."""
from __future__ import annotations

from pathlib import Path

from . import dist
from .checkpoints import save_model_file
from .errors import ConfigError
from .loop import EpochMeans, Loop, Throughput, eval_rows_mask, make_runtime
from .metrics import backbone_features, gather_outputs, knn_top1
from .models import arch_of
from .registry import METHODS
from .transforms import BatchViews


def method_class(cfg) -> type:
    return METHODS.get_class(cfg.teacher.method)


def build_method(cfg, world_size: int = 1):
    return method_class(cfg)(cfg, world_size)


def knn_monitor(method, rt, cfg, session, num_classes: int) -> float:
    """k-NN top-1 on val with the method's backbone features; bank = train (centre crops)."""
    method.model.eval()
    fn = backbone_features(method.backbone, rt.channels_last)
    mask = lambda idx: eval_rows_mask(idx, rt)  # noqa: E731
    bs = cfg.teacher.batch_size
    bank = gather_outputs(fn, session.batches("bank", bs), rt.device, mask)
    val = gather_outputs(fn, session.batches("val", bs), rt.device, mask)
    return knn_top1(bank["out"], bank["label"], val["out"], val["label"], cfg.teacher.knn_k, cfg.teacher.knn_t,
                    num_classes)


def run(cfg, meta: dict, session) -> None:
    """Phase 1 on one worker: ``session`` gives the ``train`` batches (the method's views, or the
    decoded images when ``meta["device_views"]``), ``bank`` and ``val`` (centre crops)."""
    t = cfg.teacher
    rt = make_runtime(cfg.resources, t.seed, session)
    method = build_method(cfg, rt.world_size)
    loop = Loop(method.model, t, cfg, rt, session, meta)
    names = ("loss", *method.metric_names)
    views = BatchViews(method.views(cfg), rt.device, rt.channels_last, meta.get("device_views", False))
    for epoch in loop.epochs():
        method.model.train()
        speed, means = Throughput(), EpochMeans(names, rt.device)
        for batch in loop.batches(epoch):
            images = views(batch)
            loss, metrics = method.training_step(loop.net, images, rt)
            loop.step(loss)
            means.add(loss, *(metrics[k] for k in method.metric_names))
            speed.add(images[0].shape[0])
        dist.average_bn_statistics(method.model)  # one set of BN statistics for k-NN and the checkpoint
        metrics = {**means.result(), "images_per_s": speed.rate(rt.world_size)}
        if (epoch + 1) % t.knn_every == 0 or epoch + 1 == t.epochs:
            metrics["knn_top1"] = knn_monitor(method, rt, cfg, session, meta["num_classes"])
        loop.end_epoch("pretrain", epoch, metrics, ("loss", "knn_top1", *method.metric_names, "lr", "images_per_s"))


def export_teacher(cfg, state: dict, path: Path, classes: list[str]) -> Path:
    """A checkpoint's state -> the plain teacher file phase 2 and the evaluators load."""
    method = build_method(cfg)
    method.model.load_state_dict(state["model"])
    return save_model_file(
        Path(path), "teacher", method.backbone.state_dict(), cfg,
        {**arch_of(cfg.teacher), "classes": classes, "resolution": cfg.data.resolution,
         "method": cfg.teacher.method, **method.export_extras(),
         "epochs_trained": state["epoch"] + 1, "best_epoch": state.get("best_epoch")})


class TeacherPhase:
    """What phase 1 adds to the phase runner's launch sequence."""

    name, model_file, model_key, best_metric = "pretrain", "teacher.pt", "teacher", "knn_top1"
    final_file = None   # only the best epoch's weights are exported
    run = staticmethod(run)
    eval_splits = {"bank": "train", "val": "val"}   # centre-crop splits the workers read whole: name -> split

    def __init__(self, cfg, index: dict):
        self.cfg, self.classes = cfg, index["train"].classes
        method_class(cfg).check_data(cfg, len(index["train"]))   # e.g. MoCo's queue fits the data
        self.recipes = method_class(cfg).views(cfg)

    def check_decoded(self, decoded: dict) -> None:
        if decoded["train"].count < self.cfg.global_batch("teacher"):
            raise ConfigError(f"only {decoded['train'].count} decodable training images: fewer than one global "
                              f"batch (teacher.batch_size x resources.num_workers)")

    def meta(self) -> dict:
        return {}

    def export(self, state: dict, path: Path) -> Path:
        return export_teacher(self.cfg, state, path, self.classes)
