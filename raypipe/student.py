"""Phase 2: the student, trained by the distiller ``student.mode`` selects (raypipe.distillers):
``distill`` (OFD self-distillation from the frozen phase-1 teacher + CE, the paper's phase 2),
``finetune`` (from the teacher, CE only) and ``supervised`` (from scratch: the baseline). ``run``
is the worker loop (no Ray: it runs over any ``loop.Session``); ``StudentPhase`` is what the phase
runner (``raypipe.phase``) needs to launch it on Ray Train."""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

from . import dist
from .checkpoints import load_model_file, save_model_file
from .errors import ConfigError
from .loop import EpochMeans, Loop, Throughput, eval_rows_mask, make_runtime
from .models import arch_of, build_backbone, payload_arch
from .registry import DISTILLERS
from .transforms import BatchViews, normalize

EPOCH_KEYS = ("val_top1", "val_top5", "lr", "images_per_s")  # printed after the loss and its parts


def distiller_class(cfg) -> type:
    return DISTILLERS.get_class(cfg.student.mode)


def check_teacher(cfg, teacher_path: str | Path | None) -> dict | None:
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


def build_distiller(cfg, num_classes: int, teacher_state: dict | None):
    return distiller_class(cfg)(cfg, num_classes, teacher_state)


def mixed_batch(x: torch.Tensor, y: torch.Tensor, cfg):
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
def validate_top(distiller, rt, batches) -> tuple[float, float, int]:
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


def run(cfg, meta: dict, session) -> None:
    """Phase 2 on one worker: ``session`` gives the ``train`` batches (the distiller's views, or the
    decoded images when ``meta["device_views"]``) and ``val`` (centre crops); ``meta["teacher"]``
    the teacher's weights (or a Ray object reference to them)."""
    s = cfg.student
    rt = make_runtime(cfg.resources, s.seed, session)
    teacher_state = meta.get("teacher")
    if teacher_state is not None and not isinstance(teacher_state, dict):   # sent once through the object store
        import ray
        teacher_state = ray.get(teacher_state)
    distiller = build_distiller(cfg, meta["num_classes"], teacher_state)
    if distiller.teacher is not None:  # frozen: moved to the device, never wrapped in DDP
        distiller.teacher.to(rt.device)
        if rt.channels_last:
            distiller.teacher.to(memory_format=torch.channels_last)
    loop = Loop(distiller.student, s, cfg, rt, session, meta)
    names = ("loss", *distiller.metric_names)
    views = BatchViews(distiller.views(cfg), rt.device, rt.channels_last, meta.get("device_views", False))
    for epoch in loop.epochs():
        distiller.train()
        frozen = distiller.frozen_parameters(epoch)
        speed, means = Throughput(), EpochMeans(names, rt.device)
        for batch in loop.batches(epoch):
            x, *_ = views(batch)
            x, ce = mixed_batch(x, batch["label"].to(rt.device), cfg)
            loss, metrics = distiller.training_step(loop.net, x, ce, epoch, rt)
            loop.step(loss, frozen)
            means.add(loss, *(metrics[k] for k in distiller.metric_names))
            speed.add(x.shape[0])
        dist.average_bn_statistics(distiller.student)  # one set of BN statistics for validation and the checkpoint
        top1, top5, n_val = validate_top(distiller, rt, session.batches("val", s.batch_size))
        metrics = {**means.result(), "distill_weight": distiller.weight_at(epoch), "val_top1": top1,
                   "val_top5": top5, "n_val": n_val, "images_per_s": speed.rate(rt.world_size)}
        loop.end_epoch(s.mode, epoch, metrics, ("loss", *distiller.metric_names, *EPOCH_KEYS))


def export_student(cfg, state: dict, path: Path, classes: list[str], teacher_path=None) -> Path:
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


class StudentPhase:
    """What phase 2 adds to the phase runner's launch sequence: the teacher file checked against the
    student config before any Ray resource is asked for, its weights sent to the workers once."""

    model_file, model_key, best_metric = "student.pt", "model", "val_top1"
    run = staticmethod(run)
    eval_splits = {"val": "val"}   # centre-crop splits the workers read whole: name -> split

    def __init__(self, cfg, index: dict, teacher_path=None):
        self.cfg, self.classes, self.teacher_path, self.name = cfg, index["train"].classes, teacher_path, cfg.student.mode
        self.payload = check_teacher(cfg, teacher_path)
        if self.payload is not None and self.payload.get("classes") and self.payload["classes"] != self.classes:
            print(f"note: teacher was pre-trained on classes {self.payload['classes'][:5]}...; "
                  f"student classes come from {cfg.data.root}", flush=True)
        # the last epoch's weights too, under the other export rule (student.export_final)
        self.final_file = "student_final.pt" if cfg.student.export_final else None
        self.recipes = distiller_class(cfg).views(cfg)
        if len(self.recipes) != 1:   # training_step gets one normalised batch (mixup, CE on it)
            raise ConfigError(f"student.mode={cfg.student.mode!r}: a distiller trains on one view of each image; "
                              f"its views() gave {len(self.recipes)}")

    def check_decoded(self, decoded: dict) -> None:
        pass

    def meta(self) -> dict:
        """Called once Ray is up: the weights go to the workers once, through the object store."""
        import ray
        return {"teacher": ray.put(self.payload["state_dict"]) if self.payload is not None else None}

    def export(self, state: dict, path: Path) -> Path:
        return export_student(self.cfg, state, path, self.classes, self.teacher_path)
