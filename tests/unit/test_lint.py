"""ruff (bare imports of the four folders banned, TID251) and mypy over every fedmq module stay green."""

from __future__ import annotations

import importlib.util
import subprocess
import sys

import pytest

from tests.conftest import skip_or_fail
from tests.helpers import REPO


def _need(module: str) -> None:
    if importlib.util.find_spec(module) is None:
        skip_or_fail(f"{module} is not installed (pip install -e '.[dev]')")


def test_ruff_is_clean() -> None:
    _need("ruff")
    proc = subprocess.run([sys.executable, "-m", "ruff", "check", "--no-cache", "."], cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]


def test_ruff_bans_the_bare_package_names(tmp_path) -> None:
    _need("ruff")
    probe = tmp_path / "probe.py"
    probe.write_text("from shared import messages\nimport worker.service\n\nprint(messages, worker)\n")
    proc = subprocess.run([sys.executable, "-m", "ruff", "check", "--no-cache", "--config", str(REPO / "pyproject.toml"),
                           "--select", "TID251", str(probe)], capture_output=True, text=True)
    assert proc.returncode == 1 and proc.stdout.count("TID251") == 2, proc.stdout


@pytest.mark.slow
def test_mypy_checks_every_module() -> None:
    _need("mypy")
    proc = subprocess.run([sys.executable, str(REPO / "scripts" / "typecheck.py")], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    modules = sum(1 for folder in ("fedmq", "shared", "broker", "worker", "aggregator") for _ in (REPO / folder).glob("*.py"))
    assert f"in {modules} source files" in proc.stdout, proc.stdout
