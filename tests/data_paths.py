"""Where the tests' files live: the one place that spells the paths inside the repository.

``ASSETS``: real meshes (``tests/assets/README.md``: origin and licence of each file).
``FIXTURES``: the LGM names-and-shapes fixture and the small Objaverse cache.
"""

from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
ASSETS = REPO / "tests" / "assets"
FIXTURES = REPO / "tests" / "fixtures"
