"""Views made on the training device (kornia, per batch) follow the same distribution as the CPU
path (torchvision v2, per image): the random parameters each draws, then the views themselves on
real images. Tolerances are a few standard errors at these sample sizes; a wrong parameter
(e.g. blur p 1.0, crop scale 0.08 instead of 0.2, kornia's default grayscale p 0.1) fails."""
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from raypipe import data as D
from raypipe import transforms as T
from raypipe.transforms import BatchViews, CropView, MocoView, views_on_device

N = 4000
SIZE, RES = 36, 32          # decoded size and training resolution of the CIFAR recipe
SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "cifar10-50" / "train"


def cpu_crops(transform, n=N):
    """(area fraction, log aspect ratio) of n crops drawn by torchvision's RandomResizedCrop."""
    img = torch.zeros(3, SIZE, SIZE, dtype=torch.uint8)
    boxes = [transform.make_params([img]) for _ in range(n)]
    return (np.array([b["height"] * b["width"] / SIZE ** 2 for b in boxes]),
            np.array([math.log(b["width"] / b["height"]) for b in boxes]))


def device_crops(module, n=N):
    src = module.forward_parameters(torch.Size([n, 3, SIZE, SIZE]))["src"]     # corners: tl, tr, br, bl
    w = (src[:, 1, 0] - src[:, 0, 0] + 1).numpy()
    h = (src[:, 2, 1] - src[:, 1, 1] + 1).numpy()
    return w * h / SIZE ** 2, np.log(w / h)


def assert_same_distribution(a, b, tol):
    for q in (0.1, 0.5, 0.9):
        assert abs(np.quantile(a, q) - np.quantile(b, q)) < tol, (q, np.quantile(a, q), np.quantile(b, q))
    assert abs(a.mean() - b.mean()) < tol and abs(a.std() - b.std()) < tol


@pytest.mark.parametrize("min_scale", [0.2, 0.4])
def test_moco_crops_draw_the_same_scales_and_ratios(min_scale):
    torch.manual_seed(0)
    area_cpu, ratio_cpu = cpu_crops(MocoView(RES, min_scale).cpu().transforms[0])
    area_dev, ratio_dev = device_crops(list(MocoView(RES, min_scale).device().children())[0])
    assert area_cpu.min() >= min_scale - 0.02 and area_dev.min() >= min_scale - 0.02
    assert_same_distribution(area_cpu, area_dev, 0.03)
    assert_same_distribution(ratio_cpu, ratio_dev, 0.04)
    wrong, _ = device_crops(list(CropView(RES, 0.08).device().children())[0])   # scale 0.08: clearly another law
    assert abs(wrong.mean() - area_cpu.mean()) > 0.05


@pytest.mark.parametrize("blur_prob", [0.5, 0.0])
def test_moco_rates_and_jitter_factors_match_the_cpu_recipe(blur_prob):
    torch.manual_seed(1)
    crop, jitter_apply, gray, blur_apply, flip = MocoView(RES, 0.2, blur_prob).cpu().transforms
    jitter, blur = jitter_apply.transforms[0], blur_apply.transforms[0]
    dev = {type(m).__name__: m.forward_parameters(torch.Size([N, 3, SIZE, SIZE]))
           for m in MocoView(RES, 0.2, blur_prob).device().children()}
    rate = lambda name: dev[name]["batch_prob"].float().mean().item()  # noqa: E731
    for name, p in (("ColorJitter", jitter_apply.p), ("RandomGrayscale", gray.p),
                    ("RandomGaussianBlur", blur_apply.p), ("RandomHorizontalFlip", flip.p)):
        assert abs(rate(name) - p) < 0.03, (name, rate(name), p)
    img = torch.zeros(3, SIZE, SIZE, dtype=torch.uint8)
    cpu = [jitter.make_params([img]) for _ in range(N)]
    for key in ("brightness_factor", "contrast_factor", "saturation_factor", "hue_factor"):
        a = np.array([float(c[key]) for c in cpu])
        b = dev["ColorJitter"][key].numpy()
        assert_same_distribution(a, b, 0.03)
    sigma_cpu = np.array([blur.make_params([img])["sigma"][0] for _ in range(N)])
    assert_same_distribution(sigma_cpu, dev["RandomGaussianBlur"]["sigma"].numpy(), 0.08)
    assert blur.kernel_size == (T.blur_kernel(RES),) * 2


def real_images(n=256) -> torch.Tensor:
    """n real CIFAR-10 training images (../shared/data) decoded as the pipeline does, NHWC uint8."""
    if not SHARED.is_dir():
        pytest.skip(f"real images not found at {SHARED} (see ../shared/data/README)")
    files = sorted(p for c in sorted(SHARED.iterdir()) for p in sorted(c.iterdir()))[:: 5][:n]
    return torch.from_numpy(np.stack([D.decode_square(p.read_bytes(), SIZE) for p in files]))


def view_stats(views: torch.Tensor) -> dict:
    """Per-view statistics of normalised views, back on the 0-255 scale: grayscale share,
    brightness, contrast, colourfulness."""
    mean, std = (torch.tensor(v).view(1, 3, 1, 1) * 255 for v in (T.MEAN, T.STD))
    x = views.float() * std + mean
    gray = (x.amax(1) - x.amin(1)).flatten(1).amax(1) < 0.5
    return {"gray": gray.float().mean().item(), "mean": x.mean((1, 2, 3)).numpy(), "std": x.std((1, 2, 3)).numpy(),
            "colour": (x.amax(1) - x.amin(1)).mean((1, 2)).numpy()}


def test_views_of_real_images_match_in_distribution_and_are_independent(monkeypatch):
    images = real_images()
    reps = 8                     # 8 x 256 views per path
    monkeypatch.setattr(T, "fresh_rng", lambda: None)   # the pipeline reseeds from the OS: seeded here
    recipes = [MocoView(RES)] * 2
    torch.manual_seed(2)
    cpu = torch.cat([torch.from_numpy(T.make_views({"img": images.numpy(), "label": np.zeros(len(images)),
                                                    "idx": np.arange(len(images))}, recipes)["view0"])
                     for _ in range(reps)])
    device_views = BatchViews(recipes, torch.device("cpu"), False, on_device=True)
    torch.manual_seed(3)
    dev, dev2 = zip(*[device_views({"img": images}) for _ in range(reps)])
    dev = torch.cat(dev)
    s_cpu, s_dev = view_stats(T.normalize(cpu)), view_stats(dev)
    assert abs(s_cpu["gray"] - 0.2) < 0.04 and abs(s_dev["gray"] - 0.2) < 0.04
    for key, tol in (("mean", 4.0), ("std", 2.5), ("colour", 3.0)):   # ~3.5 standard errors of the difference
        assert abs(s_cpu[key].mean() - s_dev[key].mean()) < tol, (key, s_cpu[key].mean(), s_dev[key].mean())
    # per-sample independence: one image repeated in a batch gets a different view each time,
    # and the two views of a batch differ
    same = images[:1].repeat(16, 1, 1, 1)
    v1, v2 = device_views({"img": same})
    assert all(not torch.allclose(v1[0], v1[i]) for i in range(1, 16))
    assert not torch.allclose(v1, v2) and not torch.allclose(dev2[0], dev[: len(images)])
    # seeded determinism
    torch.manual_seed(5)
    a = device_views({"img": images[:8]})
    torch.manual_seed(5)
    b = device_views({"img": images[:8]})
    assert all(torch.equal(x, y) for x, y in zip(a, b))


def test_supervised_device_view_matches_the_cpu_crop_and_flip():
    torch.manual_seed(3)
    crop, flip = CropView(RES, 0.35, "none").cpu().transforms
    dev = list(CropView(RES, 0.35).device().children())
    assert_same_distribution(cpu_crops(crop)[0], device_crops(dev[0])[0], 0.03)
    rate = dev[1].forward_parameters(torch.Size([N, 3, SIZE, SIZE]))["batch_prob"].float().mean().item()
    assert abs(rate - flip.p) < 0.03


def on_device(cfg, phase: str, use_gpu: bool) -> bool:
    """Where the selected plug-in's training views are made for ``phase`` (as the phase runner asks)."""
    from raypipe.student import distiller_class
    from raypipe.teacher import method_class
    plugin = method_class(cfg) if phase == "teacher" else distiller_class(cfg)
    return views_on_device(plugin.views(cfg), cfg.data.augment_on, use_gpu)


def test_the_plugins_views_follow_their_settings():
    """MoCo's two views and the distillers' one crop are made from the config's own settings."""
    from raypipe.config import load_config
    from raypipe.student import distiller_class
    from raypipe.teacher import method_class
    cfg = load_config(overrides=["data.resolution=24", "teacher.moco.crop_min_scale=0.3", "teacher.moco.blur_prob=0.1",
                                 "student.crop_min_scale=0.5", "student.autoaugment=cifar10"])
    assert method_class(cfg).views(cfg) == [MocoView(24, 0.3, 0.1)] * 2
    for mode in ("distill", "finetune", "supervised"):
        c = cfg.with_overrides({"student.mode": mode})
        assert distiller_class(c).views(c) == [CropView(24, 0.5, "cifar10")]


def test_where_views_are_made(tiny_config):
    cfg = tiny_config()
    assert cfg.data.augment_on == "auto"
    assert on_device(cfg, "teacher", use_gpu=True) and not on_device(cfg, "teacher", use_gpu=False)
    # phase 2's crop + flip: on CPU unless asked (bench/gpu_phases.py: CPU workers keep up there)
    assert not on_device(cfg, "student", use_gpu=True)
    assert on_device(cfg.with_overrides({"data.augment_on": "device"}), "student", use_gpu=False)
    assert not on_device(cfg.with_overrides({"data.augment_on": "cpu"}), "teacher", use_gpu=True)
    # AutoAugment stays on CPU: kornia draws its sub-policy once per batch, not per image
    assert not on_device(cfg.with_overrides({"student.autoaugment": "cifar10"}), "student", use_gpu=True)
    assert not on_device(cfg.with_overrides({"student.autoaugment": "cifar10", "data.augment_on": "device"}),
                         "student", use_gpu=True)


@pytest.mark.e2e
@pytest.mark.timeout(600)
def test_both_phases_train_with_views_made_on_the_device(ray_cluster, tiny_config, trained_teacher):
    """data.augment_on=device on CPU: Ray Data hands the decoded images to the worker, which makes
    the views; both phases train, and the run records where the views were made."""
    import json

    from raypipe.phase import pretrain, train_student
    teacher = pretrain(tiny_config("data.augment_on=device", "name=device_teacher", "resources.num_workers=1"))
    assert teacher["epochs"] == 1 and teacher["device_views"] and math.isfinite(teacher["loss"])
    cfg = tiny_config("data.augment_on=device", "name=device_student", "student.mode=finetune")
    student = train_student(cfg, trained_teacher)
    summary = json.loads((Path(cfg.output_dir) / "device_student" / "metrics.json").read_text())
    assert student["device_views"] and summary["n_val"] == 32 and math.isfinite(summary["loss"])
