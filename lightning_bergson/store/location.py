"""Location: where a store lives, a local directory or an object-storage URL.

Every store path the package takes (gradient stores, score arrays, EK-FAC factors) may be
a local path or a URL that fsspec understands (``s3://bucket/run.zarr``,
``gs://...``, ``az://...``) with ``storage_options`` for its filesystem (credentials,
``endpoint_url`` of an S3-compatible server, ...). Without options, the usual environment
variables apply (``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``, ``AWS_ENDPOINT_URL``,
``AWS_DEFAULT_REGION`` for S3). Zarr reads and writes remote stores through its
``FsspecStore``; the other files of a store (normalizers, preconditioners, factors) are
whole objects read and written in one request each.

Atomicity: a local file is written to a temporary name and renamed into place; an object
store's PUT of a whole object is atomic by itself (readers see the old object or the new
one, never a part), so a remote file is written in one PUT.

Example:
    >>> import tempfile
    >>> root = Location.of(tempfile.mkdtemp())
    >>> (root / "a.json").write_bytes(b"{}")
    >>> (root / "a.json").read_json(), root.remote, Location.of("s3://bucket/run.zarr").remote
    ({}, False, True)
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

__all__ = ["Location", "StorePath", "is_url"]


def is_url(path: Any) -> bool:
    """Whether ``path`` is a URL of a remote filesystem (``file://`` counts as local)."""
    text = str(path) if isinstance(path, str) else ""
    return "://" in text and not text.startswith("file://")


class Location:
    """A local directory or file, or an fsspec URL with its storage options.

    Args:
        path: A local path, a ``file://`` URL, or a remote URL (``s3://bucket/key``).
        storage_options: Options of the URL's fsspec filesystem (ignored for local paths,
            and refused with them so a misplaced option is not silently dropped).
    """

    def __init__(self, path: Any, storage_options: Mapping[str, Any] | None = None) -> None:
        if isinstance(path, Location):
            path, storage_options = path.url, storage_options or path.storage_options
        text = os.fspath(path) if not isinstance(path, str) else path
        if not isinstance(text, str) or not text:
            raise ValueError(f"a store location must be a non-empty path or URL; got {path!r}")
        self.remote = is_url(text)
        self.storage_options = dict(storage_options or {})
        if not self.remote and self.storage_options:
            raise ValueError(
                f"storage_options {sorted(self.storage_options)} were given for the local "
                f"path {text!r}; they apply to URLs only (s3://..., gs://...). Drop them or "
                "pass a URL."
            )
        if self.remote:
            self.url = text.rstrip("/")
            self.protocol = self.url.split("://", 1)[0]
            self._local: Path | None = None
            self._options = _fresh_listings(self.protocol, self.storage_options)
        else:
            self._local = Path(text[len("file://") :] if text.startswith("file://") else text)
            self.url, self.protocol = str(self._local), "file"
        self._fs: Any = None

    @classmethod
    def of(cls, path: Any, storage_options: Mapping[str, Any] | None = None) -> Location:
        """``path`` as a Location (a Location is returned as it is, without new options)."""
        if isinstance(path, Location) and not storage_options:
            return path
        return cls(path, storage_options)

    # ------------------------------------------------------------------ naming

    @property
    def local(self) -> Path:
        """The local path; a remote location raises (it has none)."""
        if self._local is None:
            raise ValueError(f"{self.url} is a remote location and has no local path")
        return self._local

    @property
    def path(self) -> Path | Location:
        """What ``.path`` attributes hold: the local :class:`Path`, or this remote location."""
        return self._local if self._local is not None else self

    @property
    def name(self) -> str:
        """The last component."""
        return self.url.rsplit("/", 1)[-1] if self.remote else self.local.name

    @property
    def parent(self) -> Location:
        """The enclosing directory (prefix)."""
        if not self.remote:
            return Location(self.local.parent)
        head = self.url.rsplit("/", 1)[0]
        return Location(head if "://" in head else self.url, self.storage_options)

    def __truediv__(self, name: str) -> Location:
        if not self.remote:
            return Location(self.local / name)
        return Location(f"{self.url}/{name.strip('/')}", self.storage_options)

    def __str__(self) -> str:
        return self.url

    def __repr__(self) -> str:
        return f"Location({self.url!r})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Location) and (self.url, self.remote) == (other.url, other.remote)

    def __hash__(self) -> int:
        return hash(self.url)

    def resolve(self) -> Location:
        """Absolute local path; a URL is already absolute."""
        return self if self.remote else Location(self.local.resolve())

    # ------------------------------------------------------------------ filesystem

    @property
    def fs(self) -> Any:
        """The fsspec filesystem of a remote location (created once)."""
        if self._fs is None:
            self._fs = _filesystem(self.url, self._options)
        return self._fs

    @property
    def key(self) -> str:
        """The path of a remote location inside its filesystem (``bucket/run.zarr``)."""
        return self.url.split("://", 1)[1]

    def exists(self) -> bool:
        """Whether a file or directory (for object storage: an object or a prefix) exists."""
        if not self.remote:
            return self.local.exists()
        self.fs.invalidate_cache(self.key)
        return bool(self.fs.exists(self.key))

    def is_file(self) -> bool:
        """Whether a file (object) exists here."""
        if not self.remote:
            return self.local.is_file()
        self.fs.invalidate_cache(self.key)
        return bool(self.fs.isfile(self.key))

    def is_dir(self) -> bool:
        """Whether a directory (for object storage: a non-empty prefix) exists here."""
        if not self.remote:
            return self.local.is_dir()
        self.fs.invalidate_cache(self.key)
        return bool(self.fs.isdir(self.key))

    def children(self) -> list[str]:
        """Names of the entries directly below this directory."""
        if not self.remote:
            return sorted(p.name for p in self.local.iterdir())
        self.fs.invalidate_cache(self.key)
        return sorted(p.rstrip("/").rsplit("/", 1)[-1] for p in self.fs.ls(self.key, detail=False))

    def read_bytes(self) -> bytes:
        """The whole file; ``FileNotFoundError`` when there is none."""
        if not self.remote:
            return self.local.read_bytes()
        return bytes(self.fs.cat_file(self.key))

    def read_json(self) -> Any:
        """The file parsed as JSON."""
        return json.loads(self.read_bytes())

    def write_bytes(self, data: bytes) -> None:
        """Replace the file atomically: a local temporary file renamed into place, or one
        PUT of the whole object (atomic on object storage)."""
        if self.remote:
            self.fs.pipe_file(self.key, data)
            return
        self.local.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{self.local.name}.", dir=self.local.parent)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            os.replace(tmp, self.local)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    def write_json(self, obj: Any) -> None:
        """Replace the file with ``obj`` as JSON (atomically, see :meth:`write_bytes`)."""
        self.write_bytes(json.dumps(obj, indent=1).encode())

    def remove(self) -> None:
        """Delete this file or directory tree (a missing one is fine)."""
        if not self.remote:
            if self.local.is_dir():
                shutil.rmtree(self.local)
            else:
                self.local.unlink(missing_ok=True)
            return
        if self.exists():
            self.fs.rm(self.key, recursive=True)
        self.fs.invalidate_cache(self.key)

    def set_aside(self) -> Location | None:
        """Move a local directory tree out of the way in O(1), for :meth:`remove` later.

        The tree is renamed to a hidden sibling (``.<name>.replaced-<random>``), so the path
        is free at once and the files can be deleted off the critical path. Returns that
        sibling, or ``None`` where nothing was moved (a remote object, a file, a missing
        path, or a rename the filesystem refused): then :meth:`remove` it directly.
        """
        if self.remote or not self.local.is_dir():
            return None
        aside = self.local.with_name(f".{self.local.name}.replaced-{os.urandom(6).hex()}")
        try:
            os.rename(self.local, aside)
        except OSError:
            return None
        return Location(str(aside))

    def set_aside_leftovers(self) -> list[Location]:
        """Hidden siblings a process that died before deleting them left by :meth:`set_aside`."""
        if self.remote or not self.local.parent.is_dir():
            return []
        prefix = f".{self.local.name}.replaced-"
        found = [x for x in self.local.parent.iterdir() if x.name.startswith(prefix)]
        return [Location(str(x)) for x in sorted(found) if x.is_dir()]

    def mkdir(self) -> None:
        """Create a local directory (object storage has no directories: nothing to do)."""
        if not self.remote:
            self.local.mkdir(parents=True, exist_ok=True)

    @contextmanager
    def reading(self) -> Iterator[Path]:
        """A local file with this file's bytes (a remote object is downloaded once)."""
        if not self.remote:
            yield self.local
            return
        with tempfile.TemporaryDirectory(prefix="lightning_bergson-") as tmp:
            local = Path(tmp) / self.name
            local.write_bytes(self.read_bytes())
            yield local

    @contextmanager
    def writing(self) -> Iterator[Path]:
        """A local path to write this file at; a remote one is uploaded (one PUT) after the
        block ends without an error, so a failed write leaves the old object."""
        if not self.remote:
            self.local.parent.mkdir(parents=True, exist_ok=True)
            yield self.local
            return
        with tempfile.TemporaryDirectory(prefix="lightning_bergson-") as tmp:
            local = Path(tmp) / self.name
            yield local
            self.write_bytes(local.read_bytes())

    def zarr_store(self, *, read_only: bool = False) -> Any:
        """What ``zarr.open_group``/``create_group`` take: the local path, or an FsspecStore."""
        if not self.remote:
            return str(self.local)
        from zarr.storage import FsspecStore

        return FsspecStore.from_url(self.url, storage_options=self._options, read_only=read_only)


LISTING_CACHES = ("s3", "s3a", "gs", "gcs", "az", "abfs", "abfss", "adl")
"""Protocols whose fsspec filesystems cache directory listings (and answer existence and
size questions from them): a store needs them off, see :func:`_fresh_listings`."""


def _fresh_listings(protocol: str, options: Mapping[str, Any]) -> dict[str, Any]:
    """``options`` with the listings cache off for filesystems that keep one.

    s3fs answers "does this object exist, how large is it" from a cached listing of its
    prefix, even when fetching it: a chunk written by another process after the listing
    would read as missing, which Zarr turns into the fill value. Every read must ask the
    server, so the cache is off, and turning it on is refused.
    """
    out = dict(options)
    if protocol not in LISTING_CACHES:
        return out
    if out.get("use_listings_cache", False):
        raise ValueError(
            "storage_options use_listings_cache=True is refused: a cached listing makes a "
            "chunk written by another process read as missing (zeros). Drop the option."
        )
    out["use_listings_cache"] = False
    return out


def _filesystem(url: str, storage_options: Mapping[str, Any]) -> Any:
    """The fsspec filesystem of ``url``, with an error naming the extra to install."""
    try:
        from fsspec.core import url_to_fs

        fs, _ = url_to_fs(url, **storage_options)
    except ImportError as err:
        raise ImportError(
            f"reading or writing {url} needs the fsspec backend of its protocol ({err}); "
            "for s3:// install `pip install lightning-bergson[remote]` (s3fs), for gs:// "
            "gcsfs, for az:// adlfs."
        ) from err
    return fs


StorePath = str | os.PathLike | Location
"""A store location as callers give it: a local path, a URL, or a :class:`Location`."""
