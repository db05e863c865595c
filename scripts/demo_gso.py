"""Demo objects in the Google Scanned Objects layout, for the benchmark step.

Procedural objects of a seed, each exported as ``<output>/<name>/meshes/model.obj`` +
``materials/textures/texture.png``, plus ``<output>/selection.txt`` listing them (the
benchmark's ``--selection``). The default seed is one the demo never trains on (held-out
objects); ``--seed 0 --count N`` gives the first N objects the demo trains on (seen objects:
same names, so the benchmark's ground-truth orbit has the cameras of training orbit 0).

    python scripts/demo_gso.py --count 3 --output outputs/demo/heldout_gso
    python scripts/demo_gso.py --seed 0 --count 4 --output outputs/demo/seen_gso
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from common.atomic import atomic_write_text
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
    print(f"{len(names)} demo objects (seed {args.seed}) in GSO layout under {args.output}")


if __name__ == "__main__":
    main()
