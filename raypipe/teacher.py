"""Phase 1: the teacher, trained by the method ``teacher.method`` selects (raypipe.methods;
default MoCo v2 with the margin loss) on Ray Train's TorchTrainer, with a k-NN monitor on val."""
from __future__ import annotations

from functools import partial
from pathlib import Path

from . import dist, plugins
from .checkpoints import save_model_file
from .config import Config, ConfigError
from .augment import BatchViews, moco_views
from .data import scan_dataset
from .evaluate import backbone_features, gather_outputs, knn_top1
from .loop import EpochMeans, Loop, Throughput, eval_rows_mask, make_runtime
from .methods import METHODS, SSLMethod
from .models import arch_of


def build_method(cfg: Config, world_size: int = 1) -> SSLMethod:
    return METHODS.get_class(cfg.teacher.method)(cfg, world_size)


def knn_monitor(method: SSLMethod, rt, cfg: Config, num_classes: int) -> float:
    """k-NN top-1 on val with the method's backbone features; bank = train (centre crops)."""
    import ray.train

    method.model.eval()
    fn = backbone_features(method.backbone, rt.channels_last)
    mask = lambda idx: eval_rows_mask(idx, rt)  # noqa: E731
    bs = cfg.teacher.batch_size
    bank = gather_outputs(fn, ray.train.get_dataset_shard("bank").iter_torch_batches(batch_size=bs), rt.device, mask)
    val = gather_outputs(fn, ray.train.get_dataset_shard("val").iter_torch_batches(batch_size=bs), rt.device, mask)
    return knn_top1(bank["out"], bank["label"], val["out"], val["label"], cfg.teacher.knn_k, cfg.teacher.knn_t,
                    num_classes)


def train_loop(loop_config: dict) -> None:
    """Runs on every Train worker."""
    plugins.install(loop_config.get("plugins"))
    cfg, meta = Config.from_dict(loop_config["cfg"]), loop_config["meta"]
    t = cfg.teacher
    rt = make_runtime(cfg.resources, t.seed)
    method = build_method(cfg, rt.world_size)
    loop = Loop(method.model, t, cfg, rt, loop_config)
    names = ("loss", *method.metric_names)
    on_device = moco_views(cfg.data.resolution, t.crop_min_scale, t.blur_prob) if meta.get("device_views") else None
    views = BatchViews(("view1", "view2"), rt.device, rt.channels_last, on_device)
    for epoch in loop.epochs():
        method.model.train()
        speed, means = Throughput(), EpochMeans(names, rt.device)
        for batch in loop.batches(epoch):
            view1, view2 = views(batch)
            loss, metrics = method.training_step(loop.net, view1, view2, rt)
            loop.step(loss)
            means.add(loss, *(metrics[k] for k in method.metric_names))
            speed.add(view1.shape[0])
        dist.average_bn_statistics(method.model)  # one set of BN statistics for k-NN and the checkpoint
        metrics = {**means.result(), "images_per_s": speed.rate(rt.world_size)}
        if (epoch + 1) % t.knn_every == 0 or epoch + 1 == t.epochs:
            metrics["knn_top1"] = knn_monitor(method, rt, cfg, meta["num_classes"])
        loop.end_epoch("pretrain", epoch, metrics, ("loss", "knn_top1", *method.metric_names, "lr", "images_per_s"))


def export_teacher(cfg: Config, state: dict, path: Path, classes: list[str]) -> Path:
    """A Train checkpoint's state -> the plain teacher file phase 2 and the evaluators load."""
    method = build_method(cfg)
    method.model.load_state_dict(state["model"])
    return save_model_file(
        Path(path), "teacher", method.backbone.state_dict(), cfg,
        {**arch_of(cfg.teacher), "classes": classes, "resolution": cfg.data.resolution,
         "method": cfg.teacher.method, **method.export_extras(),
         "epochs_trained": state["epoch"] + 1, "best_epoch": state.get("best_epoch")})


def pretrain(cfg: Config, run_dir: Path | None = None, callbacks: list | None = None,
             storage_path: str | None = None, print_epochs: bool = True, outputs: str | None = None,
             publish_model: bool = True) -> dict:
    """Phase 1 end to end: check data, decode it with Ray Data, train, export ``teacher.pt``
    (``raypipe.phase.run_phase`` documents the arguments)."""
    from .data import with_view

    index = scan_dataset(cfg.data, ("train", "val"))  # layout errors before any Ray resource
    t = cfg.teacher
    n_images, global_batch = len(index["train"]), cfg.global_batch("teacher")
    fit = cfg.max_queue_size(n_images)
    if t.queue_size > fit:
        hint = f"use at most {fit}" if fit else f"the global batch {global_batch} alone exceeds the data"
        raise ConfigError(f"teacher.queue_size={t.queue_size} exceeds the {n_images} training images "
                          f"(the queue would hold stale duplicate keys); {hint}")

    def check_decoded(decoded: dict) -> None:
        if decoded["train"].count < global_batch:
            raise ConfigError(f"only {decoded['train'].count} decodable training images: fewer than one global "
                              f"batch (teacher.batch_size x resources.num_workers)")

    def views(decoded: dict, device_views: bool) -> dict:
        train = (with_view(decoded["train"], "decoded", cfg.data, shuffle=True) if device_views else
                 with_view(decoded["train"], "moco", cfg.data, shuffle=True, min_scale=t.crop_min_scale,
                           blur_prob=t.blur_prob))
        return {"train": train, "bank": with_view(decoded["train"], "eval", cfg.data),
                "val": with_view(decoded["val"], "eval", cfg.data)}

    from .phase import Phase, run_phase
    phase = Phase("pretrain", train_loop, views, partial(export_teacher, cfg, classes=index["train"].classes),
                  model_file="teacher.pt", model_key="teacher", best_metric="knn_top1", check_decoded=check_decoded,
                  augment="teacher")
    return run_phase(cfg, phase, index, run_dir, callbacks, storage_path, print_epochs, outputs, publish_model)
