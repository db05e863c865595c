"""Google Scanned Objects (GSO) discovery and the benchmark's fixed object selection.

A GSO root holds one folder per object, as the dataset is released::

    <root>/<name>/meshes/model.obj        (with model.mtl next to it)
    <root>/<name>/materials/textures/texture.png

The benchmark runs on a fixed, ordered selection of names (default: ``eval/gso_selection.txt``,
see its header for the origin); ``"all"`` takes every object folder of the root, sorted.
Names of the selection that the root lacks are reported, not silently dropped.
"""

from __future__ import annotations

from dataclasses import dataclass
from importlib import resources
from pathlib import Path

DEFAULT_SELECTION = resources.files("eval") / "gso_selection.txt"  # package data
MESH_RELPATH = Path("meshes") / "model.obj"
TEXTURE_RELPATH = Path("materials") / "textures" / "texture.png"


@dataclass(frozen=True)
class GSOObject:
    """One GSO object on disk."""

    name: str
    mesh_path: Path
    texture_path: Path | None  # None when the object folder has no texture.png


@dataclass(frozen=True)
class Discovery:
    """Result of :func:`discover`: the objects to run, in selection order, and what was not found."""

    objects: list[GSOObject]
    missing: list[str]  # selected names with no ``<root>/<name>/meshes/model.obj``

    def summary(self) -> str:
        """One human line: how many were found, and the missing names (first 10)."""
        text = f"{len(self.objects)} GSO objects found"
        if self.missing:
            shown = ", ".join(self.missing[:10]) + (" ..." if len(self.missing) > 10 else "")
            text += f"; {len(self.missing)} selected objects missing from the root: {shown}"
        return text


def read_selection(path: str | Path) -> list[str]:
    """Object names of a selection file: one per line, ``#`` comments and blank lines ignored.

    Raises:
        FileNotFoundError / ValueError naming the file, for a missing file, an empty selection,
        a name with a path separator or a duplicated name.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"GSO selection file {path} does not exist")
    names: list[str] = []
    for lineno, raw in enumerate(path.read_text().splitlines(), 1):
        name = raw.split("#", 1)[0].strip()
        if not name:
            continue
        if "/" in name or "\\" in name or name in (".", ".."):
            raise ValueError(f"{path}:{lineno}: {name!r} is not an object folder name")
        if name in names:
            raise ValueError(f"{path}:{lineno}: object {name!r} is listed twice")
        names.append(name)
    if not names:
        raise ValueError(f"GSO selection file {path} lists no objects")
    return names


def load_object(root: str | Path, name: str) -> GSOObject | None:
    """The object ``<root>/<name>`` in GSO layout, or None when its mesh is not there."""
    folder = Path(root) / name
    mesh = folder / MESH_RELPATH
    if not mesh.is_file():
        return None
    texture = folder / TEXTURE_RELPATH
    return GSOObject(name=name, mesh_path=mesh, texture_path=texture if texture.is_file() else None)


def discover(
    root: str | Path, selection: str | Path | None = None, limit: int | None = None
) -> Discovery:
    """Objects of a GSO root, in the order of a selection.

    Args:
        root: folder holding ``<name>/meshes/model.obj``.
        selection: a selection file (default ``eval/gso_selection.txt``) or ``"all"`` (every
            object folder of ``root``, sorted by name).
        limit: keep the first ``limit`` objects found (in selection order).
    Returns:
        :class:`Discovery` (found objects, missing names).
    Raises:
        FileNotFoundError when ``root`` is not a folder; ValueError for a bad ``limit``.
    """
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"GSO root {root} is not a folder")
    if limit is not None and limit < 1:
        raise ValueError(f"--limit must be >= 1, got {limit}")
    if str(selection) == "all":
        names = sorted(p.name for p in root.iterdir() if (p / MESH_RELPATH).is_file())
    else:
        names = read_selection(DEFAULT_SELECTION if selection is None else selection)
    objects, missing = [], []
    for name in names:
        obj = load_object(root, name)
        if obj is None:
            missing.append(name)
        else:
            objects.append(obj)
    if limit is not None:
        objects = objects[:limit]
    return Discovery(objects=objects, missing=missing)
