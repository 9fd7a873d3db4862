"""Phase 1: the MoCo v2 teacher with the margin loss, on Ray Train's TorchTrainer."""
from __future__ import annotations

from pathlib import Path

import torch

from . import dist, engine, storage
from .config import Config, ConfigError
from .data import normalize, scan_dataset
from .evaluate import backbone_features, gather_outputs, knn_top1
from .losses import contrastive_logits, margin_nce_loss
from .models import MoCo, arch_of

EPOCH_KEYS = ("loss", "knn_top1", "pos_sim", "neg_sim", "lr", "images_per_s")


def build_model(cfg: Config, world_size: int = 1) -> MoCo:
    """Split BN (``teacher.bn_splits``) on one worker; per-worker BN + cross-worker shuffle on several."""
    t = cfg.teacher
    return MoCo(arch_of(t), t.proj_hidden, t.proj_dim, t.queue_size, t.key_momentum,
                bn_splits=t.bn_splits if world_size == 1 else 1)


def contrastive_step(net, model: MoCo, im_q: torch.Tensor, im_k: torch.Tensor, margin: float,
                     temperature: float, rt: engine.Runtime):
    """One MoCo step: the margin loss against the queue as it was BEFORE this batch, then the
    batch's keys (gathered from all workers) are enqueued. Returns the loss, l_pos and l_neg."""
    with rt.autocast():
        q, k = net(im_q, im_k)
    l_pos, l_neg = contrastive_logits(q.float(), k.float(), model.queue.clone().detach())
    loss = margin_nce_loss(l_pos, l_neg, margin, temperature)
    model.enqueue(dist.all_gather_cat(k.float()))
    return loss, l_pos.detach(), l_neg.detach()


def knn_monitor(model: MoCo, rt: engine.Runtime, cfg: Config, num_classes: int) -> float:
    """k-NN top-1 on val with the query backbone's features; bank = train (centre crops)."""
    import ray.train

    model.eval()
    fn = backbone_features(model.backbone, rt.channels_last)
    mask = lambda idx: engine.eval_rows_mask(idx, rt)  # noqa: E731
    bs = cfg.teacher.batch_size
    bank = gather_outputs(fn, ray.train.get_dataset_shard("bank").iter_torch_batches(batch_size=bs), rt.device, mask)
    val = gather_outputs(fn, ray.train.get_dataset_shard("val").iter_torch_batches(batch_size=bs), rt.device, mask)
    return knn_top1(bank["out"], bank["label"], val["out"], val["label"], cfg.teacher.knn_k, cfg.teacher.knn_t,
                    num_classes)


def train_loop(loop_config: dict) -> None:
    """Runs on every Train worker."""
    cfg, meta = Config.from_dict(loop_config["cfg"]), loop_config["meta"]
    t = cfg.teacher
    rt = engine.make_runtime(cfg.resources, t.seed)
    model = build_model(cfg, rt.world_size)
    loop = engine.Loop(model, t, cfg, rt, meta["n_train"], loop_config.get("local_checkpoint_dir"),
                       print_epochs=meta.get("print_epochs", True), outputs=meta.get("outputs"))
    for epoch in loop.epochs():
        model.train()
        speed = engine.Throughput()
        means = engine.EpochMeans(("loss", "pos_sim", "neg_sim"), rt.device)
        for batch in loop.batches(epoch):
            im_q = normalize(batch["view1"].to(rt.device), rt.channels_last)
            im_k = normalize(batch["view2"].to(rt.device), rt.channels_last)
            loss, l_pos, l_neg = contrastive_step(loop.net, model, im_q, im_k, t.margin, t.temperature, rt)
            loop.step(loss)
            means.add(loss, l_pos.mean(), l_neg.mean())
            speed.add(im_q.shape[0])
        dist.average_bn_statistics(model)  # one set of BN statistics for k-NN and the checkpoint
        metrics = {**means.result(), "images_per_s": speed.rate(rt.world_size)}
        if (epoch + 1) % t.knn_every == 0 or epoch + 1 == t.epochs:
            metrics["knn_top1"] = knn_monitor(model, rt, cfg, meta["num_classes"])
        loop.end_epoch("pretrain", epoch, metrics, EPOCH_KEYS)


def export_teacher(cfg: Config, state: dict, path: Path, classes: list[str]) -> Path:
    """A Train checkpoint's state -> the plain teacher file phase 2 and the evaluators load."""
    model = build_model(cfg)
    model.load_state_dict(state["model"])
    t = cfg.teacher
    return engine.save_model_file(
        Path(path), "teacher", model.backbone.state_dict(), cfg,
        {**arch_of(t), "classes": classes,
         "resolution": cfg.data.resolution, "head": model.encoder_q[1].state_dict(),
         "epochs_trained": state["epoch"] + 1})


def pretrain(cfg: Config, run_dir: Path | None = None, callbacks: list | None = None,
             storage_path: str | None = None, print_epochs: bool = True, outputs: str | None = None,
             publish_model: bool = True) -> dict:
    """Phase 1 end to end: check data, decode it with Ray Data, train, export ``teacher.pt``.
    ``outputs``: where the run's files are published (local folder or URI; default: run_dir, or
    output_dir/name when output_dir is a URI); ``publish_model=False`` keeps the model file local."""
    from .data import decode_split, with_view

    index = scan_dataset(cfg.data, ("train", "val"))  # layout errors before any Ray resource
    t = cfg.teacher
    n_images, global_batch = len(index["train"]), cfg.global_batch("teacher")
    if t.queue_size > n_images:
        fit = n_images // global_batch * global_batch
        hint = f"use at most {fit}" if fit else f"the global batch {global_batch} alone exceeds the data"
        raise ConfigError(f"teacher.queue_size={t.queue_size} exceeds the {n_images} training images "
                          f"(the queue would hold stale duplicate keys); {hint}")
    run = engine.prepare_run(cfg, run_dir, outputs)
    engine.preflight(cfg)  # cluster can host the workers: checked before data is read
    decoded = {s: decode_split(index[s], cfg.data) for s in ("train", "val")}
    skipped = engine.write_data_report(run, decoded)
    n_train = decoded["train"].count
    if n_train < global_batch:
        raise ConfigError(f"only {n_train} decodable training images: fewer than one global batch "
                          f"(teacher.batch_size x resources.num_workers)")
    datasets = {"train": with_view(decoded["train"], "moco", cfg.data, shuffle=True,
                                   min_scale=cfg.teacher.crop_min_scale, blur_prob=cfg.teacher.blur_prob),
                "bank": with_view(decoded["train"], "eval", cfg.data),
                "val": with_view(decoded["val"], "eval", cfg.data)}
    meta = {"n_train": n_train, "num_classes": len(index["train"].classes), "print_epochs": print_epochs,
            "outputs": run.location}
    result = engine.run_trainer(train_loop, cfg, {"cfg": cfg.to_dict(), "meta": meta}, datasets, run,
                                callbacks=callbacks, storage_path=storage_path)
    state = engine.final_state(result)
    export_teacher(cfg, state, run.local("teacher.pt"), index["train"].classes)
    history = state["history"]
    final = {"phase": "pretrain", "epochs": len(history), **history[-1],
             "best_knn_top1": max((h.get("knn_top1", 0.0) for h in history), default=0.0),
             "teacher": run.publish("teacher.pt") if publish_model else str(run.local("teacher.pt")),
             "skipped_images": skipped, "n_train": n_train, "checkpoint": storage.location_of(result.checkpoint.filesystem, result.checkpoint.path)}
    engine.write_run_outputs(run, final)
    return final
