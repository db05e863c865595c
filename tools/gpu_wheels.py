"""The wheel bundle that lets ``bench/gpu_check.sh`` run on a GPU machine with no network.

    python tools/gpu_wheels.py pins               # here: NAME==VERSION of every wheel to bundle
    python3 tools/gpu_wheels.py select .whl       # there: the bundled wheels that machine needs

``pins`` walks the installed requirements of :data:`TOP_LEVEL` (the packages the GPU machine
lacks) in this environment, keeps this environment's versions, evaluates markers for the
GPU machine's Python (:data:`TARGET`), and leaves out :data:`PROVIDED` (large packages that a
machine with PyTorch and torchvision has). ``select`` reads the wheels' own metadata: it picks
every top-level wheel, then, until nothing changes, each bundled dependency of a picked wheel
that is not installed there or whose installed version does not satisfy the requirement;
it warns about installed packages whose requirements the picked versions break.
"""

from __future__ import annotations

import argparse
import importlib.metadata as md
import re
import sys
import zipfile
from email.parser import Parser
from pathlib import Path

from packaging.requirements import Requirement
from packaging.version import Version

TOP_LEVEL = ("diffusers", "deepspeed", "gsplat", "webdataset", "lpips")
PROVIDED = ("torch", "torchvision", "triton", "numpy", "scipy", "pillow")  # plus nvidia-*
TARGET = dict(python_version="3.12", python_full_version="3.12.0", implementation_name="cpython",
              platform_python_implementation="CPython", sys_platform="linux", platform_system="Linux",
              platform_machine="x86_64", os_name="posix", extra="")  # fmt: skip


def canonical(name: str) -> str:
    """PEP 503 name: lower case, runs of ``-_.`` as one ``-``."""
    return re.sub(r"[-_.]+", "-", name).lower()


def provided(name: str) -> bool:
    return canonical(name) in PROVIDED or canonical(name).startswith("nvidia-")


def applies(req: Requirement, env: dict | None) -> bool:
    """Whether a requirement holds for ``env`` (None: this interpreter), extras excluded."""
    return req.marker is None or req.marker.evaluate(env if env is not None else {"extra": ""})


def pins(top_level=TOP_LEVEL) -> list[str]:
    """``NAME==VERSION`` of the top-level packages and their dependency closure, as installed here."""
    seen: dict[str, str] = {}
    todo = list(top_level)
    while todo:
        name = canonical(todo.pop())
        if name in seen or provided(name):
            continue
        dist = md.distribution(name)  # PackageNotFoundError: install the package here first
        seen[name] = dist.version
        for line in dist.requires or []:
            req = Requirement(line)
            if applies(req, TARGET):
                todo.append(req.name)
    return [f"{name}=={version}" for name, version in sorted(seen.items())]


def wheel_metadata(path: Path) -> tuple[str, Version, list[Requirement]]:
    """(canonical name, version, Requires-Dist) from a wheel's ``*.dist-info/METADATA``."""
    with zipfile.ZipFile(path) as whl:
        member = next(n for n in whl.namelist() if n.endswith(".dist-info/METADATA") and n.count("/") == 1)
        meta = Parser().parsestr(whl.read(member).decode("utf-8"))
    return canonical(meta["Name"]), Version(meta["Version"]), [Requirement(r) for r in meta.get_all("Requires-Dist") or []]


def installed_version(name: str) -> Version | None:
    try:
        return Version(md.version(name))
    except md.PackageNotFoundError:
        return None


def select(wheels: list[Path], top_level=TOP_LEVEL, installed=installed_version) -> tuple[list[Path], list[str]]:
    """The wheels to install here, and the requirements neither installed nor bundled.

    Args:
        wheels: the bundle.  installed: name -> installed Version or None (this interpreter's).
    Returns:
        (wheel paths to install, sorted; missing requirement strings)
    """
    bundle = {}
    for path in wheels:
        name, version, requires = wheel_metadata(path)
        bundle[name] = (path, version, requires)
    picked = {canonical(n) for n in top_level if canonical(n) in bundle}
    missing: set[str] = set()
    changed = True
    while changed:
        changed = False
        for name in sorted(picked):
            for req in bundle[name][2]:
                dep = canonical(req.name)
                if not applies(req, None) or dep in picked:
                    continue
                have = installed(dep)
                if have is not None and req.specifier.contains(have, prereleases=True):
                    continue
                if dep in bundle and req.specifier.contains(bundle[dep][1], prereleases=True):
                    picked.add(dep)
                    changed = True
                else:
                    missing.add(f"{req} (installed: {have}, bundled: {bundle[dep][1] if dep in bundle else None})")
    return sorted(bundle[n][0] for n in picked), sorted(missing)


def conflicts(chosen: list[Path], distributions=md.distributions) -> list[str]:
    """Installed packages whose own requirements the chosen wheels' versions break (the chosen
    wheels shadow the installed versions on PYTHONPATH), e.g. an older transformers pinning
    ``huggingface-hub<1.0``."""
    versions = {name: version for name, version, _ in map(wheel_metadata, chosen)}
    found = []
    for dist in distributions():
        owner = canonical(dist.metadata["Name"] or "")
        if owner in versions:
            continue
        for line in dist.requires or []:
            req = Requirement(line)
            dep = canonical(req.name)
            if dep in versions and applies(req, None) and not req.specifier.contains(versions[dep], prereleases=True):
                found.append(f"{owner} {dist.version} requires {req}; the bundle brings {dep} {versions[dep]}")
    return sorted(set(found))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    sub.add_parser("pins", help="print NAME==VERSION of the wheels to bundle")
    s = sub.add_parser("select", help="print the bundled wheels this machine needs")
    s.add_argument("bundle", type=Path)
    args = p.parse_args(argv)
    if args.command == "pins":
        print("\n".join(pins()))
        return 0
    chosen, missing = select(sorted(args.bundle.glob("*.whl")))
    for line in missing:
        print(f"gpu_wheels: not satisfied by this machine or the bundle: {line}", file=sys.stderr)
    for line in conflicts(chosen):
        print(f"gpu_wheels: conflict: {line}", file=sys.stderr)
    print("\n".join(map(str, chosen)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
