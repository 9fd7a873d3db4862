"""One storage layer for every path raypipe reads or writes: local paths and ``s3://`` / ``gs://``
URIs alike, through ``pyarrow.fs`` (what Ray uses), configured the standard way: AWS / GCP
environment variables (``AWS_ENDPOINT_URL`` for S3-compatible stores), instance profiles.

A location is a plain string. Never pass a URI through ``pathlib.Path``: it turns ``s3://b`` into
``s3:/b``. Libraries that only write local files (torch.save, matplotlib, TensorBoard) write to a
local folder that :func:`upload` then copies to the location.
"""
from __future__ import annotations

import functools
import json
import os
import posixpath
import shutil
import tempfile
from pathlib import Path

from .errors import StorageError

SCHEMES = ("s3", "gs", "gcs", "hdfs", "abfs", "abfss")


def is_uri(location: str | os.PathLike) -> bool:
    return "://" in str(location)


def normalize(location: str | os.PathLike) -> str:
    """An absolute local path, or the URI as given (trailing slash removed)."""
    location = str(location)
    if not is_uri(location):
        return str(Path(location).expanduser().resolve())
    scheme = location.split("://", 1)[0]
    if scheme not in SCHEMES and scheme != "file":
        raise StorageError(f"unsupported storage URI {location!r}: use a local path or one of "
                           f"{', '.join(s + '://' for s in SCHEMES[:2])}")
    return location.rstrip("/")


def join(root: str, *parts: str) -> str:
    """``root/part/...`` for a local path or a URI."""
    if is_uri(root):
        return posixpath.join(str(root).rstrip("/"), *parts)
    return str(Path(root, *parts))


def name(location: str) -> str:
    return posixpath.basename(str(location).rstrip("/"))


def filesystem(location: str):
    """(pyarrow FileSystem, path inside it) for a location; one client per bucket and process."""
    import pyarrow.fs as pafs

    if not is_uri(location):
        return pafs.LocalFileSystem(), str(Path(location).resolve())
    location = normalize(location)
    scheme, rest = location.split("://", 1)
    if "?" in rest or scheme in ("file", "hdfs"):  # options in the URI: no sharing
        try:
            return pafs.FileSystem.from_uri(location)
        except Exception as exc:
            raise StorageError(f"cannot open {location}: {exc}") from exc
    bucket = rest.split("/", 1)[0]
    return _bucket_filesystem(scheme, bucket), rest


@functools.lru_cache(maxsize=None)
def _bucket_filesystem(scheme: str, bucket: str):
    import pyarrow.fs as pafs
    try:
        return pafs.FileSystem.from_uri(f"{scheme}://{bucket}")[0]
    except Exception as exc:
        raise StorageError(f"cannot open {scheme}://{bucket}: {exc}") from exc


def _info(location: str):
    fs, path = filesystem(location)
    try:
        return fs.get_file_info(path)
    except OSError as exc:
        raise StorageError(_explain(location, exc)) from exc


def _explain(location: str, exc: Exception) -> str:
    text = str(exc)
    hint = ""
    if "NoSuchBucket" in text or "does not exist" in text.lower():
        hint = " (does the bucket exist?)"
    elif any(k in text for k in ("AccessDenied", "InvalidAccessKeyId", "credentials", "SignatureDoesNotMatch")):
        hint = (" (check the credentials: AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY, ~/.aws or the node's "
                "instance profile; AWS_ENDPOINT_URL for an S3-compatible store)")
    return f"{location}: {text.strip()}{hint}"


def location_of(filesystem, path: str) -> str:
    """A (pyarrow filesystem, path) pair, e.g. a Ray Checkpoint's, as a location string."""
    scheme = {"s3": "s3", "gcs": "gs"}.get(filesystem.type_name)
    return f"{scheme}://{path}" if scheme else path


def exists(location: str) -> bool:
    import pyarrow.fs as pafs
    return _info(location).type != pafs.FileType.NotFound


def is_file(location: str) -> bool:
    import pyarrow.fs as pafs
    return _info(location).type == pafs.FileType.File


def is_dir(location: str) -> bool:
    """A folder (for object stores: a prefix with objects under it)."""
    import pyarrow.fs as pafs
    return _info(location).type == pafs.FileType.Directory


def list_dir(location: str) -> list[tuple[str, bool]]:
    """[(name, is_folder)] directly under a folder, sorted by name."""
    import pyarrow.fs as pafs

    fs, path = filesystem(location)
    try:
        infos = fs.get_file_info(pafs.FileSelector(path, allow_not_found=True))
    except OSError as exc:
        raise StorageError(_explain(location, exc)) from exc
    return sorted((i.base_name, i.type == pafs.FileType.Directory) for i in infos)


def read_bytes(location: str) -> bytes:
    fs, path = filesystem(location)
    try:
        with fs.open_input_stream(path) as f:
            return f.read()
    except FileNotFoundError as exc:
        raise FileNotFoundError(f"not found: {location}") from exc
    except OSError as exc:
        raise StorageError(_explain(location, exc)) from exc


def write_bytes(location: str, data: bytes) -> str:
    """Write a whole file; a local file is replaced atomically, an object store PUT is atomic."""
    fs, path = filesystem(location)
    try:
        if not is_uri(location):
            Path(path).parent.mkdir(parents=True, exist_ok=True)
            tmp = path + ".partial"
            Path(tmp).write_bytes(data)
            os.replace(tmp, path)
        else:
            with fs.open_output_stream(path) as f:
                f.write(data)
    except OSError as exc:
        raise StorageError(_explain(location, exc)) from exc
    return location


def remove_dir(location: str) -> None:
    """Delete a folder and everything under it (nothing to do when it is absent)."""
    fs, path = filesystem(location)
    try:
        fs.delete_dir(path)
    except FileNotFoundError:
        pass
    except OSError as exc:
        raise StorageError(_explain(location, exc)) from exc


def read_text(location: str) -> str:
    return read_bytes(location).decode()


def write_text(location: str, text: str) -> str:
    return write_bytes(location, text.encode())


def read_json(location: str) -> dict | None:
    """The JSON object at a location, or None when there is none."""
    return json.loads(read_text(location)) if is_file(location) else None


def write_json(location: str, obj) -> str:
    return write_text(location, json.dumps(obj, indent=2, default=str))


def upload(local: str | Path, location: str) -> str:
    """Copy a local file or folder to a location (nothing to do when it is the same place)."""
    import pyarrow.fs as pafs

    local = Path(local).resolve()
    if not is_uri(location) and Path(location).resolve() == local:
        return location
    fs, path = filesystem(location)
    try:
        if local.is_dir():
            if not is_uri(location):
                Path(path).mkdir(parents=True, exist_ok=True)
            pafs.copy_files(str(local), path, destination_filesystem=fs)
        else:
            write_bytes(location, local.read_bytes())
    except OSError as exc:
        raise StorageError(_explain(location, exc)) from exc
    return location


def download(location: str, local: str | Path) -> Path:
    """Copy a file or folder at a location to a local path."""
    import pyarrow.fs as pafs

    local = Path(local)
    if not is_uri(location):
        src = Path(location)
        if src.resolve() != local.resolve():
            (shutil.copytree(src, local, dirs_exist_ok=True) if src.is_dir() else shutil.copyfile(src, local))
        return local
    fs, path = filesystem(location)
    try:
        if fs.get_file_info(path).type == pafs.FileType.Directory:
            local.mkdir(parents=True, exist_ok=True)
            pafs.copy_files(path, str(local.resolve()), source_filesystem=fs)
        else:
            local.parent.mkdir(parents=True, exist_ok=True)
            local.write_bytes(read_bytes(location))
    except OSError as exc:
        raise StorageError(_explain(location, exc)) from exc
    return local


def local_file(location: str) -> Path:
    """A local path to read a file at a location from (a temporary copy for a URI)."""
    if not is_uri(location):
        return Path(location)
    return download(location, Path(tempfile.mkdtemp(prefix="raypipe-")) / name(location))


def check_writable(location: str) -> None:
    """Fail now, naming the URI, when a location cannot be written (bad bucket or credentials)."""
    if not is_uri(location):
        return
    probe = join(location, ".raypipe-write-check")
    try:
        write_bytes(probe, b"ok")
        fs, path = filesystem(probe)
        fs.delete_file(path)
    except (StorageError, OSError) as exc:
        raise StorageError(f"cannot write to {location}: {str(exc).split(': ', 1)[-1]}") from exc


def missing_hint(location: str) -> str:
    """Why a location that does not exist may be missing: its bucket (for a URI), else ''."""
    if not is_uri(location):
        return ""
    scheme, rest = normalize(location).split("://", 1)
    bucket = rest.split("/", 1)[0]
    if "/" in rest and not exists(f"{scheme}://{bucket}"):
        return f" (bucket {bucket!r} does not exist or these credentials cannot see it)"
    return ""


class Outputs:
    """Where a job's files go: ``location`` (a local folder or a URI) holds every file and is the
    only thing read back (resuming from a fresh node needs nothing else); ``scratch`` is a local
    folder for files that libraries can only write locally, published with :meth:`publish`.
    For a local location, scratch is the location itself and publishing copies nothing."""

    def __init__(self, location: str, scratch: Path | None = None):
        self.location = normalize(location)
        if scratch is None:
            scratch = Path(tempfile.mkdtemp(prefix="raypipe-")) if is_uri(location) else Path(self.location)
        self.scratch = scratch

    def path(self, *parts: str) -> str:
        return join(self.location, *parts)

    def local(self, *parts: str) -> Path:
        """A local path for a file to be published; its parent folder exists."""
        p = self.scratch.joinpath(*parts)
        p.parent.mkdir(parents=True, exist_ok=True)
        return p

    def publish(self, *parts: str) -> str:
        """Copy the local file or folder ``parts`` to the location; -> its location."""
        return upload(self.local(*parts), self.path(*parts))

    def read_record(self, name_: str) -> dict | None:
        return read_json(self.path(f"{name_}.json"))

    def write_record(self, name_: str, record: dict) -> dict:
        write_json(self.path(f"{name_}.json"), record)
        return record
