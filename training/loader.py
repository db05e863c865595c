"""Streaming training loader: WebDataset shards (docs/design.md section 3) -> training batches (docs/interfaces.md).

One shard sample is one (object, orbit) with 16 frames. Per sample the loader picks the
condition frame ``s`` (seeded), keeps frames ``s, s+2, ..., s+14 (mod 16)`` (docs/design.md section 4),
decodes them into a ``data_pipeline.render.OrbitRender`` (the CCM only with ``LoaderConfig.ccm``),
composites RGBA over the background, resizes to the model resolution, and expresses cameras
(and CCM) in the model frame of the condition view (``conventions.to_condition_frame``). Images
are in [0, 1] (docs/interfaces.md, "Values from shard to network").

Streaming and determinism
    Each rank and DataLoader worker reads an endless stream of epochs. Epoch ``e`` shuffles
    the shard list with ``(seed, e)`` (same on every rank), splits it between ranks
    (``wds.split_by_node``) and workers, reads the tars sequentially (``r|*``, never a whole
    shard in memory), shuffles samples in a buffer seeded by ``(seed, e, rank, role)``, and only
    then decodes (PNG decoding happens after the shuffle, so skipping costs no decoding).
    With fewer shards than ``ranks x workers`` the split is done on samples instead of shards.
    The streams are endless, so every rank yields a batch at every step: no rank runs out.
    Shards come from local paths, pipes, http(s) or object stores (``s3://`` prefixes, globs,
    objects), listed and opened by :mod:`training.shard_store` (timeouts, bounded retries,
    re-opening at the failed byte).
Position and resume
    Every sample carries its ``(epoch, index)`` in its worker's shuffled stream. The loader
    records, per worker *role*, the position of the last sample the training loop consumed,
    plus the number of batches consumed. A resumed loader skips, per role, everything up to
    that position (without decoding) and rotates the worker roles by ``batches % workers`` so
    that PyTorch's round-robin over workers continues with the same role it would have used.
    Resuming requires the same world size and worker count (and, to replay the epoch in
    progress exactly, the same shard names: a different list is a warning).
Corrupt samples and broken shards
    A bad PNG, a missing member or a wrong shape skips the sample; a tar that cannot be opened
    or read to its end (garbage, truncated, a store still unreachable after the retries) skips
    the rest of that shard. Both are logged with the key / URL and counted
    (``StreamingLoader.skipped``), never raised; an epoch without a valid sample is an error.
"""

from __future__ import annotations

import hashlib
import logging
import random
import zlib
from dataclasses import dataclass, field
from itertools import islice
from typing import Callable, Iterator

import cv2
import numpy as np
import torch
import webdataset as wds
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from common.conventions import (
    NUM_FRAMES,
    TRAIN_NUM_VIEWS,
    training_frame_indices,
)
from common.orbit import OrbitRender
from common.training_views import to_training_views
from data_pipeline.shards import CorruptSampleError, decode_sample, iter_shard
from training.shard_store import ReadPolicy, expand_shards, open_shard

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LoaderConfig:
    """What the loader produces and how it streams.

    resolution: model image size (square). background: RGB in [0, 1] the RGBA frames are
    composited over. ccm: decode the CCM members and add ``ccm`` to the batch (no training
    objective reads it; its 16-bit PNGs are the most expensive members to decode). batch_size:
    samples per batch on one rank (the micro batch). reads: timeouts and retries of shards in an
    object store (training.shard_store.ReadPolicy).
    """

    resolution: int
    batch_size: int = 1
    num_views: int = TRAIN_NUM_VIEWS
    background: tuple[float, float, float] = (1.0, 1.0, 1.0)
    ccm: bool = False
    shuffle_buffer: int = 64
    shuffle_initial: int = 16
    num_workers: int = 2
    seed: int = 0
    reads: ReadPolicy = ReadPolicy()


# ----------------------------------------------------------------------------- shard files
def shard_files(urls: list[str], reads: ReadPolicy, on_broken: Callable[[str, Exception], None]
                ) -> Iterator[dict]:
    """The tar members of each shard in turn (dicts ``fname``, ``data`` bytes, ``__url__``),
    each shard followed by WebDataset's end-of-shard marker ``{}``.

    A shard that cannot be opened, or read to its end (a truncated or garbage tar, a store that
    stays unreachable after :class:`ReadPolicy`'s retries), is reported once, ``on_broken(url,
    error)``, and the rest of it dropped; the members read before stay.
    """
    for url in urls:
        try:
            for member in wds.tariterators.tar_file_iterator(open_shard(url, reads)):
                member["__url__"] = url
                yield member
        except Exception as exc:  # noqa: BLE001 - reported and counted by on_broken
            on_broken(url, exc)
        yield {}


# ----------------------------------------------------------------------------- one sample
def decode_views(sample: dict, frames, ccm: bool = False) -> OrbitRender:
    """Decode the selected frames of one raw shard sample (members of docs/design.md section 3).

    Every member of the contract must be present (an incomplete sample is corrupt), but only
    the selected frames' PNGs are decoded, their CCM PNGs only with ``ccm``.

    Args:
        sample: WebDataset sample dict (``__key__`` and ``<ii>.rgba.png``, ``<ii>.ccm.png``,
            ``cameras.npy``, ``intrinsics.npy``, ``json`` as bytes).
        frames: [V] frame indices.
    Returns:
        OrbitRender of the V frames (``shards.decode_sample``), square frames.
    Raises:
        CorruptSampleError
    """
    orbit = decode_sample(sample, frames, ccm)
    height, width = orbit.rgba.shape[1:3]
    if height != width:
        raise CorruptSampleError(orbit.key, f"{orbit.key}.{frames[0]:02d}.rgba.png",
                                 f"not square: {(height, width)}")
    return orbit


def orbit_views(pattern: str, resolution: int, background: float) -> Iterator[tuple[str, dict]]:
    """Every orbit of the shards as training views, in shard order, for scores and benchmarks.

    Both 8-frame groups of each orbit (condition frames 0 and 1), not shuffled, read once.

    Args:
        pattern: shards (``expand_shards``: paths, globs, ``s3://``). resolution: model size.
        background: the grey in [0, 1] the frames are composited over (the model config's).
    Yields:
        (sample key, ``to_training_views`` dict: ``images`` [8, 3, R, R] in [0, 1], ``c2w``, ``K``).
    """
    for url in expand_shards(pattern):
        for sample in iter_shard(url):
            for start in (0, 1):
                views = decode_views(sample, training_frame_indices(start))
                yield sample["__key__"], to_training_views(views, resolution, [background] * 3)


def condition_frame(seed: int, epoch: int, key: str) -> int:
    """The condition frame ``s`` of a sample: uniform in 0..15, fixed by (seed, epoch, key)."""
    rng = np.random.default_rng([seed, epoch, zlib.crc32(key.encode())])
    return int(rng.integers(NUM_FRAMES))


# ----------------------------------------------------------------------------- the stream
@dataclass
class _Skips:
    samples: int = 0
    shards: int = 0


@dataclass
class _Stream:
    """Where one worker role stands: last consumed (epoch, index) and its skip counts."""

    epoch: int = 0
    index: int = -1
    skips: _Skips = field(default_factory=_Skips)


def rng_seed(*parts: int) -> int:
    """One 32-bit seed from integers (seed, epoch, rank, ...), stable across runs and resumes."""
    return int(np.random.SeedSequence(list(parts)).generate_state(1)[0])


class ShardStream(IterableDataset):
    """Endless per-worker stream of ``(training sample, position)`` (see the module docstring)."""

    def __init__(self, urls: list[str], cfg: LoaderConfig, start: dict[int, _Stream] | None = None,
                 role_offset: int = 0):
        self.urls, self.cfg = list(urls), cfg
        self.start = start or {}
        self.role_offset = role_offset

    def _role(self) -> tuple[int, int, int, int]:
        rank, world, _, _ = wds.utils.pytorch_worker_info()
        info = get_worker_info()
        workers = info.num_workers if info is not None else 1
        worker = info.id if info is not None else 0
        return rank, world, (worker + self.role_offset) % workers, workers

    def _epoch_samples(self, epoch: int, rank: int, world: int, role: int, workers: int,
                       skips: _Skips):
        cfg = self.cfg
        urls = list(self.urls)
        random.Random(rng_seed(cfg.seed, epoch)).shuffle(urls)
        by_shard = len(urls) >= world * workers

        def on_broken(url: str, exc: Exception) -> None:
            skips.shards += 1
            log.warning("skipping (the rest of) shard %s (rank %d, worker role %d, epoch %d; %d "
                        "shard(s) skipped so far): %s: %s", url, rank, role, epoch, skips.shards,
                        type(exc).__name__, exc)

        def on_bad_member(exc: Exception) -> bool:
            log.warning("dropping a tar member (rank %d, worker role %d): %s", rank, role, exc)
            return True

        if by_shard:
            urls = list(islice(wds.split_by_node(urls), role, None, workers))
        samples = wds.tariterators.group_by_keys(shard_files(urls, cfg.reads, on_broken),
                                                 handler=on_bad_member)
        if not by_shard:
            samples = islice(wds.split_by_node(samples), role, None, workers)
        rng = random.Random(rng_seed(cfg.seed, epoch, rank, role))
        return wds.filters._shuffle(iter(samples), cfg.shuffle_buffer, cfg.shuffle_initial, rng=rng)

    def __iter__(self):
        rank, world, role, workers = self._role()
        state = self.start.get(role, _Stream())
        skips = _Skips(state.skips.samples, state.skips.shards)
        epoch = state.epoch
        while True:
            seen = good = 0
            for index, raw in enumerate(self._epoch_samples(epoch, rank, world, role, workers, skips)):
                seen += 1
                if epoch == state.epoch and index <= state.index:
                    good += 1  # consumed before the resume
                    continue
                key = raw.get("__key__", "?")
                try:
                    s = condition_frame(self.cfg.seed, epoch, key)
                    orbit = decode_views(raw, training_frame_indices(s, self.cfg.num_views), self.cfg.ccm)
                    sample = to_training_views(orbit, self.cfg.resolution, self.cfg.background)
                except (ValueError, np.linalg.LinAlgError) as exc:  # CorruptSampleError is a ValueError
                    skips.samples += 1
                    log.warning("skipping corrupt sample %s from %s: %s", key, raw.get("__url__"), exc)
                    continue
                good += 1
                sample["key"] = key
                yield sample, (role, epoch, index, skips.samples, skips.shards)
            if seen == 0 or good == 0:
                raise RuntimeError(
                    f"rank {rank} worker role {role}: epoch {epoch} gave "
                    f"{'no samples' if seen == 0 else 'no valid sample'} from {len(self.urls)} "
                    f"shard(s) ({self.urls[:3]}...)"
                )
            epoch += 1


def collate(items: list) -> dict:
    """Stack samples into the training batch (docs/interfaces.md); keep the last sample's position."""
    samples = [s for s, _ in items]
    batch = {k: torch.stack([s[k] for s in samples]) for k in samples[0] if k != "key"}
    batch["key"] = [s["key"] for s in samples]
    return dict(batch=batch, position=items[-1][1])


def _worker_init(_):
    torch.set_num_threads(1)


def _single_threaded_opencv() -> None:
    """One OpenCV thread for decoding, here and (inherited) in the workers forked after: the
    workers are the parallelism. Set in the parent, before the fork: once this process had
    decoded large frames itself (``num_workers=0``), a worker that resized OpenCV's thread pool
    (``cv2.setNumThreads`` in the child) hung for ever (384 and 512 px frames; opencv-python 4.x)."""
    cv2.setNumThreads(1)


class StreamingLoader:
    """Endless iterator of training batches with a resumable position.

    ``iter(loader)`` yields batches dict(images [B,V,3,R,R] in [0,1], alphas [B,V,1,R,R],
    c2w [B,V,4,4], K [B,V,3,3], key list[str], and ccm [B,V,3,R,R] with ``LoaderConfig.ccm``);
    :meth:`state_dict` is the position after the last batch yielded.
    """

    def __init__(self, shards: str | list[str], cfg: LoaderConfig):
        """shards: a pattern (:func:`training.shard_store.expand_shards`) or a list of shard URLs."""
        self.urls = expand_shards(shards, cfg.reads) if isinstance(shards, str) else list(shards)
        self.cfg = cfg
        self.batches = 0
        self.streams: dict[int, _Stream] = {}

    def _shard_names_digest(self) -> str:
        """What the streams depend on: the shards' names in order (not where they are stored)."""
        names = "\n".join(url.rsplit("/", 1)[-1] for url in self.urls)
        return hashlib.sha256(names.encode()).hexdigest()[:16]

    @property
    def skipped(self) -> dict[str, int]:
        """Corrupt samples and broken shards skipped so far (this rank, all workers)."""
        return dict(
            samples=sum(s.skips.samples for s in self.streams.values()),
            shards=sum(s.skips.shards for s in self.streams.values()),
        )

    def state_dict(self) -> dict:
        _, world, _, _ = wds.utils.pytorch_worker_info()
        return dict(
            batches=self.batches,
            num_workers=self.cfg.num_workers,
            world_size=world,
            shard_names=self._shard_names_digest(),
            streams={
                role: dict(epoch=s.epoch, index=s.index, skipped_samples=s.skips.samples,
                           skipped_shards=s.skips.shards)
                for role, s in self.streams.items()
            },
        )

    def load_state_dict(self, state: dict) -> None:
        _, world, _, _ = wds.utils.pytorch_worker_info()
        if state["num_workers"] != self.cfg.num_workers or state["world_size"] != world:
            raise ValueError(
                f"loader position saved with {state['world_size']} rank(s) x {state['num_workers']} "
                f"worker(s) cannot resume with {world} x {self.cfg.num_workers}"
            )
        if state.get("shard_names", self._shard_names_digest()) != self._shard_names_digest():
            log.warning("the shard list differs from the one the loader position was saved with "
                        "(now %d shard(s)): the epoch in progress is not replayed exactly", len(self.urls))
        self.batches = int(state["batches"])
        self.streams = {
            int(role): _Stream(s["epoch"], s["index"], _Skips(s["skipped_samples"], s["skipped_shards"]))
            for role, s in state["streams"].items()
        }

    def __iter__(self) -> Iterator[dict]:
        _single_threaded_opencv()
        workers = max(self.cfg.num_workers, 1)
        dataset = ShardStream(self.urls, self.cfg, dict(self.streams), self.batches % workers)
        loader = DataLoader(
            dataset,
            batch_size=self.cfg.batch_size,
            num_workers=self.cfg.num_workers,
            collate_fn=collate,
            worker_init_fn=_worker_init,
            persistent_workers=False,
            prefetch_factor=2 if self.cfg.num_workers > 0 else None,
        )
        for item in loader:
            role, epoch, index, skipped_samples, skipped_shards = item["position"]
            self.streams[role] = _Stream(epoch, index, _Skips(skipped_samples, skipped_shards))
            self.batches += 1
            yield item["batch"]
