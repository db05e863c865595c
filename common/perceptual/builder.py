"""The one LPIPS builder: ``lpips.LPIPS`` (its v0.1 linear heads) with an ImageNet trunk from
the cache that the install step fills (:mod:`common.perceptual.fetch`).

Both the training loss (``model/lgm/loss.py``) and the benchmark metric (``common/image_metrics.py``)
build their network here. Without the cache the trunk can only be random: that is refused
unless the caller allows it, and the returned module says which trunk it has
(:class:`LPIPSTrunk`). The network is built with the global RNG untouched (a random trunk
is drawn from a fixed seed in a forked RNG), so building it, early or late, never shifts the
random stream of a training run.
"""

from __future__ import annotations

import warnings
from dataclasses import asdict, dataclass

import torch

from common.perceptual import trunk_cache

NET_NAMES = {"vgg": "VGG16", "alex": "AlexNet"}
RANDOM_TRUNK_SEED = 0


@dataclass(frozen=True)
class LPIPSTrunk:
    """Which trunk an LPIPS network has: ``net`` (vgg/alex), ``real`` (ImageNet) or random."""

    net: str
    real: bool
    source: str

    def describe(self) -> str:
        if self.real:
            return f"{NET_NAMES[self.net]} with ImageNet weights ({self.source})"
        return f"{NET_NAMES[self.net]} with RANDOM weights ({self.source}): NOT comparable with published LPIPS"

    def to_dict(self) -> dict:
        return asdict(self)


class RandomLPIPSRefused(RuntimeError):
    """The ImageNet trunk is not cached and the caller did not allow a random one."""


def _convs(net: torch.nn.Module) -> list[torch.nn.Conv2d]:
    return [m for m in net.net.modules() if isinstance(m, torch.nn.Conv2d)]


def build_lpips(net: str = "vgg", allow_random: bool = False) -> torch.nn.Module:
    """A frozen ``lpips.LPIPS(net)`` in eval mode on the CPU, with attribute ``trunk``.

    Args:
        net: "vgg" (the default, Eq. 2's and the benchmarks' trunk) or "alex".
        allow_random: when the cache lacks the trunk, build a random one (warning) instead of
            raising :class:`RandomLPIPSRefused`.
    """
    import lpips

    if net not in NET_NAMES:
        raise ValueError(f"unknown LPIPS trunk {net!r}: use one of {sorted(NET_NAMES)}")
    path = trunk_cache.trunk_file(net)
    cached = trunk_cache.is_cached(net)
    if not cached and not allow_random:
        raise RandomLPIPSRefused(
            f"LPIPS: the ImageNet {NET_NAMES[net]} trunk is not cached ({path}). Fill the cache with "
            "`make setup` (or `python -m common.perceptual.fetch`), or allow a RANDOM trunk explicitly "
            "(model config `allow_random_lpips: true`)."
        )
    with torch.random.fork_rng(devices=[]), warnings.catch_warnings():
        warnings.filterwarnings("ignore", "The parameter 'pretrained' is deprecated", UserWarning)
        warnings.filterwarnings("ignore", "Arguments other than a weight enum", UserWarning)
        torch.manual_seed(RANDOM_TRUNK_SEED)
        model = lpips.LPIPS(net=net, pretrained=True, pnet_rand=True, verbose=False)
    if cached:
        convs, heads, meta = trunk_cache.load_trunk(net)
        targets = _convs(model)
        if len(targets) != len(convs):
            raise ValueError(f"{path}: {len(convs)} convolutions, lpips' {net} trunk has {len(targets)}")
        with torch.no_grad():
            for i, (conv, (weight, bias)) in enumerate(zip(targets, convs)):
                if conv.weight.shape != weight.shape or conv.bias.shape != bias.shape:
                    raise ValueError(f"{path}: conv {i} is {tuple(weight.shape)}, lpips expects "
                                     f"{tuple(conv.weight.shape)}")  # fmt: skip
                conv.weight.copy_(weight)
                conv.bias.copy_(bias)
        trunk = LPIPSTrunk(net, True, f"{meta.get('source')}, {path.name}")
    else:
        trunk = LPIPSTrunk(net, False, f"seed {RANDOM_TRUNK_SEED}, allowed explicitly")
        warnings.warn(f"LPIPS: {trunk.describe()}; {path} is missing", stacklevel=2)
    model.requires_grad_(False).eval()
    model.trunk = trunk
    return model
