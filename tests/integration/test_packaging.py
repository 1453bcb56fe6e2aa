"""The wheel installs one top-level package, ``fedmq``, and works beside files named like its parts.

The wheel is built from this checkout and installed into a fresh environment of its own (no
editable install, no repository on the path); its dependencies come from the test venv's
site-packages through a ``.pth`` file, so nothing is downloaded.
"""

from __future__ import annotations

import os
import site
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from tests.helpers import REPO

pytestmark = [pytest.mark.slow]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(out),
                    str(REPO)], check=True, capture_output=True)
    (found,) = out.glob("fedmq-*.whl")
    return found


@pytest.fixture(scope="module")
def fresh_python(wheel: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A venv with the wheel installed, and the test venv's third-party packages beside it."""
    env_dir = tmp_path_factory.mktemp("fresh") / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(env_dir)], check=True)
    python = env_dir / "bin" / "python"
    target = Path(subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                                 check=True, capture_output=True, text=True).stdout.strip())
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(target), str(wheel)],
                   check=True, capture_output=True)
    # dependencies from the test venv (a .pth line is a path, its own .pth files are not run:
    # the editable install of this checkout stays invisible)
    (target / "zz_test_deps.pth").write_text("\n".join(site.getsitepackages()) + "\n")
    return python


def test_wheel_top_level_is_fedmq_only(wheel: Path) -> None:
    with zipfile.ZipFile(wheel) as z:
        tops = {name.split("/", 1)[0] for name in z.namelist()}
        names = z.namelist()
    assert {t for t in tops if not t.endswith(".dist-info")} == {"fedmq"}
    for part in ("shared/codec.py", "broker/client.py", "worker/service.py", "aggregator/service.py"):
        assert f"fedmq/{part}" in names, f"fedmq/{part} missing from the wheel"


def test_bare_names_are_not_installed(fresh_python: Path, tmp_path: Path) -> None:
    for bare in ("shared", "broker", "worker", "aggregator"):
        proc = subprocess.run([str(fresh_python), "-c", f"import {bare}"], cwd=tmp_path, capture_output=True, text=True)
        assert proc.returncode != 0 and "ModuleNotFoundError" in proc.stderr, f"import {bare} worked"
    ok = subprocess.run([str(fresh_python), "-c", "import fedmq.shared.codec, fedmq.aggregator.service, fedmq.worker.service"],
                        cwd=tmp_path, capture_output=True, text=True)
    assert ok.returncode == 0, ok.stderr


@pytest.mark.broker
def test_run_from_a_folder_that_shadows_module_names(fresh_python: Path, tmp_path: Path, amqp_url: str,
                                                     namespace: str) -> None:
    """`fedmq run` starts its children with ``python -m``: files named worker.py or shared.py in
    the working directory must not be imported in place of fedmq's own packages."""
    work = tmp_path / "project"
    work.mkdir()
    for name in ("worker.py", "shared.py", "broker.py", "aggregator.py"):
        (work / name).write_text("raise SystemExit('the user file ' + __file__ + ' was imported')\n")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["FEDMQ_AMQP_URL"] = amqp_url
    proc = subprocess.run(
        [str(fresh_python), "-m", "fedmq.cli", "run", "--workers", "2", "--dataset", "digits", "--rounds", "2",
         "--min-workers", "2", "--out", str(work / "runs"), "--namespace", namespace],
        cwd=work, env=env, capture_output=True, text=True, timeout=240, stdin=subprocess.DEVNULL,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "was imported" not in proc.stdout + proc.stderr
    assert (work / "runs" / "history.json").exists()
