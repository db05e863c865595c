"""Where a job's outputs live: a local folder or an object store, through one small interface.

``Store(url)`` takes a local folder (``out``, ``/data/shards``, ``file:///data/shards``) or any
fsspec URL (``s3://bucket/prefix``, ``gs://...``). S3 settings come from the standard AWS
configuration (``AWS_ENDPOINT_URL``, ``AWS_ACCESS_KEY_ID`` / ``AWS_SECRET_ACCESS_KEY``,
``AWS_PROFILE``, ...), read by botocore, so MinIO, Ceph, R2 and AWS work alike.

Every write is whole-file and atomic, never a stream into an open remote file (fsspec's buffered
files commit what was written when an exception leaves their ``with`` block):

- a local folder: the file is written beside its target under a temporary name, fsynced and
  renamed onto it (:mod:`common.atomic`);
- an object store: the finished local file is uploaded whole, in one PUT, or in a multipart
  upload completed at the end (s3fs does that above 100 MB, and aborts it on an error). An
  upload cut short by a kill leaves an unfinished multipart upload, invisible to readers;
  :meth:`Store.remove_unfinished_writes` aborts them when the job's single writer starts again.

Transient errors (the store unreachable, throttled) are retried ``RETRIES`` times with a growing
pause; after that a :class:`StorageError` names the URL that could not be written or read.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator, TypeVar

import fsspec

from common.atomic import atomic_path

RETRIES = 5  # tries after the first; pauses 1, 2, 4, 8, 16 s (31 s in all)
RETRY_PAUSE_S = 1.0
T = TypeVar("T")


class StorageError(OSError):
    """A read or write of ``url`` that failed after every retry."""

    def __init__(self, url: str, action: str, error: BaseException):
        super().__init__(f"could not {action} {url}: {type(error).__name__}: {error}")
        self.url = url


def is_remote(url: str | Path) -> bool:
    """True for an fsspec URL other than ``file://`` (``s3://``, ``gs://``, ...)."""
    text = str(url)
    return "://" in text and not text.startswith("file://")


class Store:
    """A folder of named files: ``name`` is a file name directly under the store's root."""

    def __init__(self, url: str | Path, retries: int = RETRIES, retry_pause_s: float = RETRY_PAUSE_S):
        text = str(url)
        self.url = text.rstrip("/")
        self.remote = is_remote(text)
        self.retries, self.retry_pause_s = retries, retry_pause_s
        if self.remote:
            self.fs, self.root = fsspec.core.url_to_fs(self.url)
        else:
            self.fs, self.root = fsspec.filesystem("file"), str(Path(text.removeprefix("file://")).absolute())
            Path(self.root).mkdir(parents=True, exist_ok=True)

    # --------------------------------------------------------------- names and URLs
    def url_of(self, name: str) -> str:
        """The full URL (or local path) of ``name``."""
        return f"{self.url}/{name}" if self.remote else str(Path(self.root) / name)

    def _path(self, name: str) -> str:
        return f"{self.root}/{name}"

    def __str__(self) -> str:
        return self.url

    # --------------------------------------------------------------- retries
    def _retry(self, action: str, name: str, fn: Callable[[], T]) -> T:
        for attempt in range(self.retries + 1):
            try:
                return fn()
            except FileNotFoundError:
                raise
            except Exception as error:  # noqa: BLE001 - transient store errors, retried then named
                if attempt == self.retries:
                    raise StorageError(self.url_of(name), action, error) from error
                pause = self.retry_pause_s * 2**attempt
                print(f"storage: could not {action} {self.url_of(name)} ({type(error).__name__}); "
                      f"retry {attempt + 1}/{self.retries} in {pause:.0f} s", file=sys.stderr, flush=True)
                self.fs.invalidate_cache()
                time.sleep(pause)
        raise AssertionError("unreachable")

    # --------------------------------------------------------------- reading
    def list(self, pattern: str = "*") -> list[str]:
        """Names under the root matching a glob ``pattern``, sorted (a fresh listing, no cache)."""
        def listing() -> list[str]:
            self.fs.invalidate_cache()
            return sorted(p.rsplit("/", 1)[-1] for p in self.fs.glob(self._path(pattern)))

        return self._retry("list", pattern, listing)

    def read_bytes(self, name: str) -> bytes:
        """The whole file. Raises FileNotFoundError when it does not exist."""
        return self._retry("read", name, lambda: self.fs.cat_file(self._path(name)))

    def open(self, name: str):
        """A binary stream of ``name`` for reading in one pass (the open is retried)."""
        return self._retry("open", name, lambda: self.fs.open(self._path(name), "rb"))

    # --------------------------------------------------------------- writing
    @contextmanager
    def staged(self, name: str) -> Iterator[Path]:
        """A local path to build ``name`` in before :meth:`commit_file` puts it into the store:
        beside the target in a local folder (so that committing is a rename), in a fresh
        temporary folder for an object store. Removed, with that folder, whatever happens."""
        staging = Path(tempfile.mkdtemp(prefix="ouroboros3d-staging-")) if self.remote else Path(self.root)
        local = staging / f".{name}.{os.getpid()}.tmp"
        try:
            yield local
        finally:
            local.unlink(missing_ok=True)
            if self.remote:
                shutil.rmtree(staging, ignore_errors=True)

    def commit_file(self, local: str | Path, name: str) -> None:
        """Move a finished local file into the store under ``name``, whole and atomically; the
        local file is gone afterwards. Local store: fsync and rename (a copy first when it lies
        on another file system). Object store: one upload of the finished file."""
        local = Path(local)
        if not self.remote:
            target = Path(self._path(name))
            with open(local, "rb") as handle:
                os.fsync(handle.fileno())
            try:
                os.replace(local, target)
            except OSError:  # another file system: copy beside the target, then rename
                with atomic_path(target) as tmp:
                    shutil.copyfile(local, tmp)
                local.unlink()
            return
        self._retry("write", name, lambda: self.fs.put_file(str(local), self._path(name)))
        local.unlink()

    def write_bytes(self, name: str, data: bytes) -> None:
        """Write a small file whole and atomically (local: temporary + rename; remote: one PUT)."""
        if not self.remote:
            with atomic_path(self._path(name)) as tmp:
                with open(tmp, "wb") as handle:
                    handle.write(data)
                    handle.flush()
                    os.fsync(handle.fileno())
            return
        self._retry("write", name, lambda: self.fs.pipe_file(self._path(name), data))

    def remove(self, name: str) -> None:
        """Delete ``name`` (nothing happens when it does not exist)."""
        def remove() -> None:
            try:
                self.fs.rm_file(self._path(name))
            except FileNotFoundError:
                pass

        self._retry("remove", name, remove)

    # --------------------------------------------------------------- recovery
    def remove_unfinished_writes(self) -> list[str]:
        """What writes cut short by a kill left behind, removed; returns their names. A local
        folder: temporary files (``*.tmp``, hidden or not). An S3 store: multipart uploads left
        unfinished under the prefix, aborted. Only for the store's single writer, at its start."""
        if not self.remote:
            stale = sorted({*Path(self.root).glob("*.tmp"), *Path(self.root).glob(".*.tmp")})
            for path in stale:
                path.unlink(missing_ok=True)
            return [p.name for p in stale]
        protocols = self.fs.protocol if isinstance(self.fs.protocol, tuple) else (self.fs.protocol,)
        if not {"s3", "s3a"} & set(protocols):
            return []
        bucket, _, prefix = self.root.partition("/")

        def abort() -> list[str]:
            aborted = []
            listing = self.fs.call_s3("list_multipart_uploads", Bucket=bucket,
                                      Prefix=f"{prefix}/" if prefix else "")
            for upload in listing.get("Uploads", []):
                self.fs.call_s3("abort_multipart_upload", Bucket=bucket, Key=upload["Key"],
                                UploadId=upload["UploadId"])
                aborted.append(upload["Key"].rsplit("/", 1)[-1])
            return aborted

        return self._retry("abort unfinished uploads under", "", abort)
