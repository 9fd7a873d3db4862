"""Reading a Parquet split in raypipe's own tasks: the split cut into read units (a file and a run of
its row groups), and the rows of a unit that a split's index kept. (``ray.data.read_parquet`` is not
used: its metadata and sampling tasks ask for a whole CPU each, which no argument changes.)"""
from __future__ import annotations

from . import storage
from .errors import DataError

ROW_GROUP = 256   # rows per row group that `raypipe data to-parquet` writes: the smallest unit a read task takes


def read_units(files: list[str], parts: int) -> list[dict]:
    """About ``parts`` read units of a Parquet split: each a file and a run of its row groups (a file
    written with one row group is one unit)."""
    import pyarrow.parquet as pq

    groups = {}
    for f in files:
        fs, path = storage.filesystem(f)
        try:
            with fs.open_input_file(path) as handle:
                groups[f] = pq.ParquetFile(handle).metadata.num_row_groups
        except (OSError, ValueError) as exc:   # pyarrow's errors for a missing, torn or foreign file
            raise DataError(f"{f}: not a readable Parquet file: {exc}") from exc
    step = max(1, -(-sum(groups.values()) // parts))
    return [{"file": f, "row_groups": list(range(i, min(i + step, g)))} for f, g in groups.items()
            for i in range(0, g, step)]


def rows(unit: dict, wanted: dict[str, int], labels: list[int]):
    """The rows of one read unit (``read_units``) that the split's index kept (``wanted``: path ->
    position), streamed a few hundred rows at a time."""
    import pyarrow.parquet as pq

    fs, path = storage.filesystem(unit["file"])
    try:
        with fs.open_input_file(path) as handle:
            batches = pq.ParquetFile(handle).iter_batches(batch_size=ROW_GROUP, row_groups=unit["row_groups"],
                                                          columns=["image", "path"])
            for batch in batches:
                for image, p in zip(batch.column("image").to_pylist(), batch.column("path").to_pylist()):
                    if p in wanted:
                        yield {"image": image, "path": p, "label": labels[wanted[p]], "idx": wanted[p]}
    except (OSError, ValueError) as exc:
        raise DataError(f"{unit['file']}: not a readable Parquet file: {exc}") from exc
