"""Robust rules and differential privacy composed with the strategies (aggregator/strategies.py)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import dp_accounting
import numpy as np
import pytest

from fedmq.aggregator.config import AggregatorConfig
from fedmq.aggregator.privacy import GaussianDP, make_dp
from fedmq.aggregator.robust import ROBUST_RULES, RobustRule, update_norm
from fedmq.aggregator.strategies import (
    Contribution,
    FedAsync,
    FedAvg,
    FedBuff,
    make_strategy,
    weighted_average,
)
from fedmq.shared.errors import ConfigError

SHAPES = {"W": (6, 4), "b": (4,)}


def params(rng: np.random.Generator, scale: float = 1.0) -> dict[str, np.ndarray]:
    return {k: (rng.normal(0, scale, s)).astype(np.float32) for k, s in SHAPES.items()}


def rules() -> list[RobustRule]:
    return [RobustRule("none"), RobustRule("trimmed-mean", trim_fraction=0.2), RobustRule("median"),
            RobustRule("multi-krum", byzantine=1), RobustRule("norm-clip", clip_norm=100.0), RobustRule("norm-clip")]


IDS = ["none", "trimmed-mean", "median", "multi-krum", "norm-clip", "norm-clip-auto"]


def test_every_rule_is_covered() -> None:
    assert {r.name for r in rules()} == set(ROBUST_RULES)


def frozen(p: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    for v in p.values():
        v.flags.writeable = False
    return p


# ------------------------------------------------------------------ conformance of the composed strategies
@pytest.mark.parametrize("rule", rules(), ids=IDS)
def test_fedavg_with_any_rule_gives_the_update_when_all_are_identical(rule: RobustRule) -> None:
    rng = np.random.default_rng(0)
    current, same = frozen(params(rng)), frozen(params(rng))
    out = FedAvg(rule).aggregate(current, [Contribution(same, 10 + i) for i in range(5)])
    assert out.params is not None
    for k in SHAPES:
        np.testing.assert_allclose(out.params[k], same[k], rtol=1e-6, atol=1e-6)
        assert out.params[k].dtype == np.float32


@pytest.mark.parametrize("rule", rules(), ids=IDS)
def test_fedbuff_with_any_rule_steps_by_the_delta_when_all_are_identical(rule: RobustRule) -> None:
    rng = np.random.default_rng(1)
    current, delta = frozen(params(rng)), frozen(params(rng, 0.1))
    strat = FedBuff(5, server_lr=1.0, robust=rule)
    out = strat.aggregate(current, [Contribution(delta, 7) for _ in range(5)])  # staleness 0: weight 1
    assert out.params is not None
    for k in SHAPES:
        np.testing.assert_allclose(out.params[k], current[k] + delta[k], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("rule", rules(), ids=IDS)
def test_fedbuff_with_a_rule_equals_the_rule_over_the_buffer(rule: RobustRule) -> None:
    """x + η·s̄·R(Δ; s): for the plain mean this is FedBuff's η·(1/K)·Σ s_i·Δ_i."""
    rng = np.random.default_rng(2)
    current = frozen(params(rng))
    deltas = [frozen(params(rng, 0.1 * (1 + i))) for i in range(5)]
    taus = [0, 1, 3, 0, 2]
    s = [1.0 / np.sqrt(1.0 + t) for t in taus]
    strat = FedBuff(5, server_lr=0.5, robust=rule)
    out = strat.aggregate(current, [Contribution(d, 9, t) for d, t in zip(deltas, taus, strict=True)])
    assert out.params is not None
    if rule.needs_all:
        want = rule.aggregate(deltas, s).params
        scale = 0.5 * float(np.mean(s))
    else:
        clip = rule.clip_norm
        recent: list[float] = []
        acc = {k: np.zeros(v, np.float64) for k, v in SHAPES.items()}
        for d, w in zip(deltas, s, strict=True):
            norm = update_norm(d)
            recent.append(norm)
            c = clip if clip is not None else float(np.median(recent))
            f = w * (min(1.0, c / norm) if rule.name == "norm-clip" else 1.0)
            for k in SHAPES:
                acc[k] += f * d[k]
        want, scale = {k: v / 5 for k, v in acc.items()}, 0.5
    for k in SHAPES:
        np.testing.assert_allclose(out.params[k], current[k] + scale * want[k], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("rule", rules(), ids=IDS)
def test_strategies_with_rules_never_mutate_their_inputs(rule: RobustRule) -> None:
    rng = np.random.default_rng(3)
    current = frozen(params(rng))
    ups = [frozen(params(rng)) for _ in range(5)]  # read-only: writing into one raises
    FedAvg(rule).aggregate(current, [Contribution(u, 5) for u in ups])
    FedBuff(5, robust=rule).aggregate(current, [Contribution(u, 5, 1) for u in ups])
    if not rule.needs_all:
        FedAsync(robust=rule).aggregate(current, [Contribution(u, 5, 1) for u in ups])


@pytest.mark.parametrize("rule", rules(), ids=IDS)
def test_rules_take_updates_spilled_to_disk(rule: RobustRule, tmp_path: Path) -> None:
    """Updates may be np.memmap arrays (a round spilled to disk): same answer as in memory."""
    rng = np.random.default_rng(4)
    current = params(rng)
    ups = [params(rng) for _ in range(5)]
    mapped = []
    for i, u in enumerate(ups):
        m = {}
        for k, v in u.items():
            mm = np.memmap(tmp_path / f"{i}-{k}.bin", dtype=np.float32, mode="w+", shape=v.shape)
            mm[...] = v
            mm.flush()
            m[k] = np.memmap(tmp_path / f"{i}-{k}.bin", dtype=np.float32, mode="r", shape=v.shape)
        mapped.append(m)
    a = FedAvg(rule).aggregate(current, [Contribution(u, 5 + i) for i, u in enumerate(ups)]).params
    b = FedAvg(rule).aggregate(current, [Contribution(u, 5 + i) for i, u in enumerate(mapped)]).params
    assert a is not None and b is not None
    for k in SHAPES:
        np.testing.assert_array_equal(a[k], b[k])


def test_too_few_updates_are_refused_at_configuration() -> None:
    with pytest.raises(ConfigError, match=r"needs at least 7 updates per round/buffer \(2f\+3\), got --buffer-size 5"):
        FedBuff(5, robust=RobustRule("multi-krum", byzantine=2))
    with pytest.raises(ConfigError, match="needs at least 7 updates.*got --buffer-size 5"):
        AggregatorConfig("t", "o", mode="async", buffer_size=5, robust="multi-krum", byzantine=2, min_workers=8).validate()
    with pytest.raises(ConfigError, match="needs at least 3 updates.*got --min-workers 1"):
        AggregatorConfig("t", "o", robust="median").validate()
    with pytest.raises(ConfigError, match="fedasync applies each alone"):
        AggregatorConfig("t", "o", mode="async", strategy="fedasync", robust="trimmed-mean").validate()
    with pytest.raises(ConfigError, match="do not combine"):
        AggregatorConfig("t", "o", min_workers=4, robust="median", dp_clip=1.0, dp_noise=1.0).validate()
    with pytest.raises(ConfigError, match="not fedasync"):
        AggregatorConfig("t", "o", mode="async", strategy="fedasync", dp_clip=1.0, dp_noise=1.0).validate()
    with pytest.raises(ConfigError, match="needs --dp-clip"):
        AggregatorConfig("t", "o", dp_noise=1.0).validate()
    with pytest.raises(ConfigError, match="trim-fraction"):
        AggregatorConfig("t", "o", min_workers=10, robust="trimmed-mean", trim_fraction=0.7).validate()
    # what works
    AggregatorConfig("t", "o", mode="async", buffer_size=7, robust="multi-krum", byzantine=2).validate()
    AggregatorConfig("t", "o", mode="async", strategy="fedasync", robust="norm-clip").validate()
    AggregatorConfig("t", "o", min_workers=10, robust="trimmed-mean", trim_fraction=0.2).validate()


def test_fedbuff_multi_krum_drops_sign_flipped_deltas_per_buffer() -> None:
    rng = np.random.default_rng(5)
    current = params(rng)
    honest = params(rng, 0.05)
    ups = [{k: v + rng.normal(0, 0.01, v.shape).astype(np.float32) for k, v in honest.items()} for _ in range(8)]
    ups += [{k: -10 * v for k, v in honest.items()} for _ in range(2)]
    strat = FedBuff(10, robust=RobustRule("multi-krum", byzantine=2))
    out = strat.aggregate(current, [Contribution(u, 5) for u in ups])
    assert out.params is not None
    step = {k: out.params[k] - current[k] for k in SHAPES}
    assert update_norm(step, {k: v for k, v in honest.items()}) < 0.1 * update_norm(honest)


def test_fedasync_norm_clip_bounds_an_outsized_update() -> None:
    rng = np.random.default_rng(6)
    current = params(rng)
    strat = FedAsync(mixing=0.5, robust=RobustRule("norm-clip"))
    for _ in range(5):  # honest updates: deltas of norm about 1
        d = params(rng, 0.2)
        strat.apply(current, {k: current[k] + d[k] for k in SHAPES}, 10, 0)
    evil = {k: current[k] + 1000.0 for k in SHAPES}
    res = strat.apply(current, evil, 10, 0)
    assert res.params is not None
    moved = update_norm(res.params, current)
    assert moved < 0.5 * 3 * max(strat.recent.norms[:-1])  # not 0.5 × 1000 × sqrt(28)
    assert res.weight < 0.5 * 0.01


# ------------------------------------------------------------------ checkpoints
@pytest.mark.parametrize("rule", rules(), ids=IDS)
def test_fedbuff_defences_survive_a_checkpoint_mid_buffer(rule: RobustRule) -> None:
    rng = np.random.default_rng(7)
    current = params(rng)
    ups = [params(rng, 0.1) for _ in range(10)]
    dp = GaussianDP(clip=0.3, noise=1.0, seed=3) if rule.name == "none" else None
    whole = FedBuff(5, robust=rule, dp=dp)
    a = [whole.apply(current, u, 5, i % 3).params for i, u in enumerate(ups)]
    first = FedBuff(5, robust=rule, dp=dp)
    b = [first.apply(current, u, 5, i % 3).params for i, u in enumerate(ups[:7])]
    meta, arrays = first.state()
    arrays = {k: np.array(v) for k, v in arrays.items()}  # as a checkpoint file gives them back
    second = FedBuff(5, robust=rule, dp=dp)
    second.restore(meta, arrays)
    b += [second.apply(current, u, 5, (i + 7) % 3).params for i, u in enumerate(ups[7:])]
    for x, y in zip(a, b, strict=True):
        assert (x is None) == (y is None)
        if x is not None and y is not None:
            for k in SHAPES:
                np.testing.assert_array_equal(x[k], y[k])


def test_fedasync_adaptive_clip_survives_a_checkpoint() -> None:
    rng = np.random.default_rng(8)
    current = params(rng)
    ups = [{k: current[k] + v for k, v in params(rng, 0.1 * (i + 1)).items()} for i in range(6)]
    whole = FedAsync(robust=RobustRule("norm-clip"))
    a = [whole.apply(current, u, 5, 0).params for u in ups]
    first = FedAsync(robust=RobustRule("norm-clip"))
    b = [first.apply(current, u, 5, 0).params for u in ups[:3]]
    second = FedAsync(robust=RobustRule("norm-clip"))
    second.restore(*first.state())
    b += [second.apply(current, u, 5, 0).params for u in ups[3:]]
    for x, y in zip(a, b, strict=True):
        assert x is not None and y is not None
        for k in SHAPES:
            np.testing.assert_array_equal(x[k], y[k])


# ------------------------------------------------------------------ differential privacy
def test_dp_noise_zero_is_plain_fedavg_bit_for_bit() -> None:
    cfg = AggregatorConfig("t", "o", dp_clip=0.5, dp_noise=0.0).validate()
    assert cfg.dp_mechanism() is None
    rng = np.random.default_rng(9)
    current = params(rng)
    ups = [Contribution(params(rng, 3.0), 10 + i) for i in range(4)]  # norms far beyond the clip
    strat = make_strategy("fedavg", robust=cfg.robust_rule(), dp=cfg.dp_mechanism())
    got, plain = strat.aggregate(current, ups).params, FedAvg().aggregate(current, ups).params
    want = weighted_average([(c.params, float(c.num_samples)) for c in ups])
    assert got is not None and plain is not None
    for k in SHAPES:
        assert got[k].tobytes() == plain[k].tobytes() == want[k].tobytes()
    assert strat.report() == {}
    buff = make_strategy("fedbuff", buffer_size=4, dp=make_dp(0.5, 0.0, 1e-5))
    ref = FedBuff(4)
    for i, c in enumerate(ups):
        x, y = buff.aggregate(current, [c]).params, ref.aggregate(current, [c]).params
        assert (x is None) == (y is None) == (i < 3)
    assert x is not None and y is not None
    for k in SHAPES:
        assert x[k].tobytes() == y[k].tobytes()


def test_dp_fedavg_clips_averages_uniformly_and_adds_seeded_noise() -> None:
    rng = np.random.default_rng(10)
    current = params(rng)
    deltas = [params(rng, 0.5) for _ in range(4)]
    ups = [Contribution({k: current[k] + d[k] for k in SHAPES}, 10 * (i + 1)) for i, d in enumerate(deltas)]
    dp = GaussianDP(clip=0.5, noise=1.0, seed=11)
    strat = FedAvg(dp=dp)
    out = strat.aggregate(current, ups)
    assert out.weights == (0.25, 0.25, 0.25, 0.25)  # uniform: sample counts play no part
    clipped = [{k: d[k].astype(np.float64) * min(1.0, 0.5 / update_norm(d)) for k in SHAPES} for d in deltas]
    noise_rng = np.random.default_rng([11, 1])
    for k in SHAPES:
        noise = noise_rng.standard_normal(SHAPES[k]) * (1.0 * 0.5 / 4)
        want = current[k] + sum(c[k] for c in clipped) / 4 + noise
        assert out.params is not None
        np.testing.assert_allclose(out.params[k], want, rtol=1e-5, atol=1e-6)
    again = FedAvg(dp=dp)
    assert again.aggregate(current, ups).params["W"].tobytes() == out.params["W"].tobytes()  # type: ignore[index]
    second = strat.aggregate(current, ups).params
    assert second is not None and second["W"].tobytes() != out.params["W"].tobytes()  # type: ignore[index]
    resumed = FedAvg(dp=dp)
    resumed.restore(*FedAvg(dp=dp, ).state())  # a fresh state: step 0
    resumed.restore({"steps": 1}, {})
    assert resumed.aggregate(current, ups).params["W"].tobytes() == second["W"].tobytes()  # type: ignore[index]


def test_dp_noise_has_the_calibrated_spread() -> None:
    dp = GaussianDP(clip=2.0, noise=1.5, seed=0)
    noise = dp.draw({"x": np.zeros(200_000, np.float32)}, 10, 1)["x"]
    assert abs(noise.std() - 1.5 * 2.0 / 10) < 0.005 and abs(noise.mean()) < 0.005


def test_dp_fedbuff_clips_each_delta_and_noises_each_buffer() -> None:
    rng = np.random.default_rng(12)
    current = params(rng)
    deltas = [params(rng, 0.5) for _ in range(3)]
    dp = GaussianDP(clip=0.4, noise=2.0, seed=5)
    strat = FedBuff(3, server_lr=0.5, dp=dp)
    out = strat.aggregate(current, [Contribution(d, 10, t) for d, t in zip(deltas, [0, 1, 2], strict=True)])
    noise_rng = np.random.default_rng([5, 1])
    for k in SHAPES:
        s = [1.0 / np.sqrt(1.0 + t) for t in (0, 1, 2)]
        acc = sum(w * d[k].astype(np.float64) * min(1.0, 0.4 / update_norm(d)) for w, d in zip(s, deltas, strict=True))
        want = current[k] + 0.5 * (acc / 3 + noise_rng.standard_normal(SHAPES[k]) * (2.0 * 0.4 / 3))
        assert out.params is not None
        np.testing.assert_allclose(out.params[k], want, rtol=1e-4, atol=1e-5)
    assert strat.report()["dp_steps"] == 1


def test_the_reported_epsilon_is_the_accountants() -> None:
    strat = FedAvg(dp=GaussianDP(clip=0.5, noise=1.0, delta=1e-5))
    rng = np.random.default_rng(13)
    current = params(rng)
    for _ in range(3):
        strat.aggregate(current, [Contribution(params(rng), 5) for _ in range(2)])
    accountant = dp_accounting.rdp.RdpAccountant()
    accountant.compose(dp_accounting.GaussianDpEvent(1.0), 3)
    assert strat.report() == {"dp_epsilon": accountant.get_epsilon(1e-5), "dp_delta": 1e-5, "dp_steps": 3}


def test_fedbuff_held_deltas_go_through_a_checkpoint_file(tmp_path: Path) -> None:
    from fedmq.aggregator import durable

    rng = np.random.default_rng(14)
    current = {"dense_0/W": rng.normal(size=(3, 2)).astype(np.float32), "dense_0/b": np.zeros(2, np.float32)}
    ups = [{k: rng.normal(size=v.shape).astype(np.float32) for k, v in current.items()} for _ in range(7)]
    rule = RobustRule("multi-krum", byzantine=2)
    whole, first = FedBuff(7, robust=rule), FedBuff(7, robust=rule)
    want = [whole.apply(current, u, 5, 1).params for u in ups][-1]
    for u in ups[:4]:
        first.apply(current, u, 5, 1)
    meta, arrays = first.state()
    durable.save_checkpoint(tmp_path, {"strategy": meta}, {f"strategy/{k}": v for k, v in arrays.items()})
    loaded = durable.load_checkpoint(tmp_path)
    assert loaded is not None
    second = FedBuff(7, robust=rule)
    second.restore(loaded[0]["strategy"], durable.split_prefix(loaded[1], "strategy/"))
    got = [second.apply(current, u, 5, 1).params for u in ups[4:]][-1]
    assert got is not None and want is not None
    for k in current:
        np.testing.assert_array_equal(got[k], want[k])


# ------------------------------------------------------------------ through the coordinator and --resume
@pytest.mark.parametrize("defence", [
    {"robust": "multi-krum", "byzantine": 1, "buffer_size": 5},
    {"robust": "median", "buffer_size": 3},
    {"robust": "norm-clip", "buffer_size": 3},
    {"dp_clip": 0.5, "dp_noise": 1.0, "buffer_size": 3},
], ids=["multi-krum", "median", "norm-clip", "dp"])
def test_an_async_run_with_defences_resumes_to_the_same_decisions(defence: dict[str, Any]) -> None:
    """Checkpoint mid-buffer, resume in another coordinator: the same fates, weights, history
    (dp_epsilon included) and bit-identical models as the run that went on."""
    from fedmq.aggregator.core import Coordinator
    from fedmq.aggregator.policy import make_policy
    from tests.unit.test_core import SHAPES as CORE_SHAPES
    from tests.unit.test_core import Driver, checkpoint, comparable, model, update

    cfg = AggregatorConfig("unused.npz", "unused", mode="async", strategy="fedbuff", max_updates=40, concurrency=2,
                           task_timeout=500.0, presence_timeout=500.0, join_grace=0.0, **defence).validate()

    def strategy() -> Any:
        return make_strategy("fedbuff", buffer_size=cfg.buffer_size, robust=cfg.robust_rule(), dp=cfg.dp_mechanism())

    run = Driver(Coordinator(cfg, strategy(), make_policy(cfg), model(), incarnation="t", run_id="R"))
    run.start(0.0)
    run.hello("w0", 0.0)
    rng = np.random.default_rng(0)
    deltas = [{k: rng.standard_normal(s).astype(np.float32) * (10 if i % 4 == 0 else 1) for k, s in CORE_SHAPES.items()}
              for i in range(16)]

    def send(d: Driver, i: int, now: float) -> list[Any]:
        return d.send(update(f"a{i + 1:06d}-t", kind="delta", params=deltas[i], base=d.core.state.version, run="R"),
                      now)

    for i in range(cfg.buffer_size + 1):  # version 1, and one delta held
        send(run, i, 1.0 + i)
    assert run.core.state.version == 1
    meta, strategy_meta, strategy_arrays, params = checkpoint(run.core, 10.0)
    restored = strategy()
    restored.restore(json.loads(json.dumps(strategy_meta)), strategy_arrays)
    resumed = Driver(Coordinator.from_meta(meta, config=cfg, strategy=restored, policy=make_policy(cfg), params=params,
                                           now=1000.0, incarnation="t"))
    resumed.start(1000.0)
    resumed.hello("w0", 1000.0)
    for i in range(cfg.buffer_size + 1, 16):
        assert comparable(send(run, i, 10.0 + i)) == comparable(send(resumed, i, 1000.0 + i))
    assert run.core.state.version == resumed.core.state.version >= 3
    for k in CORE_SHAPES:
        assert run.core.params[k].tobytes() == resumed.core.params[k].tobytes()
    if "dp_noise" in defence:
        last = resumed.core.state.last_evaluated
        assert last is not None
        assert last["dp_steps"] == last["version"] and last["dp_epsilon"] > 0


def test_tensorboard_gets_the_privacy_spent_when_there_is_one(tmp_path: Path) -> None:
    pytest.importorskip("tensorboardX")
    from tensorboardX.proto.event_pb2 import Event

    from fedmq.aggregator.tracking import TensorBoardTracker
    from tests.integration.test_tracking import tfrecords

    tracker = TensorBoardTracker(tmp_path)
    tracker.start("R", {})
    base = {"accuracy": 0.5, "loss": 1.0, "updates_applied": 3, "staleness_mean": 0.0}
    tracker.version({**base, "version": 1})
    tracker.version({**base, "version": 2, "dp_epsilon": 7.5})
    tracker.finish({"version": 2}, {}, tmp_path / "model.npz")
    tags = []
    for f in tmp_path.glob("events.out.tfevents.*"):
        for record in tfrecords(f):
            tags += [(v.tag, Event.FromString(record).step) for v in Event.FromString(record).summary.value]
    assert ("eval/dp_epsilon", 2) in tags and ("eval/dp_epsilon", 1) not in tags and ("eval/accuracy", 1) in tags
