"""Phase 2: the student. One trainer, three modes:
``distill`` (OFD self-distillation from the frozen phase-1 teacher + CE, the paper's phase 2),
``finetune`` (from the teacher, CE only) and ``supervised`` (from scratch: the baseline)."""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

from . import dist, engine, storage
from .config import Config, ConfigError
from .data import normalize, scan_dataset
from .losses import ofd_distill_loss
from .models import FrozenTeacher, Student, arch_of, build_backbone, payload_arch

EPOCH_KEYS = ("loss", "ce", "distill", "val_top1", "val_top5", "lr", "images_per_s")


def check_teacher(cfg: Config, teacher_path: str | Path | None) -> dict | None:
    """Load the teacher file and check it fits the student config (before any Ray resource)."""
    s = cfg.student
    if s.mode == "supervised":
        return None
    if not teacher_path:
        raise ConfigError(f"student.mode={s.mode!r} needs a teacher file (--teacher TEACHER.pt)")
    payload = engine.load_model_file(teacher_path, kind="teacher")
    if payload_arch(payload) != arch_of(s):
        have = ", ".join(f"{k}={v}" for k, v in payload_arch(payload).items())
        want = ", ".join(f"student.{k}={v}" for k, v in arch_of(s).items())
        raise ConfigError(f"teacher {teacher_path} is {have}; the student config asks for {want}: they must match")
    return payload


def distill_weight_at(cfg: Config, epoch: int) -> float:
    """lambda, or 0 during the CE-only warm-up (and outside distill mode)."""
    s = cfg.student
    return s.distill_weight if s.mode == "distill" and epoch >= s.ce_only_epochs else 0.0


def build_student(cfg: Config, num_classes: int, teacher_state: dict | None):
    s = cfg.student
    net, _ = build_backbone(**arch_of(s), num_classes=num_classes)
    teacher = None
    if teacher_state is not None:
        missing, unexpected = net.load_state_dict(teacher_state, strict=False)
        if unexpected or set(missing) - {"fc.weight", "fc.bias"}:
            raise engine.CheckpointError(f"teacher weights do not fit {s.backbone}: missing {missing}, "
                                         f"unexpected {unexpected}")
        if s.mode == "distill":
            frozen, _ = build_backbone(**arch_of(s))
            frozen.load_state_dict(teacher_state)
            teacher = FrozenTeacher(frozen, s.teacher_bn_train)
    return Student(net, with_connectors=s.mode == "distill"), teacher


@torch.no_grad()
def validate_top(student: Student, rt: engine.Runtime, batches) -> tuple[float, float, int]:
    """Top-1/top-5 over the whole split, each row counted on exactly one worker."""
    student.eval()
    counts = torch.zeros(3, dtype=torch.float64)
    for batch in batches:
        keep = engine.eval_rows_mask(batch["idx"].cpu(), rt)
        if not keep.any():
            continue
        x = normalize(batch["image"][keep.to(batch["image"].device)].to(rt.device), rt.channels_last)
        y = batch["label"].cpu()[keep]
        with rt.autocast():
            logits = student.net(x).float().cpu()
        student.taps.pop()
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

    cfg, meta = Config.from_dict(loop_config["cfg"]), loop_config["meta"]
    s = cfg.student
    rt = engine.make_runtime(cfg.resources, s.seed)
    teacher_state = ray.get(meta["teacher_ref"]) if meta.get("teacher_ref") is not None else None
    student, teacher = build_student(cfg, meta["num_classes"], teacher_state)
    if teacher is not None:  # frozen: moved to the device, never wrapped in DDP
        teacher.to(rt.device)
        if rt.channels_last:
            teacher.to(memory_format=torch.channels_last)
    loop = engine.Loop(student, s, cfg, rt, meta["n_train"], loop_config.get("local_checkpoint_dir"),
                       print_epochs=meta.get("print_epochs", True), outputs=meta.get("outputs"))
    for epoch in loop.epochs():
        student.train()
        if teacher is not None:
            teacher.train()
        weight = distill_weight_at(cfg, epoch)
        # CE-only warm-up: connectors stay as built (the reference leaves them out of the graph)
        frozen = list(student.connectors.parameters()) if student.connectors is not None and weight == 0 else []
        speed = engine.Throughput()
        means = engine.EpochMeans(("loss", "ce", "distill"), rt.device)
        for batch in loop.batches(epoch):
            x = normalize(batch["image"].to(rt.device), rt.channels_last)
            y = batch["label"].to(rt.device)
            mix, y2 = 1.0, y
            if s.mixup_alpha > 0:
                mix = float(torch.distributions.Beta(s.mixup_alpha, s.mixup_alpha).sample())
                perm = torch.randperm(x.shape[0], device=x.device)
                x, y2 = mix * x + (1 - mix) * x[perm], y[perm]
            with rt.autocast():
                logits, feats = loop.net(x)
                ce = mix * F.cross_entropy(logits.float(), y, label_smoothing=s.label_smoothing)
                if mix < 1.0:
                    ce = ce + (1 - mix) * F.cross_entropy(logits.float(), y2, label_smoothing=s.label_smoothing)
                if weight > 0:
                    distill = ofd_distill_loss(feats, teacher(x), teacher.margins)
                else:  # keeps connectors in the graph (DDP) at zero cost to the gradient
                    distill = sum((f.float().sum() for f in feats), torch.zeros((), device=x.device)) * 0.0
            loss = ce + weight * distill
            loop.step(loss, frozen)
            means.add(loss, ce, distill)
            speed.add(x.shape[0])
        dist.average_bn_statistics(student)  # one set of BN statistics for validation and the checkpoint
        top1, top5, n_val = validate_top(student, rt, ray.train.get_dataset_shard("val").iter_torch_batches(
            batch_size=s.batch_size))
        metrics = {**means.result(), "distill_weight": weight, "val_top1": top1,
                   "val_top5": top5, "n_val": n_val, "images_per_s": speed.rate(rt.world_size)}
        loop.end_epoch(s.mode, epoch, metrics, EPOCH_KEYS)


def export_student(cfg: Config, state: dict, path: Path, classes: list[str], teacher_path=None) -> Path:
    """A Train checkpoint's state -> a plain classifier file (torchvision model weights)."""
    s = cfg.student
    student, _ = build_student(cfg, len(classes), None)
    student.load_state_dict(state["model"])
    return engine.save_model_file(
        Path(path), "classifier", student.net.state_dict(), cfg,
        {**arch_of(s), "classes": classes, "mode": s.mode,
         "resolution": cfg.data.resolution, "teacher": str(teacher_path) if teacher_path else None,
         "epochs_trained": state["epoch"] + 1})


def train_student(cfg: Config, teacher_path: str | Path | None = None, run_dir: Path | None = None,
                  callbacks: list | None = None, storage_path: str | None = None, print_epochs: bool = True,
                  outputs: str | None = None, publish_model: bool = True) -> dict:
    """Phase 2 end to end: check teacher and data, train, export ``student.pt``.
    ``outputs``: where the run's files are published (local folder or URI; default: run_dir, or
    output_dir/name when output_dir is a URI); ``publish_model=False`` keeps the model file local."""
    import ray

    from .data import decode_split, with_view

    payload = check_teacher(cfg, teacher_path)
    index = scan_dataset(cfg.data, ("train", "val"))
    if payload is not None and payload.get("classes") and payload["classes"] != index["train"].classes:
        print(f"note: teacher was pre-trained on classes {payload['classes'][:5]}...; "
              f"student classes come from {cfg.data.root}", flush=True)
    run = engine.prepare_run(cfg, run_dir, outputs)
    engine.preflight(cfg)  # cluster can host the workers: checked before data is read
    decoded = {s: decode_split(index[s], cfg.data) for s in ("train", "val")}
    skipped = engine.write_data_report(run, decoded)
    s = cfg.student
    datasets = {"train": with_view(decoded["train"], "supervised", cfg.data, shuffle=True,
                                   autoaugment=s.autoaugment, min_scale=s.crop_min_scale),
                "val": with_view(decoded["val"], "eval", cfg.data)}
    classes = index["train"].classes
    meta = {"n_train": decoded["train"].count, "num_classes": len(classes), "print_epochs": print_epochs,
            "outputs": run.location,
            "teacher_ref": ray.put(payload["state_dict"]) if payload is not None else None}
    result = engine.run_trainer(train_loop, cfg, {"cfg": cfg.to_dict(), "meta": meta}, datasets, run,
                                callbacks=callbacks, storage_path=storage_path)
    state = engine.final_state(result)
    export_student(cfg, state, run.local("student.pt"), classes, teacher_path)
    history = state["history"]
    final = {"phase": s.mode, "epochs": len(history), **history[-1],
             "best_val_top1": max(h["val_top1"] for h in history),
             "model": run.publish("student.pt") if publish_model else str(run.local("student.pt")),
             "skipped_images": skipped, "n_train": decoded["train"].count, "checkpoint": storage.location_of(result.checkpoint.filesystem, result.checkpoint.path)}
    engine.write_run_outputs(run, final)
    return final


def load_exported(path: str | Path, kind: str | None = "classifier"):
    """An exported model file -> (eval-mode torchvision model, payload).

    ``kind="classifier"``: a student/baseline with its ``fc``; ``"teacher"``: the phase-1 backbone;
    ``None``: whichever the file holds.
    """
    payload = engine.load_model_file(path, kind=kind)
    num_classes = len(payload["classes"]) if payload["kind"] == "classifier" else 0
    net, _ = build_backbone(**payload_arch(payload), num_classes=num_classes)
    try:
        net.load_state_dict(payload["state_dict"])
    except RuntimeError as exc:
        raise engine.CheckpointError(f"{path}: weights do not fit {payload['backbone']}: {exc}") from exc
    return net.eval(), payload


def load_classifier(path: str | Path):
    return load_exported(path, "classifier")


