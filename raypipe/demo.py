"""Embedded demo data: a small, learnable ImageFolder set generated in seconds, no download.

Ten classes of textured shapes (the class is the shape; colour, size, position, rotation,
texture and background noise vary), written as JPEG/PNG files in ``train/val/test``.
"""
from __future__ import annotations

import math
import random
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

CLASSES = ("circle", "cross", "diamond", "hexagon", "ring", "square", "star", "stripes", "triangle", "zigzag")


def _polygon(cx, cy, r, n, rot, inner=None):
    pts = []
    steps = n * (2 if inner else 1)
    for k in range(steps):
        rad = (inner if inner and k % 2 else r)
        a = rot + 2 * math.pi * k / steps
        pts.append((cx + rad * math.cos(a), cy + rad * math.sin(a)))
    return pts


def draw_shape(kind: str, size: int, rng: random.Random) -> Image.Image:
    bg = tuple(rng.randint(0, 255) for _ in range(3))
    noise = np.random.default_rng(rng.randint(0, 2**31)).normal(0, 18, (size, size, 3))
    base = np.clip(np.array(bg, np.float64) + noise, 0, 255).astype(np.uint8)
    img = Image.fromarray(base, "RGB")
    draw = ImageDraw.Draw(img)
    fg = tuple((c + rng.randint(90, 165)) % 256 for c in bg)
    r = size * rng.uniform(0.22, 0.36)
    cx, cy = (size / 2 + rng.uniform(-0.12, 0.12) * size for _ in range(2))
    rot = rng.uniform(0, 2 * math.pi)
    w = max(2, int(r / 3))
    if kind == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fg)
    elif kind == "ring":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], outline=fg, width=w)
    elif kind == "square":
        draw.polygon(_polygon(cx, cy, r, 4, rot), fill=fg)
    elif kind == "diamond":
        draw.polygon([(cx, cy - r * 1.2), (cx + r * 0.6, cy), (cx, cy + r * 1.2), (cx - r * 0.6, cy)], fill=fg)
    elif kind == "triangle":
        draw.polygon(_polygon(cx, cy, r, 3, rot), fill=fg)
    elif kind == "hexagon":
        draw.polygon(_polygon(cx, cy, r, 6, rot), fill=fg)
    elif kind == "star":
        draw.polygon(_polygon(cx, cy, r, 5, rot, inner=r * 0.4), fill=fg)
    elif kind == "cross":
        for a in (rot, rot + math.pi / 2):
            dx, dy = r * math.cos(a), r * math.sin(a)
            draw.line([(cx - dx, cy - dy), (cx + dx, cy + dy)], fill=fg, width=w)
    elif kind == "stripes":
        period = max(4, int(size / rng.uniform(4, 7)))
        for x in range(-size, 2 * size, period):
            draw.line([(x, 0), (x + size * math.cos(rot), size)], fill=fg, width=max(2, period // 3))
    elif kind == "zigzag":
        pts, n = [], 6
        for k in range(n + 1):
            pts.append((cx - r + 2 * r * k / n, cy + (r / 2 if k % 2 else -r / 2)))
        draw.line(pts, fill=fg, width=w, joint="curve")
    else:
        raise ValueError(f"unknown shape {kind!r}")
    if rng.random() < 0.5:
        img = img.filter(ImageFilter.GaussianBlur(rng.uniform(0.2, 1.0)))
    return img


def make_demo_data(out: str | Path, per_class: dict[str, int] | None = None, size: int = 64,
                   seed: int = 0, classes: tuple[str, ...] = CLASSES) -> dict[str, int]:
    """Write ``out/{train,val,test}/<class>/*.jpg``; deterministic for ``seed``. Returns counts."""
    per_class = per_class or {"train": 50, "val": 20, "test": 20}
    out = Path(out)
    counts = {}
    for s_i, (split, n) in enumerate(per_class.items()):
        for c_i, kind in enumerate(classes):
            folder = out / split / kind
            folder.mkdir(parents=True, exist_ok=True)
            rng = random.Random(seed * 1_000_003 + s_i * 1009 + c_i)
            for k in range(n):
                ext = "png" if k % 5 == 4 else "jpg"  # both encoders appear in the data
                draw_shape(kind, size, rng).save(folder / f"{kind}_{k:04d}.{ext}", quality=90)
        counts[split] = n * len(classes)
    return counts
