"""Strategies against their formulas, computed by hand with numpy, plus one shared contract."""

from __future__ import annotations

import math

import numpy as np
import pytest

from fedmq.aggregator.strategies import (
    STRATEGIES,
    Contribution,
    FedAsync,
    FedAvg,
    FedBuff,
    Strategy,
    fedbuff_staleness,
    make_staleness,
    make_strategy,
    weighted_average,
)
from fedmq.shared.errors import ConfigError


def params(seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {"dense_0/W": rng.standard_normal((5, 3)).astype(np.float32),
            "dense_0/b": rng.standard_normal(3).astype(np.float32)}


# ------------------------------------------------------------------ staleness functions
def test_staleness_functions_match_the_paper() -> None:
    const, poly, hinge = make_staleness("constant"), make_staleness("polynomial", 0.5), make_staleness("hinge", 10, 4)
    for tau in range(0, 12):
        assert const(tau) == 1.0
        assert poly(tau) == pytest.approx((tau + 1) ** -0.5)
        assert hinge(tau) == pytest.approx(1.0 if tau <= 4 else 1.0 / (10 * (tau - 4) + 1))
        assert fedbuff_staleness()(tau) == pytest.approx(1 / math.sqrt(1 + tau))


def test_unknown_names_are_config_errors() -> None:
    with pytest.raises(ConfigError, match="staleness"):
        make_staleness("cubic")
    with pytest.raises(ConfigError, match="fedavg"):
        make_strategy("fedsgd")
    with pytest.raises(ConfigError):
        FedAsync(mixing=0.0)
    with pytest.raises(ConfigError):
        FedBuff(buffer_size=0)


# ------------------------------------------------------------------ FedAvg
def test_fedavg_is_sample_weighted_average() -> None:
    ups = [(params(i), n) for i, n in enumerate([10, 30, 60])]
    res = FedAvg().aggregate(params(99), [Contribution(p, n) for p, n in ups])
    assert res.weights == (0.1, 0.3, 0.6)
    out = res.params
    assert out is not None
    for k in out:
        expected = np.average(np.stack([p[k] for p, _ in ups]), axis=0, weights=[10, 30, 60])
        np.testing.assert_allclose(out[k], expected, rtol=1e-6, atol=1e-7)
        assert out[k].dtype == np.float32


def test_weighted_average_is_deterministic_in_order() -> None:
    ups = [(params(i), float(i + 1)) for i in range(5)]
    a, b = weighted_average(ups), weighted_average(ups)
    assert all(a[k].tobytes() == b[k].tobytes() for k in a)


# ------------------------------------------------------------------ FedAsync
@pytest.mark.parametrize("tau", [0, 1, 3, 9])
def test_fedasync_mixes_with_staleness_weighted_alpha(tau: int) -> None:
    x, x_new = params(0), params(1)
    strat = FedAsync(mixing=0.6, staleness=make_staleness("polynomial", 0.5))
    res = strat.apply(x, x_new, 50, tau)
    alpha = 0.6 * (tau + 1) ** -0.5
    assert res.weight == pytest.approx(alpha)
    for k in x:
        np.testing.assert_allclose(res.params[k], (1 - alpha) * x[k] + alpha * x_new[k], rtol=1e-6, atol=1e-7)


# ------------------------------------------------------------------ FedBuff
def test_fedbuff_steps_every_k_with_staleness_weighted_mean_delta() -> None:
    x = params(0)
    deltas = [params(10 + i) for i in range(3)]
    taus = [0, 2, 5]
    strat = FedBuff(buffer_size=3, server_lr=0.5)
    assert strat.apply(x, deltas[0], 10, taus[0]).params is None
    assert strat.apply(x, deltas[1], 10, taus[1]).params is None
    res = strat.apply(x, deltas[2], 10, taus[2])
    assert res.params is not None and res.weight == pytest.approx(1 / math.sqrt(6))
    for k in x:
        step = sum(d[k] / math.sqrt(1 + t) for d, t in zip(deltas, taus, strict=True)) / 3
        np.testing.assert_allclose(res.params[k], x[k] + 0.5 * step, rtol=1e-5, atol=1e-6)
    # the buffer starts empty again
    assert strat.count == 0
    assert strat.apply(x, deltas[0], 10, 0).params is None


def test_fedbuff_keeps_no_model_once_stepped_from_and_steps_the_same_bits() -> None:
    """Between steps FedBuff holds its accumulator only: the model a step started from is freed
    when the caller lets it go (no spare model kept for the next step: a model's worth of memory),
    and every step's result is exactly x + (lr / K) * sum(s_i * delta_i) in float32."""
    import gc
    import weakref

    strat = FedBuff(buffer_size=2, server_lr=0.5)
    x = params(0)
    for step in range(4):
        deltas = [params(20 + 2 * step + i) for i in range(2)]
        assert strat.apply(x, deltas[0], 10, 0).params is None
        new = strat.apply(x, deltas[1], 10, 1).params
        assert new is not None
        w1 = np.float32(strat.staleness(1))
        for k in x:
            acc = np.zeros_like(x[k]) + deltas[0][k] * np.float32(1.0)
            acc += deltas[1][k] * w1
            acc *= np.float32(0.5 / 2)
            assert np.array_equal(new[k], x[k] + acc)
        old = weakref.ref(x["dense_0/W"])
        x = new
        gc.collect()
        assert old() is None  # the model stepped from is not held by the strategy


def test_fedbuff_state_round_trips_through_a_checkpoint() -> None:
    x = params(0)
    a, b = FedBuff(buffer_size=3), FedBuff(buffer_size=3)
    a.apply(x, params(1), 10, 1)
    a.apply(x, params(2), 10, 0)
    meta, arrays = a.state()
    b.restore(meta, {k: v.copy() for k, v in arrays.items()})
    ra, rb = a.apply(x, params(3), 10, 2), b.apply(x, params(3), 10, 2)
    assert all(np.array_equal(ra.params[k], rb.params[k]) for k in x)


# ------------------------------------------------------------------ the shared contract
def _run(name: str, x: dict[str, np.ndarray], ups: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """Offer every update to the strategy in one call, through the Strategy protocol only."""
    strat: Strategy = make_strategy(name, buffer_size=len(ups))
    contributions = [Contribution({k: u[k] - x[k] for k in x} if strat.update_kind == "delta" else u, 10, 0) for u in ups]
    res = strat.aggregate(x, contributions)
    assert len(res.weights) == len(ups)
    assert res.params is not None
    return res.params


@pytest.mark.parametrize("name", STRATEGIES)
def test_every_strategy_round_trips_its_state(name: str) -> None:
    """state() then restore() on a fresh instance continues exactly where the first one was."""
    x = params(0)
    a, b = make_strategy(name, buffer_size=2), make_strategy(name, buffer_size=2)
    first = Contribution(params(1) if a.update_kind == "weights" else {k: params(1)[k] - x[k] for k in x}, 10, 1)
    a.aggregate(x, [first])
    meta, arrays = a.state()
    b.restore(meta, {k: v.copy() for k, v in arrays.items()})
    second = [Contribution(params(2) if a.update_kind == "weights" else {k: params(2)[k] - x[k] for k in x}, 20, 0)]
    ra, rb = a.aggregate(x, second), b.aggregate(x, second)
    assert ra.weights == rb.weights
    assert (ra.params is None) == (rb.params is None)
    if ra.params is not None and rb.params is not None:
        assert all(np.array_equal(ra.params[k], rb.params[k]) for k in x)


@pytest.mark.parametrize("name", STRATEGIES)
def test_every_strategy_keeps_shapes_dtypes_and_inputs(name: str) -> None:
    x = params(0)
    ups = [params(1), params(2)]
    frozen = {k: v.copy() for k, v in x.items()}
    ups_frozen = [{k: v.copy() for k, v in u.items()} for u in ups]
    for u in ups:
        for v in u.values():
            v.setflags(write=False)  # decoded arrays are read-only views
    out = _run(name, x, ups)
    assert list(out) == list(x)
    for k in x:
        assert out[k].shape == x[k].shape and out[k].dtype == np.float32
        assert np.array_equal(x[k], frozen[k]), "the current model was mutated"
    for u, f in zip(ups, ups_frozen, strict=True):
        assert all(np.array_equal(u[k], f[k]) for k in u)


@pytest.mark.parametrize("name", STRATEGIES)
def test_every_strategy_is_a_fixed_point_when_everyone_agrees(name: str) -> None:
    """If every update equals the current model (no progress), the model does not move."""
    x = params(0)
    out = _run(name, x, [{k: v.copy() for k, v in x.items()} for _ in range(3)])
    for k in x:
        np.testing.assert_allclose(out[k], x[k], rtol=1e-6, atol=1e-7)
