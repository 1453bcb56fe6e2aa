"""Robust aggregation rules against hand computations and references, plus one shared contract."""

from __future__ import annotations

import re

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fedmq.aggregator import robust
from fedmq.aggregator.robust import (
    ROBUST_RULES,
    ClippedMean,
    RobustAggregationError,
    RobustRule,
    adaptive_clip_norm,
    clip_scale,
    coordinate_median,
    krum,
    make_robust,
    multi_krum,
    norm_clip,
    pairwise_sq_distances,
    trim_count,
    trimmed_mean,
    trimmed_mean_min_updates,
    update_norm,
)
from fedmq.aggregator.strategies import weighted_average
from fedmq.shared.errors import ConfigError, FedmqError

Params = dict[str, np.ndarray]


def params(seed: int, scale: float = 1.0) -> Params:
    rng = np.random.default_rng(seed)
    return {"dense_0/W": (scale * rng.standard_normal((5, 3))).astype(np.float32),
            "dense_0/b": (scale * rng.standard_normal(3)).astype(np.float32)}


def vec(*values: float) -> Params:
    """A one-layer update (handy for hand computations)."""
    return {"w": np.array(values, dtype=np.float32)}


def flat(update: Params) -> np.ndarray:
    return np.concatenate([np.asarray(update[k], dtype=np.float64).reshape(-1) for k in sorted(update)])


def stacked(updates: list[Params]) -> np.ndarray:
    return np.stack([flat(u) for u in updates])


def frozen(updates: list[Params]) -> list[Params]:
    """Copies whose arrays are read-only: any write by a rule raises."""
    out = []
    for u in updates:
        c = {k: v.copy() for k, v in u.items()}
        for v in c.values():
            v.flags.writeable = False
        out.append(c)
    return out


def assert_params_close(got: Params, want: Params, **tol: float) -> None:
    assert list(got) == list(want)
    for k in want:
        assert got[k].dtype == np.float32 and got[k].shape == want[k].shape
        np.testing.assert_allclose(got[k], want[k], **({"rtol": 1e-6, "atol": 1e-6} | tol))


# ------------------------------------------------------------------ trimmed mean
def test_trimmed_mean_by_hand() -> None:
    updates = [vec(1, -50), vec(2, 0), vec(3, 1), vec(4, 2), vec(100, 3)]
    res = trimmed_mean(updates, 0.2)  # b = 1: drop the largest and smallest of each coordinate
    np.testing.assert_allclose(res.params["w"], [3.0, 1.0])
    assert res.params["w"].dtype == np.float32 and res.selected is None
    np.testing.assert_allclose(trimmed_mean(updates, 0.0).params["w"], [22.0, -8.8], rtol=1e-6)


@pytest.mark.parametrize(("k", "beta"), [(5, 0.2), (10, 0.1), (10, 0.25), (7, 0.3), (20, 0.45), (4, 0.0)])
def test_trimmed_mean_matches_the_reference(k: int, beta: float) -> None:
    updates = [params(i) for i in range(k)]
    x = stacked(updates)
    try:
        from scipy.stats import trim_mean
        want = trim_mean(x, beta, axis=0)
    except ImportError:  # pragma: no cover - the same definition, by hand
        b = int(beta * k)
        want = np.sort(x, axis=0)[b : k - b].mean(axis=0)
    np.testing.assert_allclose(flat(trimmed_mean(updates, beta).params), want, rtol=1e-6, atol=1e-6)


def test_trim_count_and_the_fewest_updates() -> None:
    assert [trim_count(0.2, k) for k in (4, 5, 9, 10)] == [0, 1, 1, 2]
    assert trim_count(0.29, 100) == 29  # not 28 from 0.29 * 100 = 28.999999999999996
    assert trimmed_mean_min_updates(0.0) == 1
    assert trimmed_mean_min_updates(0.1) == 10
    assert trimmed_mean_min_updates(0.2) == 5
    assert trimmed_mean_min_updates(0.25) == 4
    assert trimmed_mean_min_updates(0.3) == 4
    assert trimmed_mean_min_updates(0.49) == 3
    for beta in (0.01, 0.07, 0.1, 0.15, 0.2, 0.33, 0.34):
        need = trimmed_mean_min_updates(beta)
        assert trim_count(beta, need) >= 1 > trim_count(beta, need - 1)


def test_trimmed_mean_refuses_a_k_that_trims_nothing() -> None:
    with pytest.raises(RobustAggregationError, match=r"needs at least 10 updates, got 5 .*must be at least 1"):
        trimmed_mean([params(i) for i in range(5)], 0.1)


# ------------------------------------------------------------------ median
def test_median_by_hand() -> None:
    np.testing.assert_allclose(coordinate_median([vec(1, 9), vec(5, -1), vec(3, 4)]).params["w"], [3, 4])
    np.testing.assert_allclose(coordinate_median([vec(1), vec(2), vec(3), vec(10)]).params["w"], [2.5])


@pytest.mark.parametrize("k", [3, 4, 7, 10])
def test_median_matches_numpy(k: int) -> None:
    updates = [params(i) for i in range(k)]
    res = coordinate_median(updates)
    for name in updates[0]:
        want = np.median(np.stack([u[name].astype(np.float64) for u in updates]), axis=0)
        np.testing.assert_allclose(res.params[name], want, rtol=1e-6)


# ------------------------------------------------------------------ Krum
def brute_krum(updates: list[Params], f: int, m: int) -> tuple[int, ...]:
    """Blanchard et al.'s selection written out the slow way."""
    x = stacked(updates)
    k = len(x)
    scores = []
    for i in range(k):
        d = sorted(float(((x[i] - x[j]) ** 2).sum()) for j in range(k) if j != i)
        scores.append(sum(d[: k - f - 2]))
    order = sorted(range(k), key=lambda i: (scores[i], i))
    return tuple(sorted(order[:m]))


def test_multi_krum_by_hand() -> None:
    updates = [vec(0), vec(1), vec(2), vec(3), vec(100)]
    # f = 1: each score sums the K - f - 2 = 2 nearest squared distances:
    # 0 -> 1+4 = 5, 1 -> 1+1 = 2, 2 -> 1+1 = 2, 3 -> 1+4 = 5, 100 -> 97²+98² = 19013
    res = multi_krum(updates, f=1)
    assert res.selected == (0, 1, 2, 3)
    np.testing.assert_allclose(res.params["w"], [1.5])
    assert multi_krum(updates, f=1, m=2).selected == (1, 2)
    res = multi_krum(updates, f=1, m=2, weights=[1, 1, 3, 1, 1])
    np.testing.assert_allclose(res.params["w"], [(1 * 1 + 3 * 2) / 4])
    one = krum(updates, f=1)  # the tie between 1 and 2 goes to the lower index
    assert one.selected == (1,)
    np.testing.assert_array_equal(one.params["w"], [1.0])


@pytest.mark.parametrize(("k", "f", "m"), [(5, 1, None), (7, 2, None), (9, 2, 3), (12, 3, 1), (10, 0, 4)])
def test_multi_krum_matches_a_brute_force_reference(k: int, f: int, m: int | None) -> None:
    updates = [params(i, scale=1.0 + i % 3) for i in range(k)]
    res = multi_krum(updates, f, m)
    want = brute_krum(updates, f, k - f if m is None else m)
    assert res.selected == want
    assert_params_close(res.params, weighted_average([(updates[i], 1.0) for i in want]))


def test_pairwise_distances_match_numpy() -> None:
    updates = [params(i) for i in range(6)]
    x = stacked(updates)
    want = ((x[:, None, :] - x[None, :, :]) ** 2).sum(axis=2)
    got = pairwise_sq_distances(updates)
    np.testing.assert_allclose(got, want, rtol=1e-12)
    assert np.array_equal(got, got.T) and not got.diagonal().any()


def test_multi_krum_drops_two_sign_flipped_attackers_among_ten() -> None:
    rng = np.random.default_rng(7)
    base = params(100)
    honest = [{k: (v + 0.1 * rng.standard_normal(v.shape)).astype(np.float32) for k, v in base.items()}
              for _ in range(8)]
    attackers = {3, 8}
    updates, it = [], iter(honest)
    for i in range(10):
        updates.append({k: (-10 * v).astype(np.float32) for k, v in base.items()} if i in attackers else next(it))
    res = multi_krum(updates, f=2)
    assert res.selected == tuple(i for i in range(10) if i not in attackers)
    assert_params_close(res.params, weighted_average([(h, 1.0) for h in honest]), rtol=1e-5, atol=1e-6)
    assert krum(updates, f=2).selected[0] not in attackers  # type: ignore[index]
    # the plain mean is dragged far off; Multi-Krum stays with the honest ones
    plain = weighted_average([(u, 1.0) for u in updates])
    assert np.linalg.norm(flat(plain) - flat(base)) > 10 * np.linalg.norm(flat(res.params) - flat(base))


def test_multi_krum_refuses_bad_m_and_zero_weights() -> None:
    updates = [params(i) for i in range(7)]
    with pytest.raises(RobustAggregationError, match=r"needs at least 8 updates, got 7 \(m\+f\)"):
        multi_krum(updates, f=2, m=6)
    with pytest.raises(ConfigError, match="must be a whole number >= 1"):
        multi_krum(updates, f=2, m=0)
    with pytest.raises(RobustAggregationError, match="weights sum to 0"):
        multi_krum(updates, f=2, m=1, weights=[0.0] * 7)


# ------------------------------------------------------------------ norm clipping
def test_norm_clip_by_hand() -> None:
    updates = [vec(3, 4), vec(0.3, 0.4)]  # norms 5 and 0.5
    res = norm_clip(updates, 1.0)
    np.testing.assert_allclose(res.params["w"], [(0.6 + 0.3) / 2, (0.8 + 0.4) / 2], rtol=1e-6)
    assert res.clipped == 1 and res.norms == pytest.approx((5.0, 0.5)) and res.clip == 1.0
    res = norm_clip(updates, 1.0, weights=[1, 3])
    np.testing.assert_allclose(res.params["w"], [(0.6 + 3 * 0.3) / 4, (0.8 + 3 * 0.4) / 4], rtol=1e-6)
    # full weights: the deltas from the reference are clipped, and the reference added back
    ref = vec(10, -10)
    full = [{"w": u["w"] + ref["w"]} for u in updates]
    res = norm_clip(full, 1.0, reference=ref)
    np.testing.assert_allclose(res.params["w"], [10.45, -9.4], rtol=1e-6)


def test_norm_over_all_layers() -> None:
    u = {"a": np.array([3.0], np.float32), "b": np.array([[4.0]], np.float32)}
    assert update_norm(u) == pytest.approx(5.0)
    assert update_norm(u, {"a": np.array([3.0], np.float32), "b": np.array([[1.0]], np.float32)}) == pytest.approx(3.0)
    assert clip_scale(u, 2.5) == pytest.approx((0.5, 5.0))
    assert clip_scale(u, 10.0) == pytest.approx((1.0, 5.0))
    with pytest.raises(ConfigError, match="--clip-norm must be a finite number >= 0"):
        clip_scale(u, -1.0)


def test_norm_clip_bounds_the_influence_of_a_scaled_update() -> None:
    honest = [params(i) for i in range(9)]
    attacker = {k: 100 * v for k, v in params(50).items()}
    updates = [*honest, attacker]
    clip = adaptive_clip_norm(update_norm(u) for u in updates)
    assert clip == pytest.approx(float(np.median([update_norm(u) for u in updates])))
    res = norm_clip(updates, clip)
    assert res.clipped >= 1 and res.norms is not None and res.norms[-1] > 50 * clip
    honest_part = norm_clip(honest, clip).params  # the mean of the 9 clipped honest deltas
    honest_sum = {k: v * 9 / 10 for k, v in honest_part.items()}
    influence = np.linalg.norm(flat(res.params) - flat(honest_sum))
    assert influence <= clip / 10 * (1 + 1e-5)  # one update moves the mean by at most C / K
    plain = weighted_average([(u, 1.0) for u in updates])
    assert np.linalg.norm(flat(plain) - flat(honest_sum)) > 5 * clip
    assert np.linalg.norm(flat(res.params)) <= clip * (1 + 1e-5)  # a mean of vectors of norm <= C


def test_clipped_mean_streams_what_norm_clip_computes() -> None:
    updates = [params(i, scale=1 + i) for i in range(6)]
    weights = [1.0, 2.0, 0.5, 3.0, 1.0, 1.0]
    acc = ClippedMean(3.0)
    norms = [acc.add(u, w) for u, w in zip(updates, weights, strict=True)]
    res, batch = acc.result(), norm_clip(updates, 3.0, weights)
    assert acc.count == 6 and acc.clipped == batch.clipped and tuple(norms) == batch.norms
    for k in res.params:
        np.testing.assert_array_equal(res.params[k], batch.params[k])
    with pytest.raises(RobustAggregationError, match="at least 1 update"):
        ClippedMean(1.0).result()
    with pytest.raises(RobustAggregationError, match="layer 'dense_0/b' of shape"):
        acc.add({"dense_0/W": updates[0]["dense_0/W"], "dense_0/b": np.zeros(4, np.float32)})


def test_adaptive_clip_norm_is_the_median() -> None:
    assert adaptive_clip_norm([1.0, 100.0, 2.0]) == 2.0
    assert adaptive_clip_norm(iter([1.0, 2.0, 3.0, 4.0])) == 2.5
    with pytest.raises(RobustAggregationError, match="at least one recent norm"):
        adaptive_clip_norm([])
    with pytest.raises(RobustAggregationError, match="finite and non-negative"):
        adaptive_clip_norm([1.0, float("nan")])


# ------------------------------------------------------------------ one contract for every rule
RULES = [
    RobustRule("none"),
    RobustRule("trimmed-mean", trim_fraction=0.2),
    RobustRule("trimmed-mean", trim_fraction=0.0),
    RobustRule("median"),
    RobustRule("multi-krum", byzantine=1),
    RobustRule("multi-krum", byzantine=2, select=1),
    RobustRule("norm-clip", clip_norm=1.0),
    RobustRule("norm-clip"),  # adaptive
]
IDS = [r.options.removeprefix("--robust ").replace(" ", "") for r in RULES]


def test_every_rule_name_is_covered() -> None:
    assert {r.name for r in RULES} == set(ROBUST_RULES)


@pytest.mark.parametrize("rule", RULES, ids=IDS)
def test_identical_updates_give_the_plain_mean(rule: RobustRule) -> None:
    k = max(rule.min_updates(), 7)
    one = params(1, scale=0.1)  # norm below 1: the fixed clip leaves it alone
    assert update_norm(one) < 1.0
    res = rule.aggregate([one] * k, [float(i + 1) for i in range(k)])
    assert_params_close(res.params, one, rtol=1e-7, atol=0)
    assert res.clipped == 0


@pytest.mark.parametrize("rule", RULES, ids=IDS)
def test_rules_never_mutate_their_inputs(rule: RobustRule) -> None:
    k = max(rule.min_updates(), 7)
    updates = [params(i, scale=1 + i) for i in range(k)]
    copies = [{n: v.copy() for n, v in u.items()} for u in updates]
    reference = params(99)
    ref_copy = {n: v.copy() for n, v in reference.items()}
    weights = [float(i + 1) for i in range(k)]
    res = rule.aggregate(frozen(updates), weights, reference=frozen([reference])[0])
    rule.aggregate(updates, weights, reference=reference)
    for u, c in zip(updates, copies, strict=True):
        for n in u:
            np.testing.assert_array_equal(u[n], c[n])
    for n in reference:
        np.testing.assert_array_equal(reference[n], ref_copy[n])
    for n, v in res.params.items():  # the result shares no memory with the inputs
        assert v.dtype == np.float32 and not any(np.shares_memory(v, u[n]) for u in updates)


@pytest.mark.parametrize("rule", RULES, ids=IDS)
def test_rules_refuse_too_few_updates_clearly(rule: RobustRule) -> None:
    need = rule.min_updates()
    updates = [params(i) for i in range(need)]
    rule.aggregate(updates)  # exactly enough works
    rule.check(need, given="--buffer-size")
    with pytest.raises(RobustAggregationError, match=rf"needs at least {need} updates?, got {need - 1}"):
        rule.aggregate(updates[: need - 1])
    with pytest.raises(ConfigError, match=rf"^{re.escape(rule.options)} needs at least {need} updates per round/buffer \(.+\), got --buffer-size {need - 1}"):
        rule.check(need - 1, given="--buffer-size")


def test_the_error_messages_say_what_to_fix() -> None:
    with pytest.raises(ConfigError) as err:
        make_robust("multi-krum", byzantine=2).check(3, given="--buffer-size")
    assert str(err.value) == "--robust multi-krum --byzantine 2 needs at least 7 updates per round/buffer (2f+3), got --buffer-size 3"
    with pytest.raises(ConfigError, match=r"got --workers-per-round 5; or raise --trim-fraction to at least 0.2 \(1/K\)"):
        make_robust("trimmed-mean", trim_fraction=0.1).check(5, given="--workers-per-round")
    with pytest.raises(ConfigError, match=r"--clip-norm auto needs at least 3 updates .* got 1 updates"):
        make_robust("norm-clip").check(1)
    make_robust("norm-clip", clip_norm=2.0).check(1)  # a fixed clip works update by update (FedAsync)
    assert issubclass(RobustAggregationError, ValueError) and issubclass(RobustAggregationError, FedmqError)


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"name": "krum-ish"}, "unknown robust rule 'krum-ish'; choose one of none, trimmed-mean, median, multi-krum, norm-clip"),
    ({"name": "trimmed-mean", "trim_fraction": 0.5}, r"--trim-fraction must be in \[0, 0.5\), got 0.5"),
    ({"name": "trimmed-mean", "trim_fraction": -0.1}, r"--trim-fraction must be in \[0, 0.5\)"),
    ({"name": "multi-krum", "byzantine": -1}, "--byzantine must be a whole number >= 0"),
    ({"name": "multi-krum", "byzantine": 1.5}, "--byzantine must be a whole number >= 0"),
    ({"name": "multi-krum", "select": 0}, "--krum-select must be a whole number >= 1"),
    ({"name": "norm-clip", "clip_norm": -1.0}, "--clip-norm must be a finite number >= 0"),
    ({"name": "norm-clip", "clip_norm": 0.0}, "--clip-norm must be positive"),
    ({"name": "norm-clip", "clip_norm": float("inf")}, "--clip-norm must be a finite number"),
])
def test_bad_parameters_are_config_errors(kwargs: dict, message: str) -> None:
    name = kwargs.pop("name")
    with pytest.raises(ConfigError, match=message):
        make_robust(name, **kwargs)


def test_mismatched_updates_and_weights_are_refused() -> None:
    a, b = params(0), params(1)
    missing = {"dense_0/W": b["dense_0/W"]}
    reshaped = {"dense_0/W": b["dense_0/W"].reshape(3, 5), "dense_0/b": b["dense_0/b"]}
    for rule in RULES:
        with pytest.raises(RobustAggregationError, match="update 1 has layers"):
            rule.aggregate([a, missing, a, a, a, a, a])
        with pytest.raises(RobustAggregationError, match=r"update 1 has layer 'dense_0/W' of shape \(3, 5\)"):
            rule.aggregate([a, reshaped, a, a, a, a, a])
    for name in ("none", "multi-krum", "norm-clip"):
        with pytest.raises(RobustAggregationError, match="got 2 weights for 7 updates"):
            make_robust(name, clip_norm=1.0).aggregate([a] * 7, [1.0, 2.0])
        with pytest.raises(RobustAggregationError, match="finite and non-negative"):
            make_robust(name, clip_norm=1.0).aggregate([a] * 7, [1.0] * 6 + [-1.0])


def test_shift_equivariant_rules_need_no_reference() -> None:
    """On full weights, each rule is the reference plus the rule over the deltas."""
    ref = params(42, scale=3.0)
    deltas = [params(i) for i in range(7)]
    full = [{k: (ref[k] + d[k]).astype(np.float32) for k in ref} for d in deltas]
    for rule in RULES:
        on_deltas = rule.aggregate(deltas, reference=None).params
        on_full = rule.aggregate(full, reference=ref).params
        shifted = {k: ref[k] + on_deltas[k] for k in ref}
        assert_params_close(on_full, shifted, rtol=1e-5, atol=1e-5)


def test_small_chunks_give_the_same_answers(monkeypatch: pytest.MonkeyPatch) -> None:
    updates = [params(i, scale=1 + i % 4) for i in range(9)]
    rules = [*RULES, RobustRule("trimmed-mean", trim_fraction=0.34)]
    whole = [r.aggregate(updates) for r in rules]
    distances = pairwise_sq_distances(updates)
    monkeypatch.setattr(robust, "_SCRATCH", 16)  # 1 coordinate per chunk for 9 updates, 16 for norms
    for rule, want in zip(rules, whole, strict=True):
        got = rule.aggregate(updates)
        assert got.selected == want.selected and got.clipped == want.clipped
        assert_params_close(got.params, want.params, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(pairwise_sq_distances(updates), distances, rtol=1e-12)


def test_scalar_layers_work() -> None:
    updates = [{"s": np.float32(v) * np.ones((), np.float32), "v": np.full(2, v, np.float32)} for v in (1, 2, 9, 3, 4)]
    assert coordinate_median(updates).params["s"].shape == ()
    assert float(coordinate_median(updates).params["s"]) == 3.0
    assert float(trimmed_mean(updates, 0.2).params["s"]) == 3.0
    assert multi_krum(updates, 1).selected == (0, 1, 3, 4)


# ------------------------------------------------------------------ properties
coordinate = st.floats(min_value=-1e6, max_value=1e6, allow_nan=False, width=32)


@st.composite
def stacks(draw: st.DrawFn, min_k: int = 3) -> np.ndarray:
    k = draw(st.integers(min_k, 12))
    n = draw(st.integers(1, 6))
    values = draw(st.lists(coordinate, min_size=k * n, max_size=k * n))
    return np.array(values, dtype=np.float32).reshape(k, n)


@settings(max_examples=60, deadline=None)
@given(stacks())
def test_median_lies_between_the_middle_values(x: np.ndarray) -> None:
    got = coordinate_median([{"w": row} for row in x]).params["w"].astype(np.float64)
    s = np.sort(x.astype(np.float64), axis=0)
    k = len(x)
    lo, hi = s[(k - 1) // 2], s[k // 2]
    assert np.all(got >= np.float32(lo)) and np.all(got <= np.float32(hi))
    assert np.all(got >= s[0]) and np.all(got <= s[-1])


@settings(max_examples=60, deadline=None)
@given(stacks(), st.sampled_from([0.0, 0.1, 0.2, 0.25, 0.3, 0.4, 0.49]))
def test_trimmed_mean_lies_within_what_it_keeps(x: np.ndarray, beta: float) -> None:
    k = len(x)
    rows = [{"w": row} for row in x]
    if k < trimmed_mean_min_updates(beta):
        with pytest.raises(RobustAggregationError):
            trimmed_mean(rows, beta)
        return
    got = trimmed_mean(rows, beta).params["w"]
    s = np.sort(x, axis=0)
    b = trim_count(beta, k)
    assert np.all(got >= s[b]) and np.all(got <= s[k - 1 - b])  # float32 rounding stays inside
    assert np.all(got >= s[0]) and np.all(got <= s[-1])
    # and the order of the updates does not matter
    np.testing.assert_array_equal(trimmed_mean(rows[::-1], beta).params["w"], got)
