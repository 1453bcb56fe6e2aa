"""fedmq.torch: state_dict <-> arrays, FedProx, devices, bad modules, export."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest

from tests.helpers import require_torch

torch = require_torch()
from torch import nn  # noqa: E402

from fedmq.shared import codec  # noqa: E402
from fedmq.shared.errors import ConfigError  # noqa: E402
from fedmq.shared.spec import build_spec  # noqa: E402
from fedmq.torch import (  # noqa: E402
    TorchTrainer,
    arrays_to_state_dict,
    resolve_device,
    state_dict_to_arrays,
)

ROOT = Path(__file__).resolve().parents[2]
CNN = f"{ROOT}/examples/pytorch-cnn/model.py:make_cnn"


class BNNet(nn.Module):
    """A module with buffers: BatchNorm running statistics and its integer batch counter."""

    def __init__(self, num_classes: int = 3) -> None:
        super().__init__()
        self.fc = nn.Linear(8, 16)
        self.bn = nn.BatchNorm1d(16)
        self.out = nn.Linear(16, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(torch.relu(self.bn(self.fc(x))))


def make_vector_mlp(num_classes: int = 3) -> nn.Module:
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, num_classes))


def make_seven() -> nn.Module:
    return nn.Sequential(nn.Flatten(), nn.Linear(8, 7))


def trainer(module: str = f"{__name__}:BNNet", shape: tuple[int, ...] = (8,), classes: int = 3,
            **config: object) -> TorchTrainer:
    spec = build_spec(TorchTrainer, {"module": module, **config}, input_shape=shape, num_classes=classes, seed=0)
    return TorchTrainer(spec)


def data(n: int = 64, shape: tuple[int, ...] = (8,), seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    X = rng.standard_normal((n, *shape)).astype(np.float32)
    y = (X.reshape(n, -1)[:, 0] > 0).astype(np.int64) + (X.reshape(n, -1)[:, 1] > 1).astype(np.int64)
    return X, y


def test_a_state_dict_round_trips_through_the_codec_exactly_buffers_included() -> None:
    net = BNNet()
    net.train()
    net(torch.randn(32, 8))  # moves the running statistics and the batch counter
    state = net.state_dict()
    assert {"bn.running_mean", "bn.running_var", "bn.num_batches_tracked"} <= set(state)
    arrays = state_dict_to_arrays(state)
    assert all(a.dtype == np.float32 for a in arrays.values())
    wire = codec.decode_arrays(codec.encode_arrays(arrays), max_bytes=1 << 20)
    back = arrays_to_state_dict(wire, state)
    assert list(back) == list(state)
    for name, tensor in state.items():
        assert back[name].dtype == tensor.dtype and torch.equal(back[name], tensor), name
    assert int(back["bn.num_batches_tracked"]) == 1
    fresh = BNNet()
    fresh.load_state_dict(back)  # a state_dict the module itself takes


def test_float32_cpu_tensors_and_arrays_share_memory_both_ways() -> None:
    state = BNNet().state_dict()
    arrays = state_dict_to_arrays(state)
    assert np.shares_memory(arrays["fc.weight"], state["fc.weight"].numpy())
    back = arrays_to_state_dict(arrays, state)
    assert np.shares_memory(back["fc.weight"].numpy(), arrays["fc.weight"])
    copied = arrays_to_state_dict(arrays, state, copy=True)
    assert not np.shares_memory(copied["fc.weight"].numpy(), arrays["fc.weight"])


def test_a_float64_module_travels_as_float32_and_comes_back_as_float64() -> None:
    net = BNNet().double()
    arrays = state_dict_to_arrays(net.state_dict())
    assert arrays["fc.weight"].dtype == np.float32
    assert arrays_to_state_dict(arrays, net.state_dict())["fc.weight"].dtype == torch.float64


def test_fit_updates_buffers_and_returns_arrays_that_later_fits_leave_alone() -> None:
    t = trainer()
    X, y = data()
    params = t.init_params()
    first = t.fit(params, X, y, epochs=1, batch_size=16, lr=0.1, mu=0.0, seed=1)
    kept = {k: v.copy() for k, v in first.params.items()}
    assert not np.array_equal(first.params["bn.running_mean"], params["bn.running_mean"])
    assert float(first.params["bn.num_batches_tracked"]) == 4  # 64 samples in batches of 16
    t.fit(first.params, X, y, epochs=1, batch_size=16, lr=0.1, mu=0.0, seed=2)
    t.evaluate(params, X, y)
    for name, value in kept.items():
        np.testing.assert_array_equal(first.params[name], value)


def test_fedprox_pulls_the_weights_towards_the_reference() -> None:
    t = trainer(module=f"{__name__}:make_vector_mlp")
    X, y = data(256)
    params = t.init_params()

    def distance(mu: float) -> float:
        out = t.fit(params, X, y, epochs=5, batch_size=16, lr=0.1, mu=mu, seed=3).params
        return float(sum(np.sum((out[k] - params[k]) ** 2) for k in params))

    free, prox = distance(0.0), distance(5.0)
    assert prox < 0.5 * free, (free, prox)


def test_devices_cpu_works_cuda_fails_with_one_line_and_auto_falls_back(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("cpu").type == "cpu"
    assert resolve_device("auto").type == "cpu"
    with pytest.raises(ConfigError, match="--device cuda: PyTorch .* finds no CUDA GPU") as err:
        resolve_device("cuda")
    assert "\n" not in str(err.value)
    with pytest.raises(ConfigError, match="--device must be one of"):
        resolve_device("tpu")
    with pytest.raises(ConfigError, match="no CUDA GPU"):
        trainer(device="cuda")
    assert trainer(device="auto").device.type == "cpu"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_trains_on_the_gpu_and_returns_float32_arrays() -> None:
    t = trainer(device="cuda")
    assert t.device.type == "cuda"
    X, y = data()
    out = t.fit(t.init_params(), X, y, epochs=1, batch_size=16, lr=0.1, mu=0.0, seed=1)
    assert all(isinstance(v, np.ndarray) and v.dtype == np.float32 for v in out.params.values())


@pytest.mark.parametrize(
    ("config", "shape", "match"),
    [
        ({"module": "no_such_module_xyz:make"}, (8,), "model module 'no_such_module_xyz' .* cannot be imported"),
        ({"module": f"{__name__}:nothing_here"}, (8,), "has no attribute 'nothing_here'"),
        ({"module": f"{__name__}:make_seven"}, (8,), r"outputs of shape \(7,\); the data has 3 classes"),
        ({"module": f"{__name__}:make_vector_mlp"}, (1, 8, 8),
         r"samples of shape \(1, 8, 8\) to outputs of shape \(1, 8, 3\)"),
        ({"module": f"{__name__}:make_vector_mlp"}, (64,), r"cannot take the data's samples of shape \(64,\): RuntimeError"),
        ({"module": f"{__name__}:BNNet", "colour": "red"}, (8,), "unknown --trainer-config key 'colour'"),
        ({}, (8,), "needs --trainer-config module="),
        ({"module": f"{__name__}:BNNet", "optimizer": "lbfgs2"}, (8,), "unknown optimizer 'lbfgs2'"),
        ({"module": f"{__name__}:BNNet", "optimizer_kwargs": {"momentum": "x"}}, (8,), "optimizer 'sgd' does not take"),
        ({"module": f"{__name__}:BNNet", "loss": "hinge"}, (8,), "unknown loss 'hinge'"),
    ],
)
def test_bad_modules_and_configurations_are_one_line_config_errors(config: dict, shape: tuple[int, ...],
                                                                    match: str) -> None:
    with pytest.raises(ConfigError, match=match) as err:
        spec = build_spec(TorchTrainer, config, input_shape=shape, num_classes=3, seed=0)
        TorchTrainer(spec)
    assert "\n" not in str(err.value)


def test_the_factory_gets_num_classes_and_module_kwargs() -> None:
    t = trainer(module=CNN, shape=(1, 8, 8), classes=5, module_kwargs={"channels": 2})
    assert t.init_params()["0.weight"].shape == (2, 1, 3, 3)
    assert t.init_params()["8.bias"].shape == (5,)


def test_the_export_is_a_state_dict_that_loads_with_weights_only() -> None:
    t = trainer()
    params = t.init_params()
    blob = t.export_files(params)["model.pt"]
    state = torch.load(io.BytesIO(blob), weights_only=True)
    assert state["bn.num_batches_tracked"].dtype == torch.long
    net = BNNet()
    net.load_state_dict(state)
    np.testing.assert_array_equal(net.state_dict()["fc.weight"].numpy(), params["fc.weight"])
