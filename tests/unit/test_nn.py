"""Unit tests for shared.nn: gradients against finite differences, learning, parameter handling."""

from __future__ import annotations

import numpy as np
import pytest

from fedmq.shared.data import load_dataset
from fedmq.shared.errors import ConfigError, DataError, TrainingError
from fedmq.shared.nn import ACTIVATIONS, LOSSES, MLP, forward_backward, mlp_param_shapes


def _problem(seed: int = 0, n: int = 7, d: int = 4, k: int = 3):
    rng = np.random.default_rng(seed)
    return rng.standard_normal((n, d)), rng.integers(0, k, size=n)


def _numeric_grads(params64, X, y, *, activation, loss, mu=0.0, ref=None, eps=1e-6):
    """Central finite differences of forward_backward's loss, in float64."""
    grads = {}
    for name, p in params64.items():
        g = np.zeros_like(p)
        for i in np.ndindex(p.shape):
            old = p[i]
            p[i] = old + eps
            up, _ = forward_backward(
                params64, X, y, activation=activation, loss=loss, mu=mu, ref=ref
            )
            p[i] = old - eps
            down, _ = forward_backward(
                params64, X, y, activation=activation, loss=loss, mu=mu, ref=ref
            )
            p[i] = old
            g[i] = (up - down) / (2 * eps)
        grads[name] = g
    return grads


def _rel_err(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.max(np.abs(a - b)) / max(np.max(np.abs(a)) + np.max(np.abs(b)), 1e-12))


@pytest.mark.parametrize("loss", LOSSES)
@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_gradients_match_finite_differences_float64(activation, loss):
    X, y = _problem()
    net = MLP([4, 5, 6, 3], activation, loss, seed=1)
    params = {k: v.astype(np.float64) for k, v in net.get_params().items()}
    for k in params:  # non-zero biases so every path is exercised
        if k.endswith("/b"):
            params[k] = np.random.default_rng(2).standard_normal(params[k].shape) * 0.1
    _, analytic = forward_backward(params, X, y, activation=activation, loss=loss)
    numeric = _numeric_grads(params, X, y, activation=activation, loss=loss)
    for name in params:
        assert analytic[name].dtype == np.float64
        assert _rel_err(analytic[name], numeric[name]) < 1e-6, name


@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_proximal_term_gradient(activation):
    X, y = _problem(seed=3)
    net = MLP([4, 5, 3], activation, "cross-entropy", seed=4)
    params = {k: v.astype(np.float64) for k, v in net.get_params().items()}
    rng = np.random.default_rng(5)
    ref = {k: v + 0.3 * rng.standard_normal(v.shape) for k, v in params.items()}
    loss0, g0 = forward_backward(params, X, y, activation=activation, loss="cross-entropy")
    loss_mu, g_mu = forward_backward(
        params, X, y, activation=activation, loss="cross-entropy", mu=0.7, ref=ref
    )
    sq = sum(float(np.sum((params[k] - ref[k]) ** 2)) for k in params)
    assert loss_mu == pytest.approx(loss0 + 0.35 * sq, rel=1e-12)
    numeric = _numeric_grads(
        params, X, y, activation=activation, loss="cross-entropy", mu=0.7, ref=ref
    )
    for name in params:
        assert _rel_err(g_mu[name], numeric[name]) < 1e-6, name
        np.testing.assert_allclose(
            g_mu[name] - g0[name], 0.7 * (params[name] - ref[name]), rtol=1e-10, atol=1e-12
        )


@pytest.mark.parametrize("loss", LOSSES)
@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_float32_model_gradients_match_finite_differences(activation, loss):
    """The float32 model path: directional derivative check with a large step (robust in float32)."""
    X, y = _problem(seed=6)
    net = MLP([4, 6, 3], activation, loss, seed=7)
    ref = {k: v + 0.1 for k, v in net.get_params().items()}
    _, grads = net.loss_and_grads(X, y, mu=0.5, ref=ref)
    assert all(g.dtype == np.float32 for g in grads.values())
    base = net.get_params()
    rng = np.random.default_rng(8)
    direction = {k: rng.standard_normal(v.shape).astype(np.float32) for k, v in base.items()}
    eps = 1e-3

    def loss_at(sign: float) -> float:
        net.set_params({k: base[k] + sign * eps * direction[k] for k in base})
        value, _ = net.loss_and_grads(X, y, mu=0.5, ref=ref)
        return value

    numeric = (loss_at(1.0) - loss_at(-1.0)) / (2 * eps)
    analytic = sum(float(np.sum(grads[k].astype(np.float64) * direction[k])) for k in base)
    assert numeric == pytest.approx(analytic, rel=2e-2, abs=1e-3)


def test_mse_loss_definition():
    net = MLP([3, 2], "relu", "mse", seed=0)
    X = np.ones((2, 3), dtype=np.float32)
    y = np.array([0, 1])
    out = net.predict_proba(X)
    onehot = np.eye(2)[y]
    expected = 0.5 * np.sum((out - onehot) ** 2) / 2
    assert net.evaluate(X, y)[0] == pytest.approx(expected, rel=1e-5)


def test_xor_reaches_95_percent():
    ds = load_dataset("xor", seed=0)
    net = MLP([2, 16, 2], "relu", "cross-entropy", seed=0)
    net.fit(ds.X_train, ds.y_train, epochs=200, batch_size=32, lr=0.5, seed=0)
    _, acc = net.evaluate(ds.X_test, ds.y_test)
    assert acc >= 0.95


def test_digits_centralised_reaches_96_percent():
    """Mean over three train/test splits, so one unlucky split cannot decide the test."""
    accuracies = []
    for seed in range(3):
        ds = load_dataset("digits", seed=seed)
        net = MLP([64, 64, 10], "relu", "cross-entropy", seed=seed)
        net.fit(ds.X_train, ds.y_train, epochs=30, batch_size=32, lr=0.1, seed=seed)
        accuracies.append(net.evaluate(ds.X_test, ds.y_test)[1])
    assert np.mean(accuracies) >= 0.96, accuracies
    assert min(accuracies) >= 0.95, accuracies


def test_zero_hidden_layers_is_logistic_regression():
    ds = load_dataset("iris", seed=0)
    net = MLP([4, 3], seed=0)
    assert list(net.get_params()) == ["dense_0/W", "dense_0/b"]
    net.fit(ds.X_train, ds.y_train, epochs=50, batch_size=16, lr=0.1)
    assert net.evaluate(ds.X_test, ds.y_test)[1] >= 0.85


def test_fit_reduces_loss_and_returns_last_epoch_mean():
    ds = load_dataset("wine", seed=0)
    net = MLP([13, 8, 3], "sigmoid", seed=0)
    before, _ = net.evaluate(ds.X_train, ds.y_train)
    last = net.fit(ds.X_train, ds.y_train, epochs=20, batch_size=16, lr=0.1)
    after, _ = net.evaluate(ds.X_train, ds.y_train)
    assert after < before
    assert np.isfinite(last) and last < before


def test_fedprox_keeps_weights_closer_to_reference():
    ds = load_dataset("wine", seed=0)
    start = MLP([13, 8, 3], seed=0).get_params()

    def drift(mu: float) -> float:
        net = MLP([13, 8, 3], seed=0)
        net.fit(ds.X_train, ds.y_train, epochs=10, batch_size=16, lr=0.1, mu=mu, ref=start)
        return sum(float(np.sum((v - start[k]) ** 2)) for k, v in net.get_params().items())

    assert drift(1.0) < drift(0.0)


def test_params_names_shapes_and_dtypes():
    net = MLP([5, 4, 3, 2], seed=0)
    params = net.get_params()
    assert list(params) == [
        "dense_0/W",
        "dense_0/b",
        "dense_1/W",
        "dense_1/b",
        "dense_2/W",
        "dense_2/b",
    ]
    assert net.param_shapes() == mlp_param_shapes([5, 4, 3, 2])
    assert net.param_shapes()["dense_1/W"] == (4, 3)
    assert all(v.dtype == np.float32 for v in params.values())
    assert net.num_params == 5 * 4 + 4 + 4 * 3 + 3 + 3 * 2 + 2


def test_get_params_returns_copies_and_set_params_stores_copies():
    net = MLP([3, 2], seed=0)
    params = net.get_params()
    params["dense_0/W"][:] = 42
    assert not np.any(net.get_params()["dense_0/W"] == 42)
    new = {k: np.ones_like(v, dtype=np.float64) for k, v in params.items()}
    net.set_params(new)
    new["dense_0/W"][:] = 7
    got = net.get_params()
    assert got["dense_0/W"].dtype == np.float32
    assert np.all(got["dense_0/W"] == 1)


def test_init_is_deterministic_from_seed():
    a = MLP([8, 6, 3], seed=3).get_params()
    b = MLP([8, 6, 3], seed=3).get_params()
    c = MLP([8, 6, 3], seed=4).get_params()
    for k in a:
        np.testing.assert_array_equal(a[k], b[k])
    assert not np.array_equal(a["dense_0/W"], c["dense_0/W"])


def test_fit_is_deterministic_from_seed():
    X, y = _problem(n=40)
    results = []
    for _ in range(2):
        net = MLP([4, 5, 3], seed=0)
        net.fit(X, y, epochs=3, batch_size=8, lr=0.1, momentum=0.5, seed=9)
        results.append(net.get_params())
    for k in results[0]:
        np.testing.assert_array_equal(results[0][k], results[1][k])


def test_set_params_rejects_wrong_shape_naming_layer():
    net = MLP([64, 32, 10], seed=0)
    params = net.get_params()
    params["dense_1/W"] = np.zeros((64, 10), dtype=np.float32)
    with pytest.raises(ConfigError, match=r"dense_1/W.*\(64, 10\).*\(32, 10\)"):
        net.set_params(params)


def test_set_params_rejects_missing_and_unknown_keys():
    net = MLP([4, 3, 2], seed=0)
    params = net.get_params()
    del params["dense_1/b"]
    with pytest.raises(ConfigError, match="dense_1/b"):
        net.set_params(params)
    params = net.get_params()
    params["dense_9/W"] = np.zeros(1)
    with pytest.raises(ConfigError, match="dense_9/W"):
        net.set_params(params)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"activation": "softplus"}, "sigmoid, tanh, relu"),
        ({"loss": "hinge"}, "cross-entropy, mse"),
    ],
)
def test_bad_names_raise_config_error(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        MLP([3, 2], **kwargs)


@pytest.mark.parametrize("sizes", [[3], [3, 0, 2], "abc", [3, 2.5]])
def test_bad_layer_sizes(sizes):
    with pytest.raises(ConfigError):
        MLP(sizes)


def test_bad_inputs_raise_data_error():
    net = MLP([3, 2], seed=0)
    with pytest.raises(DataError, match=r"\(n, 3\)"):
        net.evaluate(np.zeros((4, 5)), np.zeros(4, dtype=int))
    with pytest.raises(DataError, match="0..1"):
        net.evaluate(np.zeros((4, 3)), np.array([0, 1, 2, 0]))
    with pytest.raises(DataError, match="NaN or Inf"):
        net.fit(np.full((4, 3), np.nan), np.zeros(4, dtype=int), epochs=1, batch_size=2, lr=0.1)
    with pytest.raises(DataError, match="one integer label per row"):
        net.evaluate(np.zeros((4, 3)), np.zeros(3, dtype=int))


def test_bad_hyperparameters_raise_config_error():
    net = MLP([3, 2], seed=0)
    X, y = np.zeros((4, 3)), np.zeros(4, dtype=int)
    with pytest.raises(ConfigError, match="batch_size"):
        net.fit(X, y, epochs=1, batch_size=0, lr=0.1)
    with pytest.raises(ConfigError, match="lr"):
        net.fit(X, y, epochs=1, batch_size=2, lr=-1)
    with pytest.raises(ConfigError, match="ref"):
        net.fit(X, y, epochs=1, batch_size=2, lr=0.1, mu=0.1)


def test_divergence_raises_training_error():
    X, y = _problem(n=50)
    net = MLP([4, 64, 3], "relu", "mse", seed=0)
    with pytest.raises(TrainingError, match="lower lr"):
        net.fit(X * 1e4, y, epochs=20, batch_size=10, lr=10.0)


def test_predict_proba_rows_sum_to_one():
    X, _ = _problem(n=10)
    p = MLP([4, 5, 3], seed=0).predict_proba(X)
    assert p.shape == (10, 3)
    np.testing.assert_allclose(p.sum(axis=1), 1.0, rtol=1e-5)
