"""The examples run as their READMEs say, over the real RabbitMQ; bad models fail with one line.

examples/pytorch-cnn (a CNN on 8x8 digit images, 4 worker processes, Dirichlet alpha 0.5)
reaches 95% on the digits test split in sync FedAvg and in async FedBuff; examples/sklearn and
examples/numpy-custom reach 90%. Each worker process trains with one thread (`fedmq run` sets
OMP_NUM_THREADS=1 for its children), so the runs fit a small machine.
"""

from __future__ import annotations

import io
import os
import subprocess
from pathlib import Path

import numpy as np
import pytest

from tests.helpers import REPO, fedmq_argv, read_history, require_torch

pytestmark = [pytest.mark.broker]


def fedmq_run(namespace: str, amqp_url: str, out: Path, *args: str, timeout: float = 540) -> tuple[int, str]:
    """``fedmq run`` from the repository root, as the examples' READMEs run it."""
    env = {**os.environ, "FEDMQ_AMQP_URL": amqp_url}
    proc = subprocess.run(fedmq_argv("run", *args, "--display", "plain", "--namespace", namespace, "--out", str(out)),
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL)
    return proc.returncode, proc.stdout + proc.stderr


@pytest.mark.slow
@pytest.mark.timeout(600)  # about a minute alone; several times that on a busy machine
@pytest.mark.parametrize("mode", ["sync", "async"])
def test_the_pytorch_cnn_example_reaches_95_percent(mode: str, namespace: str, amqp_url: str, tmp_path: Path) -> None:
    require_torch()
    out = tmp_path / "run"
    code, output = fedmq_run(namespace, amqp_url, out, "--config", "examples/pytorch-cnn/fedmq.toml", "--mode", mode,
                             "--export", "safetensors")
    assert code == 0, output
    hist = read_history(out)
    assert hist["config"]["strategy"] == ("fedavg" if mode == "sync" else "fedbuff")
    assert hist["final"]["accuracy"] >= 0.95, hist["final"]
    if mode == "sync":
        _check_exports(out)


def _check_exports(out: Path) -> None:
    import torch
    from safetensors.numpy import load_file

    from fedmq.shared.spec import resolve_ref

    npz = dict(np.load(out / "model.npz"))
    tensors = load_file(str(out / "model.safetensors"))
    assert sorted(tensors) == sorted(npz) and "0.weight" in tensors  # safetensors sorts its names
    for name, value in npz.items():
        np.testing.assert_array_equal(tensors[name], value)
    state = torch.load(io.BytesIO((out / "model.pt").read_bytes()), weights_only=True)
    net = resolve_ref(f"{REPO}/examples/pytorch-cnn/model.py:make_cnn", "model")()
    net.load_state_dict(state)  # the user's own module takes it as it is
    np.testing.assert_array_equal(net.state_dict()["8.bias"].numpy(), npz["8.bias"])


@pytest.mark.slow
@pytest.mark.timeout(600)
@pytest.mark.parametrize("example", ["sklearn", "numpy-custom"])
def test_the_sklearn_and_numpy_custom_examples_reach_90_percent(example: str, namespace: str, amqp_url: str,
                                                                 tmp_path: Path) -> None:
    out = tmp_path / "run"
    code, output = fedmq_run(namespace, amqp_url, out, "--config", f"examples/{example}/fedmq.toml")
    assert code == 0, output
    assert read_history(out)["final"]["accuracy"] >= 0.90, read_history(out)["final"]


VECTORS = "tests/integration/vector_models.py"


@pytest.mark.slow
@pytest.mark.parametrize(
    ("args", "words"),
    [
        (["--trainer", "no_such_trainer_xyz:Trainer"], "trainer module 'no_such_trainer_xyz'"),
        (["--trainer", "fedmq.torch:TorchTrainer", "--trainer-config", "module=no_such_module_xyz:make"],
         "model module 'no_such_module_xyz' (from 'no_such_module_xyz:make') cannot be imported"),
        (["--trainer", "fedmq.torch:TorchTrainer", "--trainer-config", f"module={VECTORS}:seven_classes"],
         "the data has 10 classes, so it must output (10,) per sample"),
        (["--trainer", "fedmq.torch:TorchTrainer", "--trainer-config", f"module={VECTORS}:mlp",
          "--trainer-config", "colour=red"], "unknown --trainer-config key 'colour' for fedmq.torch:TorchTrainer"),
        (["--trainer", "fedmq.torch:TorchTrainer", "--trainer-config", f"module={VECTORS}:mlp", "--image"],
         "cannot take the data's samples of shape (1, 8, 8)"),
        (["--hidden", "8", "--trainer-config", "depth=3"], "unknown --trainer-config key 'depth' for the numpy MLP"),
        (["--trainer", "fedmq.torch:TorchTrainer", "--trainer-config", f"module={VECTORS}:mlp", "--device", "cuda"],
         "--device cuda: PyTorch"),
    ],
    ids=["no-trainer", "no-module", "wrong-classes", "unknown-key", "images-to-vectors", "mlp-unknown-key",
         "cuda-without-gpu"],
)
def test_bad_models_fail_with_one_line_and_no_traceback(args: list[str], words: str, namespace: str, amqp_url: str,
                                                       tmp_path: Path) -> None:
    if "fedmq.torch:TorchTrainer" in args:
        torch = require_torch()
        if "cuda" in args and torch.cuda.is_available():
            pytest.skip("this machine has a GPU: --device cuda trains there")
    code, output = fedmq_run(namespace, amqp_url, tmp_path / "run", "--workers", "2", "--rounds", "2", *args,
                             timeout=120)
    assert code != 0, output
    assert "Traceback" not in output, output
    errors = [line for line in output.splitlines() if "error" in line.lower()]
    assert len(errors) == 1 and words in errors[0], output
