"""Where the training loader's shards come from: local paths, ``pipe:`` and http(s) through
WebDataset, object stores (``s3://``, ...) through fsspec.

Object stores
    A store URL is a prefix (its ``shard-*.tar``, like a local folder: the other files of a
    render's output, ``manifest.parquet``, ``shard-000000.index.json``, ``job_summary.json``,
    are not shards), a glob or one object; ``expand_shards`` lists them afresh.
    Where the store is and who reads it comes only from the standard AWS configuration
    (``AWS_ENDPOINT_URL``, ``AWS_ACCESS_KEY_ID`` / ``AWS_SECRET_ACCESS_KEY``, ``AWS_PROFILE``,
    ``~/.aws/config``), read by botocore; :class:`ReadPolicy` sets how long reads may take.
Bounded reads
    Every request has botocore's connect and read timeouts and ``attempts`` tries (standard
    retry mode: connection errors, timeouts, 5xx and throttling, with exponential backoff).
    s3fs adds its own retry loops (5 tries, nested for range reads: 25 x ``attempts``); the
    loader's S3 file system sets them to one try, so that ``attempts`` is the bound. A shard
    whose open or read still fails is re-opened at the byte where it stopped, ``reopens`` times
    in all, then :class:`ShardUnreadableError` names it (the loader skips and counts it).
"""

from __future__ import annotations

import contextlib
import glob
import io
import logging
import os
import posixpath
import time
from dataclasses import dataclass
from typing import BinaryIO, Callable

import braceexpand
import fsspec
from webdataset.gopen import gopen, gopen_schemes

from data_pipeline.shards import SHARD_GLOB

log = logging.getLogger(__name__)

S3_PROTOCOLS = ("s3", "s3a")


@dataclass(frozen=True)
class ReadPolicy:
    """Timeouts and retries of shard reads from an object store.

    A store that stops answering costs one shard at most about
    ``(reopens + 1) x attempts x (connect or read timeout) + reopen_pause_s x (2^reopens - 1)``
    seconds (defaults: 4 x 3 x 30 + 14 s, about 6 min); one that refuses connections, seconds.
    """

    # botocore's timeouts of one connection attempt and of one socket read
    connect_timeout_s: float = 10.0
    read_timeout_s: float = 30.0
    # tries of one request (botocore's standard retry mode)
    attempts: int = 3
    # how many times one shard may be re-opened after a failed open or read before it is skipped
    reopens: int = 3
    # the pause before the first re-open, doubled before each next one
    reopen_pause_s: float = 2.0

    def __post_init__(self):
        if self.attempts < 1 or self.reopens < 0:
            raise ValueError(f"attempts must be >= 1 and reopens >= 0, got {self.attempts}, {self.reopens}")
        if min(self.connect_timeout_s, self.read_timeout_s) <= 0 or self.reopen_pause_s < 0:
            raise ValueError(f"timeouts must be > 0 and the pause >= 0, got {self}")

    def storage_options(self, protocol: str) -> dict:
        """fsspec options of a store protocol: botocore's timeouts and retries for S3, none else."""
        if protocol not in S3_PROTOCOLS:
            return {}
        return dict(config_kwargs=dict(
            connect_timeout=self.connect_timeout_s, read_timeout=self.read_timeout_s,
            retries=dict(total_max_attempts=self.attempts, mode="standard"),
        ))


class ShardUnreadableError(OSError):
    """A shard of an object store that failed to open or read after every re-open."""

    def __init__(self, url: str, failures: int, error: BaseException):
        super().__init__(f"could not read {url}: {failures} failed opens/reads, the last "
                         f"{type(error).__name__}: {error}")
        self.url = url


# ----------------------------------------------------------------------------- kinds of URL
def is_store_url(url: str) -> bool:
    """True for an object-store URL that fsspec lists and opens (``s3://``, ``az://``, ...);
    False for local paths, ``file://``, ``pipe:`` and the URLs WebDataset opens itself
    (http(s) through curl, ``gs://`` through gsutil, ...)."""
    protocol, _ = fsspec.core.split_protocol(url)
    return protocol not in (None, "file") and protocol not in gopen_schemes


def store_filesystem(url: str, reads: ReadPolicy) -> tuple[fsspec.AbstractFileSystem, str]:
    """The fsspec file system of an object-store URL, with ``reads``' timeouts and retries (the
    process's shared instance for these options), and the URL's path in it."""
    protocol, _ = fsspec.core.split_protocol(url)
    fs, path = fsspec.core.url_to_fs(url, **reads.storage_options(protocol))
    if protocol in S3_PROTOCOLS:
        fs.retries = 1  # s3fs's own retry loops off: botocore's attempts bound every request
    return fs, path


# ----------------------------------------------------------------------------- listing
class StoreListing:
    """Shards of object-store URLs, from listings made fresh for this object, each folder
    listed once."""

    def __init__(self, reads: ReadPolicy):
        self.reads = reads
        self._fresh: set[fsspec.AbstractFileSystem] = set()

    def _fs(self, url: str) -> tuple[fsspec.AbstractFileSystem, str]:
        fs, path = store_filesystem(url, self.reads)
        if fs not in self._fresh:  # fsspec keeps listings in its shared instances: drop them once
            fs.invalidate_cache()
            self._fresh.add(fs)
        return fs, path.rstrip("/")

    def _entry_type(self, fs: fsspec.AbstractFileSystem, path: str) -> str | None:
        """``"file"``, ``"directory"`` or None (missing), from the listing of ``path``'s folder
        (listed once: the many names of a brace pattern cost one listing, not one request each)."""
        parent = posixpath.dirname(path)
        if not parent:  # a bucket: a prefix
            return "directory"
        try:
            entries = fs.ls(parent, detail=True)
        except FileNotFoundError:
            return None
        return next((e["type"] for e in entries if e["name"].rstrip("/") == path), None)

    def _matches(self, fs: fsspec.AbstractFileSystem, path: str, url: str) -> list[str]:
        if glob.has_magic(path):
            found = fs.glob(path)
            if not found:
                raise FileNotFoundError(f"no shard matches {url}")
            return found
        kind = self._entry_type(fs, path)
        if kind is None:
            raise FileNotFoundError(f"shard or prefix {url} does not exist")
        if kind == "file":
            return [path]
        found = fs.glob(f"{path}/{SHARD_GLOB}")
        if not found:
            raise FileNotFoundError(f"no shard ({SHARD_GLOB}) under the prefix {url}")
        return found

    def shards(self, url: str) -> list[str]:
        """Sorted shard URLs of a prefix (its ``shard-*.tar``), a glob, or one object.

        Raises:
            FileNotFoundError naming ``url`` when it holds or matches no shard; OSError naming
            it when the store cannot be listed (after botocore's retries).
        """
        fs, path = self._fs(url)
        try:
            found = self._matches(fs, path, url)
        except FileNotFoundError:
            raise
        except Exception as exc:  # noqa: BLE001 - the store unreachable or refusing: named
            raise OSError(f"could not list {url}: {type(exc).__name__}: {exc}") from exc
        return sorted(fs.unstrip_protocol(p) for p in found)


def expand_shards(pattern: str, reads: ReadPolicy = ReadPolicy()) -> list[str]:
    """Shard URLs from a pattern.

    Accepts, separated by ``::``, each brace-expanded (``shard-{000000..000009}.tar``): a local
    directory (its ``shard-*.tar``), local globs (``data/*/shard-*.tar``) and files, object-store
    prefixes, globs and objects (``s3://bucket/shards``, ``s3://bucket/shards/shard-0000*.tar``;
    :class:`StoreListing`), ``pipe:`` commands and the URLs WebDataset opens (``http(s)://``).

    Raises:
        FileNotFoundError naming the missing shard, folder or prefix; OSError naming a store that
        cannot be listed.
    """
    urls: list[str] = []
    stores = StoreListing(reads)
    for part in pattern.split("::"):
        for item in braceexpand.braceexpand(part.strip()):
            if is_store_url(item):
                urls.extend(stores.shards(item))
            elif "://" in item or item.startswith("pipe:"):
                urls.append(item)
            elif os.path.isdir(item):
                urls.extend(sorted(glob.glob(os.path.join(item, SHARD_GLOB))))
            elif glob.has_magic(item):
                urls.extend(sorted(glob.glob(item)))
            elif os.path.exists(item):
                urls.append(item)
            else:
                raise FileNotFoundError(f"shard {item!r} (from pattern {pattern!r}) does not exist")
    if not urls:
        raise FileNotFoundError(f"no shard matches {pattern!r}")
    return urls


# ----------------------------------------------------------------------------- reading
class ReopeningReader(io.RawIOBase):
    """One shard read from start to end, re-opened at the byte where a failed open or read stopped.

    ``open_at(offset)`` returns a binary file positioned at ``offset``. Failures are counted per
    shard: after ``reads.reopens`` re-opens (pauses ``reopen_pause_s``, doubled each time) the
    next failure raises :class:`ShardUnreadableError`. A missing object or refused access
    (FileNotFoundError, PermissionError) is raised at once: no retry brings it back.
    """

    def __init__(self, url: str, open_at: Callable[[int], BinaryIO], reads: ReadPolicy):
        super().__init__()
        self.url, self._open_at, self._reads = url, open_at, reads
        self._file: BinaryIO | None = None
        self._offset = 0
        self._failures = 0

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        while True:
            try:
                if self._file is None:
                    self._file = self._open_at(self._offset)
                count = self._file.readinto(buffer)
            except (FileNotFoundError, PermissionError):
                raise
            except Exception as exc:  # noqa: BLE001 - botocore, aiohttp, OS errors: re-open
                self._failed(exc)
                continue
            self._offset += count
            return count

    def _failed(self, error: Exception) -> None:
        self._drop_file()
        self._failures += 1
        if self._failures > self._reads.reopens:
            raise ShardUnreadableError(self.url, self._failures, error) from error
        pause = self._reads.reopen_pause_s * 2 ** (self._failures - 1)
        log.warning("re-opening %s at byte %d in %.1f s (re-open %d of %d): %s: %s", self.url,
                    self._offset, pause, self._failures, self._reads.reopens, type(error).__name__, error)
        time.sleep(pause)

    def _drop_file(self) -> None:
        if self._file is not None:
            with contextlib.suppress(Exception):  # a broken connection may fail to close too
                self._file.close()
            self._file = None

    def close(self) -> None:
        self._drop_file()
        super().close()


def open_shard(url: str, reads: ReadPolicy = ReadPolicy()) -> BinaryIO:
    """A readable binary stream of one shard: local paths, ``pipe:`` and the URLs WebDataset
    opens through :func:`webdataset.gopen.gopen`; object stores through fsspec, in a
    :class:`ReopeningReader` with ``reads``' timeouts and retries."""
    if not is_store_url(url):
        return gopen(url, "rb")
    fs, path = store_filesystem(url, reads)

    def open_at(offset: int) -> BinaryIO:
        handle = fs.open(path, "rb")
        handle.seek(offset)
        return handle

    return io.BufferedReader(ReopeningReader(url, open_at, reads))
