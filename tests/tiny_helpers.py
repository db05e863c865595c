"""Helpers shared by the composed-algorithm tests (Algorithm 1, Algorithm 2, gradients).

An untrained tiny Ouroboros3D built with ``from_config`` (no trained weights are needed to test
how the parts are composed), at 32 px with 4 views at 90 degrees so that the CPU reference
rasterizer keeps each test at a few seconds on 2 cores; and :class:`Spy`, a recording wrapper
that calls through to the real function.
"""

from __future__ import annotations

import numpy as np
import torch

from common.conventions import DEFAULT_FOV_DEG, intrinsics, orbit_c2w
from model.config import preset

RES, V = 32, 4
SMALL = dict(resolution=RES, num_views=V, lgm_input_views=(0, 1, 2, 3))


def tiny_model(seed: int = 0, **overrides):
    """The untrained tiny model; its feedback adapters get random output layers (as after some
    training) instead of their zero initialisation, so that feedback changes the denoiser's
    output and every adapter parameter gets a gradient at the first step."""
    from model.ouroboros import Ouroboros3D

    torch.manual_seed(seed)
    model = Ouroboros3D.from_config(preset("tiny", **{**SMALL, **overrides}))
    for adapter in (model.denoiser.ccm_adapter, model.denoiser.rgb_adapter):
        if adapter is not None:
            as_trained(adapter)
    return model


def as_trained(adapter):
    """A feedback adapter with every convolution randomly re-initialised (PyTorch's default),
    instead of the zero output a fresh one has (model/feedback_adapter.py)."""
    for module in adapter.modules():
        if isinstance(module, torch.nn.Conv2d):
            module.reset_parameters()
    return adapter


def cameras(batch: int = 1, elevation: float = 10.0):
    """Model-frame orbit cameras (view 0 at azimuth 0): c2w [B, V, 4, 4], K [B, V, 3, 3]."""
    c2w = torch.tensor(orbit_c2w(elevation, np.arange(V) * 360.0 / V), dtype=torch.float32)
    K = torch.tensor(intrinsics(DEFAULT_FOV_DEG, RES), dtype=torch.float32)
    return c2w.expand(batch, V, 4, 4).clone(), K.expand(batch, V, 3, 3).clone()


def batch(batch_size: int = 1, seed: int = 0) -> dict:
    """A training batch (docs/interfaces.md) of random images composited over white."""
    gen = torch.Generator().manual_seed(seed)
    c2w, K = cameras(batch_size)
    alphas = (torch.rand(batch_size, V, 1, RES, RES, generator=gen) > 0.5).float()
    images = torch.rand(batch_size, V, 3, RES, RES, generator=gen)
    images = images * alphas + (1 - alphas)
    ccm = torch.rand(batch_size, V, 3, RES, RES, generator=gen) * alphas
    return dict(images=images, alphas=alphas, ccm=ccm, c2w=c2w, K=K,
                key=[f"obj{i}_o0" for i in range(batch_size)])  # fmt: skip


class Spy:
    """Replace ``obj.name`` (for the test, through ``monkeypatch``) by a wrapper that calls the
    real one and records ``(args, kwargs, result)`` in ``calls``. ``transform(result)`` may
    replace the result handed back to the caller (the recorded one is the real one)."""

    def __init__(self, monkeypatch, obj, name: str, transform=None):
        self.calls: list[tuple[tuple, dict, object]] = []
        real = getattr(obj, name)

        def wrapper(*args, **kwargs):
            result = real(*args, **kwargs)
            self.calls.append((args, kwargs, result))
            return transform(result) if transform is not None else result

        monkeypatch.setattr(obj, name, wrapper)

    def arg(self, call: int, index: int):
        return self.calls[call][0][index]

    def result(self, call: int):
        return self.calls[call][2]

    def __len__(self) -> int:
        return len(self.calls)
