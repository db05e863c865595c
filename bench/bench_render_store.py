"""The render job's data path: what the driver receives per object, and shard uploads to S3.

    python bench/bench_render_store.py [--resolutions 64 128 256] [--upload-mb 16 64 256] [--repeats 3]

1. One demo object rendered at each resolution by ``render_unit`` (as a worker does): the bytes
   the driver receives for it now (the pickled ``UnitResult``, without and with a contact-sheet
   preview row) against what the driver received before workers wrote the shards (the object's
   encoded samples, pickled: the shard's own bytes, read back).
2. A moto S3 server started on loopback (``AWS_ENDPOINT_URL``), and ``Store.commit_file`` of files
   of ``--upload-mb`` sizes (one PUT below 100 MB, a multipart upload above): median seconds and
   MB/s over ``--repeats`` uploads each.
"""

from __future__ import annotations

import argparse
import os
import pickle
import platform
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # the checkout's packages, however the script is started

from data_pipeline.render import RenderSettings  # noqa: E402
from data_pipeline.render_workers import Unit, render_unit  # noqa: E402
from data_pipeline.shards import iter_shard  # noqa: E402
from data_pipeline.sources import demo_objects  # noqa: E402
from data_pipeline.storage import Store  # noqa: E402


def driver_bytes(resolutions: list[int], folder: Path) -> None:
    (record,) = demo_objects(1, folder / "objects", seed=3)
    print("| resolution | before: samples to the driver | now: result | now: result + preview row |")
    print("|---|---|---|---|")
    for resolution in resolutions:
        settings = RenderSettings(resolution=resolution, samples=4, denoise=False)
        sizes = {}
        for previews in (0, 1):
            out = folder / f"r{resolution}_{previews}"
            result = render_unit(Unit("shard-000000.tar", [record], previews), settings, str(out))
            assert result.objects[0].ok, result.objects[0].reason
            sizes[previews] = len(pickle.dumps(result))
        before = len(pickle.dumps(list(iter_shard(out / "shard-000000.tar"))))
        print(f"| {resolution} px | {before:,} B | {sizes[0]:,} B | {sizes[1]:,} B |")


def uploads(sizes_mb: list[int], repeats: int, folder: Path) -> None:
    from moto.server import ThreadedMotoServer

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    os.environ.update(AWS_ENDPOINT_URL=f"http://127.0.0.1:{port}", AWS_ACCESS_KEY_ID="bench",
                      AWS_SECRET_ACCESS_KEY="bench", AWS_DEFAULT_REGION="us-east-1")
    try:
        store = Store("s3://bench/shards")
        store.fs.mkdir("bench")
        print("\n| shard size | upload (median) | MB/s | how |")
        print("|---|---|---|---|")
        for mb in sizes_mb:
            times = []
            for repeat in range(repeats):
                local = folder / f"upload-{mb}-{repeat}.tar"
                local.write_bytes(os.urandom(mb * 2**20))
                start = time.perf_counter()
                store.commit_file(local, f"shard-{mb:06d}.tar")
                times.append(time.perf_counter() - start)
            median = statistics.median(times)
            how = "one PUT" if mb < 100 else "multipart upload"
            print(f"| {mb} MB | {median:.2f} s | {mb / median:.0f} | {how} |")
    finally:
        server.stop()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--resolutions", type=int, nargs="+", default=[64, 128, 256])
    p.add_argument("--upload-mb", type=int, nargs="+", default=[16, 64, 256])
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()
    print(f"{platform.node()}: {os.cpu_count()} CPUs, Python {platform.python_version()}\n")
    with tempfile.TemporaryDirectory() as tmp:
        driver_bytes(args.resolutions, Path(tmp))
        uploads(args.upload_mb, args.repeats, Path(tmp))


if __name__ == "__main__":
    main()
