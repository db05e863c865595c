"""The pretrained stages shipped in the repository, by name.

``pretrained/<name>/`` at the root of the checkout is an ``Ouroboros3D`` export (the
``save_pretrained`` layout) with a ``MODEL_CARD.md``; anything that takes a checkpoint folder
(``Ouroboros3D.from_pretrained``, the trainer's ``model.pretrained``, ``--checkpoint`` of the
app and the command-line tools) also takes its name::

    Ouroboros3D.from_pretrained("tiny")   # pretrained/tiny: the toy stand-ins for SVD and LGM

A folder of the same name in the working directory wins over the shipped one.
"""

from __future__ import annotations

import os
from pathlib import Path

SHIPPED_ROOT = Path(__file__).resolve().parents[1] / "pretrained"
SHIPPED_NAMES = ("tiny",)


def resolve_checkpoint(path: str | os.PathLike) -> Path:
    """A shipped name -> its folder under :data:`SHIPPED_ROOT`; any other path unchanged.

    Raises ``FileNotFoundError`` naming the folder when a shipped name's files are missing (an
    installed package without the repository's ``pretrained/``).
    """
    path = Path(path)
    if str(path) not in SHIPPED_NAMES or path.exists():
        return path
    folder = SHIPPED_ROOT / str(path)
    if not folder.is_dir():
        raise FileNotFoundError(f"shipped checkpoint {str(path)!r}: {folder} is missing (it comes with a clone "
                                "of the repository, not with an installed package)")
    return folder
