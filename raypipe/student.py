"""Phase 2: the student, trained by the distiller ``student.mode`` selects (raypipe.distillers):
``distill`` (OFD self-distillation from the frozen phase-1 teacher + CE, the paper's phase 2),
``finetune`` (from the teacher, CE only) and ``supervised`` (from scratch: the baseline)."""
from __future__ import annotations

from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F

from . import dist, plugins
from .checkpoints import CheckpointError, load_model_file, save_model_file
from .config import Config, ConfigError
from .augment import BatchViews, supervised_view
from .data import normalize, scan_dataset
from .distillers import DISTILLERS, Distiller
from .loop import EpochMeans, Loop, Throughput, eval_rows_mask, make_runtime
from .models import arch_of, build_backbone, payload_arch

EPOCH_KEYS = ("val_top1", "val_top5", "lr", "images_per_s")  # printed after the loss and its parts


def distiller_class(cfg: Config) -> type[Distiller]:
    return DISTILLERS.get_class(cfg.student.mode)


def check_teacher(cfg: Config, teacher_path: str | Path | None) -> dict | None:
    """Load the teacher file and check it fits the student config (before any Ray resource)."""
    s = cfg.student
    if not distiller_class(cfg).uses_teacher:
        return None
    if not teacher_path:
        raise ConfigError(f"student.mode={s.mode!r} needs a teacher file (--teacher TEACHER.pt)")
    payload = load_model_file(teacher_path, kind="teacher")
    if payload_arch(payload) != arch_of(s):
        have = ", ".join(f"{k}={v}" for k, v in payload_arch(payload).items())
        want = ", ".join(f"student.{k}={v}" for k, v in arch_of(s).items())
        raise ConfigError(f"teacher {teacher_path} is {have}; the student config asks for {want}: they must match")
    return payload


def build_distiller(cfg: Config, num_classes: int, teacher_state: dict | None) -> Distiller:
    return distiller_class(cfg)(cfg, num_classes, teacher_state)


def mixed_batch(x: torch.Tensor, y: torch.Tensor, cfg: Config):
    """Mixup (``student.mixup_alpha``; 0 = off) of a batch and its label-smoothed CE: -> (the
    images to train on, ``ce(logits)`` against the correspondingly mixed targets)."""
    s = cfg.student

    def ce(logits, target):
        return F.cross_entropy(logits, target, label_smoothing=s.label_smoothing)

    if s.mixup_alpha <= 0:
        return x, lambda logits: ce(logits, y)
    mix = float(torch.distributions.Beta(s.mixup_alpha, s.mixup_alpha).sample())
    perm = torch.randperm(y.shape[0], device=y.device)
    return mix * x + (1 - mix) * x[perm], lambda logits: mix * ce(logits, y) + (1 - mix) * ce(logits, y[perm])


@torch.no_grad()
def validate_top(distiller: Distiller, rt, batches) -> tuple[float, float, int]:
    """Top-1/top-5 over the whole split, each row counted on exactly one worker."""
    distiller.student.eval()
    counts = torch.zeros(3, dtype=torch.float64)
    for batch in batches:
        keep = eval_rows_mask(batch["idx"].cpu(), rt)
        if not keep.any():
            continue
        x = normalize(batch["image"][keep.to(batch["image"].device)].to(rt.device), rt.channels_last)
        y = batch["label"].cpu()[keep]
        with rt.autocast():
            logits = distiller.predict(x).float().cpu()
        top5 = logits.topk(min(5, logits.shape[1]), dim=1).indices
        counts += torch.tensor([(top5[:, 0] == y).sum().item(), (top5 == y[:, None]).any(1).sum().item(), len(y)],
                               dtype=torch.float64)
    dist.all_reduce_sum(counts)
    n = max(1.0, counts[2].item())
    return 100 * counts[0].item() / n, 100 * counts[1].item() / n, int(counts[2].item())


def train_loop(loop_config: dict) -> None:
    """Runs on every Train worker."""
    import ray
    import ray.train

    plugins.install(loop_config.get("plugins"))
    cfg, meta = Config.from_dict(loop_config["cfg"]), loop_config["meta"]
    s = cfg.student
    rt = make_runtime(cfg.resources, s.seed)
    teacher_state = ray.get(meta["teacher_ref"]) if meta.get("teacher_ref") is not None else None
    distiller = build_distiller(cfg, meta["num_classes"], teacher_state)
    if distiller.teacher is not None:  # frozen: moved to the device, never wrapped in DDP
        distiller.teacher.to(rt.device)
        if rt.channels_last:
            distiller.teacher.to(memory_format=torch.channels_last)
    loop = Loop(distiller.student, s, cfg, rt, loop_config)
    names = ("loss", *distiller.metric_names)
    views = BatchViews(("image",), rt.device, rt.channels_last,
                       supervised_view(cfg.data.resolution, s.crop_min_scale) if meta.get("device_views") else None)
    for epoch in loop.epochs():
        distiller.train()
        frozen = distiller.frozen_parameters(epoch)
        speed, means = Throughput(), EpochMeans(names, rt.device)
        for batch in loop.batches(epoch):
            (x,) = views(batch)
            x, ce = mixed_batch(x, batch["label"].to(rt.device), cfg)
            loss, metrics = distiller.training_step(loop.net, x, ce, epoch, rt)
            loop.step(loss, frozen)
            means.add(loss, *(metrics[k] for k in distiller.metric_names))
            speed.add(x.shape[0])
        dist.average_bn_statistics(distiller.student)  # one set of BN statistics for validation and the checkpoint
        top1, top5, n_val = validate_top(distiller, rt, ray.train.get_dataset_shard("val").iter_torch_batches(
            batch_size=s.batch_size))
        metrics = {**means.result(), "distill_weight": distiller.weight_at(epoch), "val_top1": top1,
                   "val_top5": top5, "n_val": n_val, "images_per_s": speed.rate(rt.world_size)}
        loop.end_epoch(s.mode, epoch, metrics, ("loss", *distiller.metric_names, *EPOCH_KEYS))


def export_student(cfg: Config, state: dict, path: Path, classes: list[str], teacher_path=None) -> Path:
    """A Train checkpoint's state -> a plain classifier file (torchvision model weights): the
    student module's ``net`` (every distiller's student keeps its classifier there)."""
    s = cfg.student
    net, _ = build_backbone(**arch_of(s), num_classes=len(classes))
    net.load_state_dict({k.removeprefix("net."): v for k, v in state["model"].items() if k.startswith("net.")})
    return save_model_file(
        Path(path), "classifier", net.state_dict(), cfg,
        {**arch_of(s), "classes": classes, "mode": s.mode,
         "resolution": cfg.data.resolution, "teacher": str(teacher_path) if teacher_path else None,
         "epochs_trained": state["epoch"] + 1, "best_epoch": state.get("best_epoch")})


def train_student(cfg: Config, teacher_path: str | Path | None = None, run_dir: Path | None = None,
                  callbacks: list | None = None, storage_path: str | None = None, print_epochs: bool = True,
                  outputs: str | None = None, publish_model: bool = True) -> dict:
    """Phase 2 end to end: check teacher and data, train, export ``student.pt``
    (``raypipe.phase.run_phase`` documents the arguments)."""
    import ray

    from .data import with_view
    from .phase import Phase, run_phase

    payload = check_teacher(cfg, teacher_path)
    index = scan_dataset(cfg.data, ("train", "val"))
    if payload is not None and payload.get("classes") and payload["classes"] != index["train"].classes:
        print(f"note: teacher was pre-trained on classes {payload['classes'][:5]}...; "
              f"student classes come from {cfg.data.root}", flush=True)
    s = cfg.student

    def views(decoded: dict, device_views: bool) -> dict:
        train = (with_view(decoded["train"], "decoded", cfg.data, shuffle=True) if device_views else
                 with_view(decoded["train"], "supervised", cfg.data, shuffle=True, autoaugment=s.autoaugment,
                           min_scale=s.crop_min_scale))
        return {"train": train, "val": with_view(decoded["val"], "eval", cfg.data)}

    classes = index["train"].classes
    export = partial(export_student, cfg, classes=classes, teacher_path=teacher_path)
    def teacher_ref() -> dict:  # the weights go to the workers once, through the object store
        return {"teacher_ref": ray.put(payload["state_dict"]) if payload is not None else None}

    phase = Phase(s.mode, train_loop, views, export, model_file="student.pt", model_key="model",
                  best_metric="val_top1", meta=teacher_ref)
    return run_phase(cfg, phase, index, run_dir, callbacks, storage_path, print_epochs, outputs, publish_model)


def load_exported(path: str | Path, kind: str | None = "classifier"):
    """An exported model file -> (eval-mode torchvision model, payload).

    ``kind="classifier"``: a student/baseline with its ``fc``; ``"teacher"``: the phase-1 backbone;
    ``None``: whichever the file holds.
    """
    payload = load_model_file(path, kind=kind)
    num_classes = len(payload["classes"]) if payload["kind"] == "classifier" else 0
    net, _ = build_backbone(**payload_arch(payload), num_classes=num_classes)
    try:
        net.load_state_dict(payload["state_dict"])
    except RuntimeError as exc:
        raise CheckpointError(f"{path}: weights do not fit {payload['backbone']}: {exc}") from exc
    return net.eval(), payload


def load_classifier(path: str | Path):
    return load_exported(path, "classifier")
