"""The one data pipeline: sources -> robust decode (once) -> Ray Data augmentation (every epoch).

Layouts read:
  * ImageFolder: ``root/<split>/<class>/<image>``
  * VIPriors:    ``train/`` and ``val/`` as above, ``test/imgs/<id>.jpg`` unlabelled
  * Parquet:     ``root/<split>.parquet`` or ``root/<split>/*.parquet`` with columns
                 ``image`` (encoded bytes), ``label`` (class name), ``path`` (an id), read by
                 raypipe's own tasks a run of row groups each
Class index = position in the sorted class names (torchvision ImageFolder / VIPriors CSV).

Images are decoded, converted to RGB and resized to a square ``stored_size`` once, then
materialised in Ray's object store; the views the plug-in asks for (``raypipe.transforms``) are
made after that in ``map_batches``, so every epoch sees fresh random views without decoding
again. Views leave the CPU workers as uint8 (4x less traffic than float); ``normalize`` makes
them floats on the training device.
"""
from __future__ import annotations

import io
import random
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageFile, ImageOps

from . import parquet, storage
from .errors import DataError
from .settings import DataConfig
from .storage import join
from .transforms import eval_ten_crop, eval_view, make_views

ImageFile.LOAD_TRUNCATED_IMAGES = False  # a truncated file is an error, not a grey image
IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".ppm", ".pgm", ".gif"}
UNLABELLED = -1

# ---- sources ----------------------------------------------------------------------
@dataclass
class SplitIndex:
    """The files of one split as found on disk (no pixels read yet)."""

    split: str
    classes: list[str]
    paths: list[str]            # file paths (folder) or ids (Parquet)
    labels: list[int]           # class index, or UNLABELLED
    parquet_files: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.paths)

    @property
    def labelled(self) -> bool:
        return bool(self.labels) and self.labels[0] != UNLABELLED


def _is_image_name(name: str) -> bool:
    return Path(name).suffix.lower() in IMAGE_EXTENSIONS and not name.startswith(".")


def _images_in(folder: str) -> list[str]:
    """Image files directly in a folder (local or URI), sorted by name."""
    return [join(folder, n) for n, is_dir in storage.list_dir(folder) if not is_dir and _is_image_name(n)]


def _parquet_files(root: str, split: str) -> list[str]:
    single = join(root, f"{split}.parquet")
    if storage.is_file(single):
        return [single]
    folder = join(root, split)
    return [join(folder, n) for n, is_dir in storage.list_dir(folder) if not is_dir and n.endswith(".parquet")]


def scan_split(root: str | Path, split: str, classes: list[str] | None = None) -> SplitIndex:
    """Index one split of a folder or Parquet data set (local or URI), with clear errors for bad layouts."""
    root = str(root)
    if not storage.exists(root):
        raise DataError(f"data root does not exist: {root}{storage.missing_hint(root)}")
    files = _parquet_files(root, split)
    if files:
        return _scan_parquet(split, files, classes)
    split_dir = join(root, split)
    if not storage.is_dir(split_dir):
        raise DataError(f"split {split!r} not found: expected folder {split_dir} "
                        f"or Parquet {join(root, split + '.parquet')}")
    folders = [n for n, is_dir in storage.list_dir(split_dir) if is_dir and not n.startswith(".")]
    if folders == ["imgs"]:  # VIPriors test split: unlabelled images
        paths = _images_in(join(split_dir, "imgs"))
        if not paths:
            raise DataError(f"split {split!r} is empty: no images in {join(split_dir, 'imgs')}")
        return SplitIndex(split, list(classes or []), paths, [UNLABELLED] * len(paths))
    if not folders:
        raise DataError(f"split {split!r} is empty: no class folders in {split_dir}")
    images = {c: _images_in(join(split_dir, c)) for c in folders}
    empty = [c for c in folders if not images[c]]
    if empty:
        raise DataError(f"split {split!r} has class folders without images: {empty} (in {split_dir})")
    names = _check_classes(split, folders, classes)
    paths, labels = [], []
    for c in folders:
        paths += images[c]
        labels += [names.index(c)] * len(images[c])
    return SplitIndex(split, names, paths, labels)


def _check_classes(split: str, found: list[str], expected: list[str] | None) -> list[str]:
    if expected is None:
        return sorted(found)
    missing, extra = sorted(set(expected) - set(found)), sorted(set(found) - set(expected))
    if missing or extra:
        raise DataError(f"classes of split {split!r} differ from the train split: "
                        f"missing {missing}, unexpected {extra}")
    return list(expected)


def _scan_parquet(split: str, files: list[str], classes: list[str] | None) -> SplitIndex:
    import pyarrow.parquet as pq

    paths, names = [], []
    for f in files:
        fs, path = storage.filesystem(f)
        try:
            cols = pq.read_schema(path, filesystem=fs).names
        except Exception as exc:
            raise DataError(f"{f}: not a readable Parquet file: {exc}") from exc
        need = [c for c in ("image", "path") if c not in cols]
        if need:
            raise DataError(f"{f}: Parquet file lacks column(s) {need}; has {cols}")
        table = pq.read_table(path, columns=[c for c in ("path", "label") if c in cols], filesystem=fs)
        paths += table.column("path").to_pylist()
        names += table.column("label").to_pylist() if "label" in cols else [None] * table.num_rows
    if not paths:
        raise DataError(f"split {split!r} is empty: Parquet file(s) {[str(f) for f in files]} have no rows")
    if names[0] is None:
        return SplitIndex(split, list(classes or []), paths, [UNLABELLED] * len(paths), files)
    class_names = _check_classes(split, sorted(set(names)), classes)
    labels = [class_names.index(n) for n in names]
    return SplitIndex(split, class_names, paths, labels, files)


def subsample(index: SplitIndex, per_class: int, seed: int) -> SplitIndex:
    """Keep ``per_class`` images of every class, chosen deterministically from ``seed``."""
    if per_class <= 0 or not index.labelled:
        return index
    rng = random.Random(seed)
    keep: list[int] = []
    for c in range(len(index.classes)):
        members = [i for i, y in enumerate(index.labels) if y == c]
        keep += sorted(rng.sample(members, min(per_class, len(members))))
    keep.sort()
    return SplitIndex(index.split, index.classes, [index.paths[i] for i in keep],
                      [index.labels[i] for i in keep], index.parquet_files)


def scan_union(root: str | Path, splits: str) -> SplitIndex:
    """``"train+val"``: the listed splits as one (classes must agree), e.g. for final models."""
    parts = [p.strip() for p in splits.split("+")]
    first = scan_split(root, parts[0])
    for name in parts[1:]:
        more = scan_split(root, name, classes=first.classes)
        if first.parquet_files or more.parquet_files:
            raise DataError(f"data.train_split={splits!r}: joining splits works for image folders only")
        first = SplitIndex(splits, first.classes, first.paths + more.paths, first.labels + more.labels)
    return first


def scan_dataset(cfg: DataConfig, splits: tuple[str, ...] = ("train", "val")) -> dict[str, SplitIndex]:
    """Index train (subsampled) and the other named splits; classes must agree with train."""
    if not cfg.root:
        raise DataError("data.root is not set: pass DATA on the command line or data.root=...")
    names = {"train": cfg.train_split, "val": cfg.val_split, "test": cfg.test_split}
    train = subsample(scan_union(cfg.root, names["train"]), cfg.per_class, cfg.subsample_seed)
    out = {"train": train}
    for s in splits:
        if s != "train":
            out[s] = scan_split(cfg.root, names[s], classes=train.classes)
    return out


# ---- decoding ---------------------------------------------------------------------
def to_rgb(img: Image.Image) -> Image.Image:
    """Any PIL mode -> RGB: EXIF orientation applied, alpha composited on white, 16-bit scaled."""
    img = ImageOps.exif_transpose(img)
    if img.mode in ("I;16", "I;16B", "I;16L", "I"):
        arr = np.asarray(img, dtype=np.float64)
        scale = 257.0 if arr.max(initial=0) > 255 or img.mode.startswith("I;16") else 1.0
        img = Image.fromarray(np.clip(arr / scale, 0, 255).astype(np.uint8), "L")
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "PA"):
        background = Image.new("RGBA", img.size, (255, 255, 255, 255))
        img = Image.alpha_composite(background, img.convert("RGBA"))
    return img.convert("RGB")


def decode_square(data: bytes, size: int) -> np.ndarray:
    """Encoded bytes -> uint8 (size, size, 3): shorter side resized to ``size``, centre crop."""
    with Image.open(io.BytesIO(data)) as img:
        if img.format == "JPEG":
            img.draft("RGB", (size, size))  # JPEG DCT scaling: big photos decode fast
        img.load()
        img = to_rgb(img)
    w, h = img.size
    scale = size / min(w, h)
    nw, nh = max(size, round(w * scale)), max(size, round(h * scale))
    img = img.resize((nw, nh), Image.BICUBIC, reducing_gap=3.0)
    left, top = (nw - size) // 2, (nh - size) // 2
    return np.asarray(img.crop((left, top, left + size, top + size)), dtype=np.uint8)


def _decode_batch(batch: dict, size: int) -> dict:
    images, errors = [], []
    for i, path in enumerate(batch["path"]):
        try:
            data = batch["image"][i] if "image" in batch else storage.read_bytes(path)
            if not len(data):
                raise ValueError("empty file (0 bytes)")
            images.append(decode_square(bytes(data), size))
            errors.append("")
        except Exception as exc:  # any decode failure is reported with its path, never raised here
            images.append(np.zeros((size, size, 3), np.uint8))
            errors.append(f"{type(exc).__name__}: {exc}"[:300])
    return {"img": np.stack(images) if images else np.zeros((0, size, size, 3), np.uint8),
            "label": np.asarray(batch["label"], np.int64),
            "idx": np.asarray(batch["idx"], np.int64), "path": np.asarray(batch["path"], object),
            "error": np.asarray(errors, object)}


@dataclass
class DecodedSplit:
    """A split decoded once and held in Ray's object store, plus what was skipped."""

    split: str
    classes: list[str]
    dataset: "object"           # ray.data.Dataset (materialised) with img/label/idx/path
    count: int
    skipped: list[dict]         # [{"path": ..., "error": ...}]


def decode_split(index: SplitIndex, cfg: DataConfig) -> DecodedSplit:
    """Read + decode + resize one split with Ray Data; bad images are skipped and listed."""
    import ray.data

    size, n = cfg.stored_size(), len(index)
    blocks = max(1, min(64, n // 32))
    # decode batches no larger than a block: Ray Data bundles smaller blocks into one task (one block)
    batch = max(1, min(cfg.aug_batch_size, n // blocks))
    # every task of the pipeline asks for data.cpus_per_task (Ray's default is a whole CPU a task: on an
    # autoscaling cluster that demand alone launches nodes)
    cpus = {"num_cpus": cfg.cpus_per_task}
    if index.parquet_files:
        # a task per run of row groups reads them with pyarrow (read_parquet's metadata and sampling
        # tasks ask for a whole CPU each, which no argument changes); units smaller than a decode batch
        # are bundled by Ray Data
        units = parquet.read_units(index.parquet_files, blocks)
        ds = ray.data.from_items(units, override_num_blocks=len(units)).flat_map(
            parquet.rows, fn_kwargs={"wanted": dict(zip(index.paths, range(n))), "labels": index.labels}, **cpus)
    else:
        rows = [{"path": p, "label": y, "idx": i} for i, (p, y) in enumerate(zip(index.paths, index.labels))]
        ds = ray.data.from_items(rows, override_num_blocks=blocks)
    decoded = ds.map_batches(_decode_batch, fn_kwargs={"size": size}, batch_format="numpy",
                             batch_size=batch, **cpus).materialize()
    from ray.data.expressions import col

    bad = decoded.filter(expr=col("error") != "", **cpus).select_columns(["path", "error"], **cpus).take_all()
    skipped = [{"path": str(r["path"]), "error": str(r["error"])} for r in bad]
    if skipped and cfg.strict:
        raise DataError(f"{len(skipped)} unreadable image(s) in split {index.split!r} (data.strict=true), "
                        f"first: {skipped[0]['path']}: {skipped[0]['error']}")
    good = decoded.filter(expr=col("error") == "", **cpus).drop_columns(["error"], **cpus)
    good = good.materialize()   # the source's blocks (Ray's repartition would cut them in whole-CPU tasks)
    count = good.count()
    if count == 0:
        raise DataError(f"split {index.split!r}: none of its {n} images could be decoded; "
                        f"first error: {skipped[0]['path']}: {skipped[0]['error']}")
    return DecodedSplit(index.split, index.classes, good, count, skipped)


# ---- views (every epoch) ----------------------------------------------------------
EVAL_VIEWS = {"eval": eval_view, "ten_crop": eval_ten_crop}   # deterministic: computed once


def with_views(decoded: DecodedSplit, recipes: list, cfg: DataConfig, on_device: bool = False):
    """The training views of a decoded split, re-made every epoch from a shuffled block order: one
    uint8 column per recipe, made by Ray Data CPU tasks; ``on_device``: the decoded images as they
    are (``img``), for the training device to make the views (``transforms.BatchViews``)."""
    ds = decoded.dataset.randomize_block_order()
    if on_device:
        return ds.select_columns(["img", "label", "idx"], num_cpus=cfg.cpus_per_task)
    return ds.map_batches(make_views, fn_kwargs={"recipes": list(recipes)}, batch_format="numpy",
                          batch_size=cfg.aug_batch_size, num_cpus=cfg.cpus_per_task)


def eval_dataset(decoded: DecodedSplit, cfg: DataConfig, view: str = "eval"):
    """The centre-crop (``eval``) or ``ten_crop`` view of a decoded split, computed once."""
    return decoded.dataset.map_batches(EVAL_VIEWS[view], fn_kwargs={"resolution": cfg.resolution},
                                       batch_format="numpy", batch_size=cfg.aug_batch_size,
                                       num_cpus=cfg.cpus_per_task).materialize()


# ---- conversion -------------------------------------------------------------------
def folder_to_parquet(src: str | Path, dst: str | Path, splits: tuple[str, ...] | None = None,
                      rows_per_file: int = 5000, threads: int = 16) -> dict[str, int]:
    """Write each split of an image folder as ``dst/<split>/part-*.parquet`` (bytes kept as-is).

    ``src`` and ``dst`` are local folders or URIs; files are read by ``threads`` threads. Every split
    is indexed before anything is written, and an existing Parquet split in ``dst`` is an error
    (never overwritten or deleted)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    src, dst = (str(p) if storage.is_uri(p) else str(Path(p)) for p in (src, dst))
    if not storage.is_dir(src):
        raise DataError(f"source folder does not exist: {src}")
    names = splits or tuple(n for n, is_dir in storage.list_dir(src) if is_dir and not n.startswith("."))
    if not names:
        raise DataError(f"no split folders in {src}")
    first = scan_split(src, names[0])
    indexes = [first] + [scan_split(src, s, classes=first.classes if _labelled(src, s) else None) for s in names[1:]]
    taken = [s for s in names if _parquet_files(dst, s)]
    if taken:
        raise DataError(f"{dst} already holds Parquet split(s) {taken}: choose an empty destination")
    prefix = src.rstrip("/") + "/"
    counts = {}
    with ThreadPoolExecutor(threads) as pool:
        for split, index in zip(names, indexes):
            for part, start in enumerate(range(0, len(index), rows_per_file)):
                chunk = slice(start, start + rows_per_file)
                rows = {"image": list(pool.map(storage.read_bytes, index.paths[chunk])),
                        "path": [p.removeprefix(prefix) for p in index.paths[chunk]]}
                if index.labelled:
                    rows["label"] = [index.classes[y] for y in index.labels[chunk]]
                target = join(dst, split, f"part-{part:05d}.parquet")
                fs, path = storage.filesystem(target)
                if not storage.is_uri(target):
                    Path(path).parent.mkdir(parents=True, exist_ok=True)
                pq.write_table(pa.table(rows), path, filesystem=fs, row_group_size=parquet.ROW_GROUP)
            counts[split] = len(index)
    return counts


def _labelled(root: str, split: str) -> bool:
    return not storage.is_dir(join(root, split, "imgs"))
