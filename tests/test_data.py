import io
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from raypipe import data as D
from raypipe import parquet
from raypipe import transforms as T
from raypipe.config import load_config
from raypipe.transforms import CropView, MocoView


# ---- layouts and indexing (no Ray) -------------------------------------------------------
def test_imagefolder_classes_sorted_and_indexed(tiny_data):
    idx = D.scan_split(tiny_data, "train")
    assert idx.classes == sorted(idx.classes) == ["circle", "square", "star", "stripes"]
    for path, label in zip(idx.paths, idx.labels):
        assert Path(path).parent.name == idx.classes[label]
    assert len(idx) == 64


def test_vipriors_layout_with_unlabelled_test(tiny_data, tmp_path):
    root = tmp_path / "vip"
    shutil.copytree(tiny_data / "train", root / "train")
    shutil.copytree(tiny_data / "val", root / "val")
    (root / "test" / "imgs").mkdir(parents=True)
    for i, f in enumerate(sorted((tiny_data / "test").rglob("*.jpg"))[:5]):
        shutil.copy(f, root / "test" / "imgs" / f"{i:05d}.jpg")
    cfg = load_config(overrides=[f"data.root={root}"]).data
    index = D.scan_dataset(cfg, ("train", "val", "test"))
    assert index["test"].labels == [D.UNLABELLED] * 5 and not index["test"].labelled
    assert index["val"].classes == index["train"].classes


def test_subsample_is_deterministic_and_per_class(tiny_data):
    idx = D.scan_split(tiny_data, "train")
    a, b, c = D.subsample(idx, 5, 1), D.subsample(idx, 5, 1), D.subsample(idx, 5, 2)
    assert a.paths == b.paths and a.paths != c.paths
    assert np.bincount(a.labels).tolist() == [5, 5, 5, 5]


def test_train_split_union(tiny_data):
    cfg = load_config(overrides=[f"data.root={tiny_data}", "data.train_split=train+val"]).data
    index = D.scan_dataset(cfg, ("train",))
    assert len(index["train"]) == 64 + 32 and index["train"].classes == ["circle", "square", "star", "stripes"]


def test_parquet_round_trip(tiny_data, tmp_path):
    counts = D.folder_to_parquet(tiny_data, tmp_path / "pq")
    assert counts == {"test": 32, "train": 64, "val": 32}
    folder = D.scan_split(tiny_data, "val")
    pq = D.scan_split(tmp_path / "pq", "val", classes=folder.classes)
    assert pq.parquet_files and pq.classes == folder.classes
    assert sorted(zip(pq.labels, [Path(p).name for p in pq.paths])) == \
        sorted(zip(folder.labels, [Path(p).name for p in folder.paths]))


def test_parquet_read_units_give_the_indexed_rows_once(tiny_data, tmp_path, monkeypatch):
    """The reader behind decode_split: a split's files cut into about the asked number of read units (runs
    of row groups); of every unit, the rows the (subsampled) index kept, each once, with its position in
    the index and its label; an unreadable file is named."""
    monkeypatch.setattr(parquet, "ROW_GROUP", 8)
    D.folder_to_parquet(tiny_data, tmp_path / "pq", splits=("train",), rows_per_file=20)   # 20+20+20+4 rows
    index = D.subsample(D.scan_split(tmp_path / "pq", "train"), 3, seed=0)
    assert len(index.parquet_files) == 4 and len(index) == 12
    # 3+3+3+1 row groups of 8 rows: 4 units asked -> 3 groups a unit; 8 asked -> 2 a unit (7 units)
    assert [p["row_groups"] for p in parquet.read_units(index.parquet_files, 4)] == [[0, 1, 2]] * 3 + [[0]]
    parts = parquet.read_units(index.parquet_files, 8)
    assert [p["row_groups"] for p in parts] == [[0, 1], [2]] * 3 + [[0]]
    wanted = dict(zip(index.paths, range(len(index))))
    rows = [r for part in parts for r in parquet.rows(part, wanted, index.labels)]
    assert sorted(r["idx"] for r in rows) == list(range(12))
    assert all(r["path"] == index.paths[r["idx"]] and r["label"] == index.labels[r["idx"]] for r in rows)
    assert all(D.decode_square(r["image"], 8).shape == (8, 8, 3) for r in rows)
    (tmp_path / "torn.parquet").write_bytes(b"PAR1 torn")
    with pytest.raises(D.DataError, match="torn.parquet: not a readable Parquet file"):
        parquet.read_units([str(tmp_path / "torn.parquet")], 1)


@pytest.mark.parametrize("breakage, message", [
    ("missing_root", "does not exist"),
    ("empty_split", "split 'val' is empty"),
    ("empty_class", "without images: ['square']"),
    ("class_mismatch", "missing ['square'], unexpected ['triangle']"),
])
def test_bad_layouts_fail_with_names(tiny_data, tmp_path, breakage, message):
    root = tmp_path / "d"
    shutil.copytree(tiny_data, root)
    if breakage == "missing_root":
        root = tmp_path / "nope"
    elif breakage == "empty_split":
        shutil.rmtree(root / "val")
        (root / "val").mkdir()
    elif breakage == "empty_class":
        for f in (root / "train" / "square").iterdir():
            f.unlink()
    elif breakage == "class_mismatch":
        (root / "val" / "square").rename(root / "val" / "triangle")
    with pytest.raises(D.DataError, match=message.replace("[", r"\[").replace("]", r"\]")):
        D.scan_dataset(load_config(overrides=[f"data.root={root}"]).data, ("train", "val"))


# ---- decoding: every odd image becomes RGB or is reported (no Ray) ------------------------
def encode(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def test_decode_converts_modes_to_rgb():
    rgb = Image.new("RGB", (40, 30), (200, 10, 10))
    cases = {
        "grayscale": encode(Image.new("L", (40, 30), 128), "PNG"),
        "cmyk": encode(Image.new("CMYK", (40, 30), (0, 255, 255, 0)), "JPEG"),
        "palette_alpha": encode(Image.new("P", (40, 30), 0), "PNG", transparency=0),
        "rgba": encode(Image.new("RGBA", (40, 30), (0, 0, 0, 0)), "PNG"),
        "16bit": encode(Image.fromarray(np.full((30, 40), 65535, np.uint16)), "PNG"),
        "tiny": encode(Image.new("RGB", (1, 1), (0, 255, 0)), "PNG"),
        "rgb": encode(rgb, "JPEG"),
    }
    out = {k: D.decode_square(v, 24) for k, v in cases.items()}
    for k, arr in out.items():
        assert arr.shape == (24, 24, 3) and arr.dtype == np.uint8, k
    assert abs(int(out["grayscale"][12, 12, 0]) - 128) <= 1
    assert out["cmyk"][12, 12, 0] > 200 and out["cmyk"][12, 12, 1] < 60   # CMYK cyan-free = red
    assert (out["palette_alpha"] == 255).all() and (out["rgba"] == 255).all()  # transparent -> white
    assert (out["16bit"] == 255).all()                                    # 16-bit max -> 8-bit max
    assert tuple(out["tiny"][0, 0]) == (0, 255, 0)


def test_decode_applies_exif_orientation():
    img = Image.new("RGB", (60, 20), (0, 0, 0))
    img.paste((255, 255, 255), (0, 0, 20, 20))   # white on the left
    exif = Image.Exif()
    exif[0x0112] = 6                              # "rotate 90 CW to display"
    arr = D.decode_square(encode(img, "JPEG", exif=exif.tobytes(), quality=95), 20)
    # After rotation the image is 20 wide x 60 tall with white at the top; the centre crop is black,
    # without EXIF handling the centre crop of the 60x20 image would also be black, so check the
    # full resize instead: decode at a size that keeps the whole short side.
    with Image.open(io.BytesIO(encode(img, "JPEG", exif=exif.tobytes()))) as raw:
        upright = D.to_rgb(raw)
    assert upright.size == (20, 60)
    top = np.asarray(upright)[:20].mean()
    assert top > 200 and arr.shape == (20, 20, 3)


@pytest.mark.parametrize("payload, reason", [
    (b"", "empty"), (b"this is not an image", "UnidentifiedImageError"),
])
def test_decode_batch_reports_bad_bytes(tmp_path, payload, reason):
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(payload)
    out = D._decode_batch({"path": [str(bad)], "label": [0], "idx": [0]}, 16)
    assert reason in out["error"][0]


def test_truncated_jpeg_is_an_error(tmp_path):
    full = encode(Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), np.uint8)), "JPEG")
    bad = tmp_path / "cut.jpg"
    bad.write_bytes(full[: len(full) // 2])
    out = D._decode_batch({"path": [str(bad)], "label": [0], "idx": [0]}, 16)
    assert "truncated" in out["error"][0].lower() or "OSError" in out["error"][0]


# ---- transforms -------------------------------------------------------------------------------
def uint8_batch(n=4, size=20, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (n, size, size, 3), dtype=np.uint8)


def test_view_shapes_dtypes_ranges():
    batch = {"img": uint8_batch(), "label": np.arange(4), "idx": np.arange(4)}
    two = T.make_views(batch, [MocoView(16)] * 2)
    sup = T.make_views(batch, [CropView(16, 0.08, "imagenet")])
    ev = T.eval_view(batch, 16)
    ten = T.eval_ten_crop(batch, 16)
    assert set(two) == {"view0", "view1", "label", "idx"} and set(sup) == {"view0", "label", "idx"}
    for arr in (two["view0"], two["view1"], sup["view0"], ev["image"]):
        assert arr.shape == (4, 3, 16, 16) and arr.dtype == np.uint8
    assert ten["views"].shape == (4, 10, 3, 16, 16)
    assert not np.array_equal(two["view0"], two["view1"])
    x = T.normalize(torch.from_numpy(ev["image"]))
    assert x.dtype == torch.float32 and -2.2 < x.min() and x.max() < 2.7


def test_ten_crop_order_corners_centre_then_flips():
    img = torch.arange(3 * 20 * 20, dtype=torch.float32).view(3, 20, 20)
    views = T.ten_crop(img, 16)
    assert views.shape == (10, 3, 16, 16)
    assert torch.equal(views[0], img[:, :16, :16]) and torch.equal(views[1], img[:, :16, 4:])
    assert torch.equal(views[2], img[:, 4:, :16]) and torch.equal(views[3], img[:, 4:, 4:])
    assert torch.equal(views[4], img[:, 2:18, 2:18])
    for i in range(5):
        assert torch.equal(views[5 + i], views[i].flip(-1))


def test_fresh_random_views_across_batches():
    batch = {"img": uint8_batch(2), "label": np.arange(2), "idx": np.arange(2)}
    a, b = T.make_views(batch, [MocoView(16)] * 2), T.make_views(batch, [MocoView(16)] * 2)
    assert not np.array_equal(a["view0"], b["view0"])


def test_one_column_per_recipe_each_of_its_own_size():
    """A plug-in's views become columns view0, view1, ... in its order, each made by its recipe."""
    batch = {"img": uint8_batch(3, size=24), "label": np.arange(3), "idx": np.arange(3)}
    out = T.make_views(batch, [MocoView(16), MocoView(16, 0.5, 0.0), CropView(8), CropView(12, 0.3, "cifar10")])
    assert [k for k in out if k.startswith("view")] == ["view0", "view1", "view2", "view3"]
    assert [out[f"view{i}"].shape[-1] for i in range(4)] == [16, 16, 8, 12]
    assert all(out[f"view{i}"].dtype == np.uint8 and len(out[f"view{i}"]) == 3 for i in range(4))
    assert out["label"].tolist() == [0, 1, 2] and out["idx"].tolist() == [0, 1, 2]


# ---- through Ray Data ---------------------------------------------------------------------
def test_ray_pipeline_skips_and_reports_bad_files(ray_cluster, tiny_data, tmp_path):
    root = tmp_path / "mixed"
    shutil.copytree(tiny_data, root)
    bad = {"zero.jpg": b"", "text.jpg": b"hello, not a jpeg"}
    for name, payload in bad.items():
        (root / "train" / "circle" / name).write_bytes(payload)
    full = encode(Image.new("RGB", (64, 64), (1, 2, 3)), "JPEG")
    (root / "train" / "star" / "cut.jpg").write_bytes(full[: len(full) // 3])
    cfg = load_config(overrides=[f"data.root={root}", "data.resolution=16", "data.decode_size=20"]).data
    index = D.scan_dataset(cfg, ("train",))
    decoded = D.decode_split(index["train"], cfg)
    assert decoded.count == 64 and len(decoded.skipped) == 3
    assert {Path(s["path"]).name for s in decoded.skipped} == {"zero.jpg", "text.jpg", "cut.jpg"}
    strict = load_config(overrides=[f"data.root={root}", "data.strict=true", "data.decode_size=20"]).data
    with pytest.raises(D.DataError, match="unreadable"):
        D.decode_split(index["train"], strict)


def test_ray_two_views_fresh_each_epoch_without_redecoding(ray_cluster, tiny_data):
    cfg = load_config(overrides=[f"data.root={tiny_data}", "data.resolution=16", "data.decode_size=20"]).data
    decoded = D.decode_split(D.scan_split(tiny_data, "val"), cfg)
    ds = D.with_views(decoded, [MocoView(16)] * 2, cfg)
    epochs = []
    for _ in range(2):
        rows = {}
        for b in ds.iter_torch_batches(batch_size=8):
            assert b["view0"].shape[1:] == b["view1"].shape[1:] == (3, 16, 16)
            for i, v in zip(b["idx"].tolist(), b["view0"]):
                rows[i] = v
        epochs.append(rows)
    assert sorted(epochs[0]) == list(range(32)) == sorted(epochs[1])
    same = sum(torch.equal(epochs[0][i], epochs[1][i]) for i in range(32))
    assert same <= 2, "images must get new random views in the next epoch"  # (an exact repeat is rare, not impossible)
    # decode ran once: the view dataset reads the materialised decoded blocks
    assert "ReadItems" not in str(ds) and "_decode_batch" not in str(ds)
    # on the device: the decoded images as they are, for the worker to make the views
    raw = D.with_views(decoded, [MocoView(16)] * 2, cfg, on_device=True)
    batch = next(iter(raw.iter_torch_batches(batch_size=8)))
    assert set(batch) == {"img", "label", "idx"} and batch["img"].shape[1:] == (20, 20, 3)


def test_parquet_source_through_ray(ray_cluster, tiny_data, tmp_path):
    D.folder_to_parquet(tiny_data, tmp_path / "pq")
    cfg = load_config(overrides=[f"data.root={tmp_path / 'pq'}", "data.decode_size=20", "data.per_class=3"]).data
    index = D.scan_dataset(cfg, ("train",))
    decoded = D.decode_split(index["train"], cfg)
    rows = decoded.dataset.take_all()
    assert decoded.count == 12 and sorted(r["label"] for r in rows) == [0] * 3 + [1] * 3 + [2] * 3 + [3] * 3
    assert rows[0]["img"].shape == (20, 20, 3)


def test_parquet_split_decodes_on_half_a_free_cpu(ray_cluster, tiny_data, tmp_path):
    """Every task decoding a Parquet split asks for data.cpus_per_task: with all but half a CPU of the
    cluster taken, the split still decodes. (read_parquet's own metadata and sampling tasks ask for a
    whole CPU each; on an autoscaling cluster such a wait launches a node for them.)"""
    import threading

    from ray.util.placement_group import placement_group, remove_placement_group
    D.folder_to_parquet(tiny_data, tmp_path / "pq", splits=("train",), rows_per_file=20)
    cfg = load_config(overrides=[f"data.root={tmp_path / 'pq'}", "data.decode_size=20"]).data
    index = D.scan_split(tmp_path / "pq", "train")
    held = placement_group([{"CPU": ray_cluster.available_resources()["CPU"] - 0.5}])
    ray_cluster.get(held.ready(), timeout=60)
    out: dict = {}

    def decode():
        try:
            out["decoded"] = D.decode_split(index, cfg)
        except Exception as exc:  # re-raised below, in the test's thread
            out["error"] = exc

    worker = threading.Thread(target=decode, daemon=True)
    try:
        worker.start()
        worker.join(120)
        waited = worker.is_alive()
    finally:
        remove_placement_group(held)
        worker.join(120)
    assert not waited, "decoding a Parquet split waited for more than half a free CPU"
    if "error" in out:
        raise out["error"]
    decoded = out["decoded"]
    assert decoded.count == 64 and not decoded.skipped and decoded.dataset.num_blocks() == 2   # 64 / 32
    rows = decoded.dataset.select_columns(["idx", "label"]).take_all()
    assert sorted(r["idx"] for r in rows) == list(range(64))
    assert all(r["label"] == index.labels[r["idx"]] for r in rows)


def test_folder_and_parquet_on_s3_index_like_local(s3_server, tiny_data, tmp_path):
    """Image folders and Parquet in object storage, through the same code as local paths."""
    from raypipe import storage
    folder_uri = storage.upload(tiny_data, f"{s3_server}/data/tiny")
    pq_uri = f"{s3_server}/data/tiny_parquet"
    assert D.folder_to_parquet(folder_uri, pq_uri) == {"test": 32, "train": 64, "val": 32}
    local = D.scan_split(tiny_data, "train")
    for root in (folder_uri, pq_uri):
        remote = D.scan_split(root, "train")
        assert remote.classes == local.classes
        assert sorted(zip(remote.labels, [p.rsplit("/", 1)[-1] for p in remote.paths])) == \
            sorted(zip(local.labels, [Path(p).name for p in local.paths]))
    assert D.scan_split(folder_uri, "train").paths[0].startswith(folder_uri + "/train/circle/")
    assert D.scan_split(pq_uri, "val").parquet_files[0] == f"{pq_uri}/val/part-00000.parquet"
    assert not Path("s3:").exists() and not (tmp_path / "s3:").exists()   # no URI taken for a local path
    import subprocess
    import sys
    check = subprocess.run([sys.executable, "-m", "raypipe.cli", "data", "check", pq_uri], capture_output=True,
                           text=True, timeout=120)
    assert check.returncode == 0 and re.search(r"train\s+64 images\s+4 classes", check.stdout), check.stderr
    # converting into a destination that holds Parquet already: refused, nothing touched
    before = storage.read_bytes(f"{pq_uri}/val/part-00000.parquet")
    with pytest.raises(D.DataError, match=r"already holds Parquet split\(s\) \['test', 'train', 'val'\]"):
        D.folder_to_parquet(folder_uri, pq_uri)
    assert storage.read_bytes(f"{pq_uri}/val/part-00000.parquet") == before
    with pytest.raises(D.DataError, match=f"data root does not exist: {s3_server}/data/nothing"):
        D.scan_split(f"{s3_server}/data/nothing", "train")
    with pytest.raises(D.DataError, match="s3://no-such-bucket-raypipe/x \\(bucket 'no-such-bucket-raypipe' does not"):
        D.scan_split("s3://no-such-bucket-raypipe/x", "train")


def test_ray_decodes_from_s3_and_reports_bad_objects_by_uri(ray_cluster, s3_server, tiny_data):
    from raypipe import storage
    root = storage.upload(tiny_data, f"{s3_server}/data/mixed")
    storage.write_bytes(f"{root}/train/circle/zero.jpg", b"")
    cfg = load_config(overrides=[f"data.root={root}", "data.resolution=16", "data.decode_size=20"]).data
    decoded = D.decode_split(D.scan_dataset(cfg, ("train",))["train"], cfg)
    assert decoded.count == 64 and [s["path"] for s in decoded.skipped] == [f"{root}/train/circle/zero.jpg"]
    pq = f"{s3_server}/data/mixed_parquet"
    D.folder_to_parquet(root, pq, splits=("val",))
    val = D.decode_split(D.scan_split(pq, "val"), cfg)
    assert val.count == 32 and not val.skipped
    assert sorted(r["label"] for r in val.dataset.select_columns(["label"]).take_all()) == sorted(
        D.scan_split(tiny_data, "val").labels)
