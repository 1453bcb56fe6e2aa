"""The Flower peer (bench/peers/) runs fedmq's round-time workload: same model, same stand-in training.

``bench/peers/flower_app/fedmq_flower_bench/workload.py`` imports numpy only, so it is loaded
here by path beside ``bench.standin.NoiseTrainer`` without Flower installed.
"""

from __future__ import annotations

import importlib.util
from types import ModuleType

import numpy as np
import pytest

from bench._common import MODEL_SIZES, mlp_param_count
from bench.standin import NoiseTrainer, noise_spec
from tests.helpers import REPO

WORKLOAD = REPO / "bench" / "peers" / "flower_app" / "fedmq_flower_bench" / "workload.py"


def load_workload() -> ModuleType:
    spec = importlib.util.spec_from_file_location("peer_workload", WORKLOAD)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("label", ["100k", "1M"])
def test_the_peer_model_is_noise_trainers_model(label: str) -> None:
    workload = load_workload()
    hidden = MODEL_SIZES[label]
    ours = NoiseTrainer(noise_spec([784, hidden, 10])).init_params()
    peer = workload.init_arrays(hidden)
    assert [a.shape for a in peer] == [a.shape for a in ours.values()]
    assert sum(a.size for a in peer) == mlp_param_count(hidden)
    for got, want in zip(peer, ours.values(), strict=True):
        assert got.dtype == np.float32
        np.testing.assert_array_equal(got, want)


def test_the_peer_training_is_noise_trainers_fit() -> None:
    workload = load_workload()
    hidden = MODEL_SIZES["100k"]
    trainer = NoiseTrainer(noise_spec([784, hidden, 10]))
    params = trainer.init_params()
    X, y = np.zeros((32, 784), np.float32), np.zeros(32, np.int64)
    for call_seed in (0, 7, 123_456):
        want = trainer.fit(params, X, y, seed=call_seed)
        got = workload.perturb(list(params.values()), call_seed=call_seed)
        assert want.num_samples == workload.SHARD_EXAMPLES
        for g, w in zip(got, want.params.values(), strict=True):
            np.testing.assert_array_equal(g, w)
        assert any(not np.array_equal(g, p) for g, p in zip(got, params.values(), strict=True))
