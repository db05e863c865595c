"""Loader throughput: samples/s of training.loader on 512 px shards (8 RGBA frames decoded, as the
trainer's loader; ``--ccm`` decodes the 8 CCM frames too).

    python bench/bench_loader.py [--shards DIR | s3://bucket/prefix] [--resolution 512]
        [--model-resolution 512] [--samples 24] [--workers 0 1 2] [--ccm]
    python bench/bench_loader.py --compare-s3 [--shards DIR] [--repeats 3] ...

Without ``--shards`` it writes synthetic shards in the docs/design.md section 3 format: an object disc
with a smooth colour gradient plus 8-bit noise (so PNG compression is no easier than on a
render), CCM with a gradient. ``--workers 0`` measures one process (= the rate of one worker).
``--shards s3://...`` reads an object store (the standard AWS configuration says which).
``--compare-s3`` starts a local S3 server (moto, on loopback, in its own process), uploads the
local shards to it and measures the loader from there and from the local folder, alternately,
``--repeats`` times each: the medians and their ratio.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # the checkout's packages, however the script is started

import cv2  # noqa: E402
import fsspec  # noqa: E402
import numpy as np  # noqa: E402
import webdataset as wds  # noqa: E402

from common import conventions as cv  # noqa: E402
from data_pipeline.shards import SHARD_GLOB  # noqa: E402
from training.loader import LoaderConfig, StreamingLoader  # noqa: E402


def synthetic_sample(uid: str, size: int, rng: np.random.Generator) -> dict:
    def png(image):
        code = cv2.COLOR_RGBA2BGRA if image.shape[2] == 4 else cv2.COLOR_RGB2BGR
        return cv2.imencode(".png", cv2.cvtColor(image, code))[1].tobytes()

    def npy(a):
        f = io.BytesIO()
        np.save(f, a)
        return f.getvalue()

    elevation, azimuth0 = cv.draw_orbit(uid, 0)
    c2w = cv.orbit_c2w(elevation, cv.orbit_azimuths(azimuth0)).astype(np.float32)
    K = np.repeat(cv.intrinsics(cv.DEFAULT_FOV_DEG, size)[None], 16, 0).astype(np.float32)
    v, u = np.mgrid[0:size, 0:size] / size
    inside = (u - 0.5) ** 2 + (v - 0.5) ** 2 < 0.35**2
    sample = {"__key__": cv.sample_key(uid, 0), "cameras.npy": npy(c2w), "intrinsics.npy": npy(K),
              "json": json.dumps(dict(uid=uid, orbit=0, resolution=size)).encode()}
    for i in range(16):
        base = np.stack([u, v, (u + v + i / 16) % 1], -1) * 200
        rgb = np.clip(base + rng.normal(0, 6, base.shape), 0, 255).astype(np.uint8)
        rgba = np.concatenate([rgb, (inside * 255).astype(np.uint8)[..., None]], -1)
        ccm = np.stack([u, v, np.full_like(u, i / 16)], -1)
        sample[f"{i:02d}.rgba.png"] = png(rgba)
        sample[f"{i:02d}.ccm.png"] = png(cv.encode_ccm_png(ccm, inside))
    return sample


def write_synthetic(folder: Path, count: int, size: int) -> None:
    rng = np.random.default_rng(0)
    with wds.TarWriter(str(folder / "shard-000000.tar")) as sink:
        for n in range(count):
            sink.write(synthetic_sample(f"bench{n}", size, rng))


def measure(pattern: str, resolution: int, workers: int, samples: int, ccm: bool = False) -> float:
    cfg = LoaderConfig(resolution=resolution, batch_size=1, num_workers=workers, shuffle_buffer=4,
                       shuffle_initial=1, ccm=ccm)
    it = iter(StreamingLoader(pattern, cfg))
    for _ in range(max(workers, 1)):  # warm up: worker start-up is not throughput
        next(it)
    start = time.perf_counter()
    for _ in range(samples):
        next(it)
    return samples / (time.perf_counter() - start)


@contextmanager
def local_s3_server() -> Iterator[str]:
    """A moto S3 server on a free loopback port, in its own process (so that it does not share
    the measured process's GIL), reached through the standard AWS environment, which this
    process and its DataLoader workers get. Yields the endpoint URL."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    endpoint = f"http://127.0.0.1:{port}"
    server = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        for _ in range(100):
            try:
                urllib.request.urlopen(f"{endpoint}/moto-api/", timeout=1)
                break
            except OSError:
                time.sleep(0.1)
        else:
            raise RuntimeError(f"the moto S3 server at {endpoint} did not start in 10 s")
        os.environ.update(AWS_ENDPOINT_URL=endpoint, AWS_ACCESS_KEY_ID="bench", AWS_SECRET_ACCESS_KEY="bench",
                          AWS_DEFAULT_REGION="us-east-1")
        yield endpoint
    finally:
        server.terminate()
        server.wait()


def upload_shards(folder: str, url: str) -> None:
    """Copy the ``shard-*.tar`` of a local folder to the bucket prefix ``url`` (bucket created)."""
    fs, path = fsspec.core.url_to_fs(url)
    fs.mkdir(path.split("/", 1)[0])
    for shard in sorted(Path(folder).glob(SHARD_GLOB)):
        fs.put_file(str(shard), f"{path}/{shard.name}")


def compare_s3(folder: str, args) -> None:
    """Loader rates from a local S3 server and from the local folder, alternately, ``--repeats``
    times per worker count: medians and the S3 / local ratio."""
    with local_s3_server() as endpoint:
        url = "s3://bench-loader/shards"
        upload_shards(folder, url)
        print(f"local S3 server (moto) at {endpoint}; shards uploaded to {url}")
        for w in args.workers:
            rates = {"local": [], "s3": []}
            for _ in range(args.repeats):
                for name, pattern in (("local", folder), ("s3", url)):
                    rates[name].append(measure(pattern, args.model_resolution, w, args.samples, args.ccm))
            local, s3 = (statistics.median(rates[n]) for n in ("local", "s3"))
            print(f"workers={w}: local {local:.2f} samples/s, s3 {s3:.2f} samples/s, s3/local "
                  f"{s3 / local:.2f} (medians of {args.repeats}; local "
                  f"{', '.join(f'{r:.2f}' for r in rates['local'])}; s3 {', '.join(f'{r:.2f}' for r in rates['s3'])})")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shards", help="existing shards (pattern, s3:// URLs too); default: synthetic")
    p.add_argument("--resolution", type=int, default=512, help="synthetic shard resolution")
    p.add_argument("--model-resolution", type=int, default=512)
    p.add_argument("--samples", type=int, default=24)
    p.add_argument("--workers", type=int, nargs="+", default=[0, 2])
    p.add_argument("--compare-s3", action="store_true",
                   help="the same shards from a local S3 server (moto) and from a local folder (--shards: a folder)")
    p.add_argument("--repeats", type=int, default=3, help="measurements per source with --compare-s3")
    p.add_argument("--ccm", action="store_true", help="decode the CCM members too (LoaderConfig.ccm)")
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        pattern = args.shards
        if pattern is None:
            write_synthetic(Path(tmp), args.samples + 4, args.resolution)
            pattern = tmp
            size = os.path.getsize(Path(tmp) / "shard-000000.tar") / (args.samples + 4)
            print(f"synthetic shard: {args.resolution} px, {size / 1e6:.1f} MB per sample")
        print(f"machine: {os.cpu_count()} CPU cores; model resolution {args.model_resolution}; "
              f"CCM {'decoded' if args.ccm else 'not decoded'}")
        if args.compare_s3:
            if not os.path.isdir(pattern):
                p.error(f"--compare-s3 uploads a local folder of shards; --shards {pattern} is not one")
            compare_s3(pattern, args)
            return
        for w in args.workers:
            rate = measure(pattern, args.model_resolution, w, args.samples, args.ccm)
            per = rate / max(w, 1)
            print(f"workers={w}: {rate:.2f} samples/s ({per:.2f} per worker)")


if __name__ == "__main__":
    main()
