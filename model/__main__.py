"""``python -m model summary --preset full|tiny``: per-part parameter counts.

The model is built on the meta device (``accelerate.init_empty_weights``): no memory is
allocated and nothing is downloaded, so the full preset's 2+ B parameters count in seconds.
"""

from __future__ import annotations

import argparse
import sys

from accelerate import init_empty_weights

from model.config import FEEDBACK_MODES, PRESETS, preset


def _count(module) -> int:
    return 0 if module is None else sum(p.numel() for p in module.parameters())


def parameter_counts(model) -> dict[str, int]:
    """Parameters per part of an :class:`~model.ouroboros.Ouroboros3D`, plus totals."""
    parts = {
        "unet": _count(model.denoiser.unet),
        "camera_embedding": _count(model.denoiser.camera),
        "ccm_adapter": _count(model.denoiser.ccm_adapter),
        "rgb_adapter": _count(model.denoiser.rgb_adapter),
        "vae": _count(model.vae),
        "image_encoder": _count(model.image_encoder),
        "lgm": _count(model.lgm),
    }
    parts["total"] = sum(parts.values())
    parts["trainable"] = sum(p.numel() for p in model.trainable_parameters())
    return parts


def build_on_meta(name: str, **overrides):
    """The preset's model with every parameter on the meta device."""
    from model.ouroboros import Ouroboros3D

    with init_empty_weights():
        return Ouroboros3D.from_config(preset(name, **overrides))


def summary(name: str, feedback: str | None = None, out=None) -> dict[str, int]:
    """Print (to ``out``, default stdout) and return the per-part counts of a preset."""
    out = out or sys.stdout
    overrides = {} if feedback is None else {"feedback": feedback}
    counts = parameter_counts(build_on_meta(name, **overrides))
    print(f"Ouroboros3D preset '{name}'" + (f" (feedback={feedback})" if feedback else ""), file=out)
    for part, n in counts.items():
        print(f"  {part:<18} {n:>15,d}  ({n / 1e9:.4f} B)", file=out)
    return counts


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m model", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("summary", help="per-part parameter counts (meta device)")
    p.add_argument("--preset", choices=sorted(PRESETS), default="full")
    p.add_argument("--feedback", choices=FEEDBACK_MODES, default=None)
    args = parser.parse_args(argv)
    if args.command == "summary":
        summary(args.preset, args.feedback)
    return 0


if __name__ == "__main__":
    sys.exit(main())
