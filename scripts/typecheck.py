"""Run mypy over every fedmq module, as the installed package lays them out.

The folders ``shared/``, ``broker/``, ``worker/`` and ``aggregator/`` install as
``fedmq.shared`` etc. through setuptools' ``package-dir``; an editable install maps them with an
import hook that mypy cannot follow. So this script builds a tree of symbolic links under
``build/typecheck/fedmq`` that has the installed layout, and runs mypy on it (with the
repository's pyproject.toml). Usage: ``python scripts/typecheck.py [extra mypy args]``.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

ROOT = Path(__file__).resolve().parents[1]


def link_tree(dest: Path, root: Path = ROOT) -> Path:
    """``dest/fedmq`` with every mapped package of the checkout ``root`` linked in; returns that
    package directory (``dest`` on ``sys.path`` imports that checkout as ``fedmq``)."""
    package_dir: dict[str, str] = tomllib.loads((root / "pyproject.toml").read_text())["tool"]["setuptools"]["package-dir"]
    if dest.exists():
        shutil.rmtree(dest)
    top = dest / "fedmq"
    top.mkdir(parents=True)
    for path in sorted((root / package_dir["fedmq"]).iterdir()):
        if path.suffix == ".py":
            (top / path.name).symlink_to(path)
    for name, folder in package_dir.items():
        if name != "fedmq":
            (top / name.split(".", 1)[1]).symlink_to(root / folder, target_is_directory=True)
    return top


def main(argv: list[str]) -> int:
    top = link_tree(ROOT / "build" / "typecheck")
    cmd = [sys.executable, "-m", "mypy", "--config-file", str(ROOT / "pyproject.toml"), str(top), *argv]
    return subprocess.call(cmd, cwd=top.parent)


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
