"""`make demo` installs what the demo needs; `make test` the test and dev extras too (dry runs)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.skipif(shutil.which("make") is None, reason="needs make")


def dry_run(target: str, venv: Path) -> str:
    return subprocess.run(["make", "-n", target, f"VENV={venv}"], cwd=ROOT, capture_output=True, text=True,
                          check=True).stdout


def test_demo_installs_the_package_without_the_test_and_dev_extras(tmp_path: Path) -> None:
    out = dry_run("demo", tmp_path / "venv")
    installs = [line for line in out.splitlines() if "pip install" in line and "--upgrade pip" not in line]
    assert installs and all("-e ." in line for line in installs), out
    assert "[test" not in out and "dev]" not in out, out
    assert "fedmq run" in out


def test_test_and_lint_install_the_extras(tmp_path: Path) -> None:
    for target in ("test", "lint"):
        out = dry_run(target, tmp_path / "venv")
        assert "-e '.[test,dev]'" in out, out
    assert "pytest -q" in dry_run("test", tmp_path / "venv")
    assert "make test" in (ROOT / ".ci" / "run").read_text()


def test_a_venv_with_the_extras_serves_the_demo_without_installing_again(tmp_path: Path) -> None:
    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True)
    (venv / "bin" / "python").touch()
    (venv / ".installed-test").touch()  # newer than pyproject.toml
    res = subprocess.run(["sh", "-c", f"eval \"$(make -n demo VENV={venv} | grep 'if \\[')\" && echo ok"],
                         cwd=ROOT, capture_output=True, text=True)
    assert res.returncode == 0 and res.stdout.strip() == "ok", res.stdout + res.stderr


def test_test_installs_the_pinned_cpu_torch_before_the_extras(tmp_path: Path) -> None:
    installs = [line for line in dry_run("test", tmp_path / "venv").splitlines() if "pip install" in line]
    torch_at = next(i for i, line in enumerate(installs) if "'torch==" in line)
    extras_at = next(i for i, line in enumerate(installs) if ".[test,dev]" in line)
    assert torch_at < extras_at, installs  # the extras' torch range is then met: nothing bigger comes
    assert "torch" not in dry_run("demo", tmp_path / "venv2")  # the demo stays light
