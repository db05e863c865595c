"""Held-out demo objects for the demo's benchmark step, in the Google Scanned Objects layout.

Procedural objects from a seed the demo never trains on, each exported as
``<output>/<name>/meshes/model.obj`` + ``materials/textures/texture.png``, plus
``<output>/selection.txt`` listing them (the benchmark's ``--selection``).

    python scripts/demo_heldout.py --count 3 --output outputs/demo/heldout_gso
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from data_pipeline.atomic import atomic_write_text
from data_pipeline.sources import demo_objects, export_gso_layout

HELDOUT_SEED = 1000  # the demo trains on seed 0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=3)
    parser.add_argument("--output", type=Path, required=True)
    parser.add_argument("--seed", type=int, default=HELDOUT_SEED)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        names = [export_gso_layout(rec.path_or_url, args.output, rec.uid).name
                 for rec in demo_objects(args.count, tmp, seed=args.seed)]
    selection = args.output / "selection.txt"
    atomic_write_text(selection, "".join(f"{name}\n" for name in names))
    print(f"{len(names)} held-out objects in GSO layout under {args.output}")


if __name__ == "__main__":
    main()
