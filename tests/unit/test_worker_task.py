"""The pure part of a worker's task handling (fedmq.worker.task), without a broker."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from fedmq.shared import messages
from fedmq.shared.trainer import FitResult, MLPTrainer
from fedmq.worker.task import Done, Failed, TaskRunner, check_result, derive_seed, misfit, work_id

SPEC = {"input_dim": 8, "num_classes": 3, "hidden": [5]}


def model(version: int = 4) -> messages.ModelVersion:
    return messages.ModelVersion(version=version, params=MLPTrainer(SPEC).init_params(), spec=SPEC)


def task(**kw: Any) -> messages.Task:
    fields: dict[str, Any] = dict(task_id="t1", version=None, mode="async", epochs=1, batch_size=16, lr=0.1, mu=0.0,
                                  seed=3, run_id="run-7")
    fields.update(kw)
    return messages.Task(**fields)


def shard(n: int = 40) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    return rng.standard_normal((n, 8)).astype(np.float32), rng.integers(0, 3, n).astype(np.int64)


def runner(factory: Any = MLPTrainer, worker_id: str = "w0") -> TaskRunner:
    X, y = shard()
    return TaskRunner(factory, X, y, worker_id)


class Returns:
    """A trainer factory whose trainers return ``make(params)`` from fit."""

    def __init__(self, make: Any) -> None:
        self.make = make
        self.built = 0

    def __call__(self, spec: dict) -> Any:
        self.built += 1
        outer = self

        class T:
            def fit(self, params: dict[str, np.ndarray], X: np.ndarray, y: np.ndarray, **kw: Any) -> Any:
                return outer.make(params)

        return T()


def plus_one(params: dict[str, np.ndarray]) -> FitResult:
    return FitResult({k: v + np.float32(1) for k, v in params.items()}, 40, 0.5, 0.75)


def test_an_update_carries_the_new_weights_and_the_tasks_identity() -> None:
    m = model()
    out = runner(Returns(plus_one), "w9").run(task(round=None), m)
    assert isinstance(out, Done)
    u = out.update
    assert (u.task_id, u.worker_id, u.base_version, u.kind, u.run_id) == ("t1", "w9", 4, "weights", "run-7")
    assert (u.num_samples, u.train_loss, u.train_accuracy) == (40, 0.5, 0.75)
    assert list(u.params) == list(m.params)
    for k in m.params:
        np.testing.assert_array_equal(u.params[k], m.params[k] + 1)
    assert out.compute_s >= 0 and u.duration_s == out.compute_s
    messages.decode(messages.encode(u), expect=messages.Update)  # a valid wire message


def test_a_delta_update_is_new_minus_base_in_float32() -> None:
    m = model()
    out = runner(Returns(plus_one)).run(task(update_kind="delta"), m)
    assert isinstance(out, Done) and out.update.kind == "delta"
    for k, v in out.update.params.items():
        assert v.dtype == np.float32
        np.testing.assert_allclose(v, np.ones_like(m.params[k]))


def test_the_real_trainer_produces_an_update() -> None:
    out = runner().run(task(epochs=2), model())
    assert isinstance(out, Done)
    assert out.update.num_samples == 40 and np.isfinite(out.update.train_loss)


def test_a_sync_task_names_the_workers_contribution_to_its_round() -> None:
    t = task(mode="sync", version=4, round=12)
    out = runner(Returns(plus_one), "w2").run(t, model())
    assert isinstance(out, Done) and out.update.task_id == "r00012:w2" == work_id(t, "w2")
    assert out.update.round == 12


def test_a_trainer_that_raises_is_a_failure_with_its_reason() -> None:
    def boom(params: dict[str, np.ndarray]) -> FitResult:
        raise RuntimeError("out of coffee")

    out = runner(Returns(boom)).run(task(), model())
    assert out == Failed("trainer raised RuntimeError: out of coffee")


def test_a_factory_that_raises_is_a_failure() -> None:
    def factory(spec: dict) -> Any:
        raise ValueError("unknown layer kind")

    out = runner(factory).run(task(), model())
    assert isinstance(out, Failed) and "ValueError: unknown layer kind" in out.reason


@pytest.mark.parametrize(
    ("make", "words"),
    [
        (lambda p: FitResult({k: v.astype(np.float64) for k, v in p.items()}, 1, 0.1, 0.1), "dtype float64"),
        (lambda p: FitResult({**p, "dense_0/W": np.zeros((8, 4), np.float32)}, 1, 0.1, 0.1), "shape (8, 4)"),
        (lambda p: FitResult({k: v for k, v in p.items() if k != "dense_1/b"}, 1, 0.1, 0.1), "missing ['dense_1/b']"),
        (lambda p: FitResult({**p, "extra": np.zeros(1, np.float32)}, 1, 0.1, 0.1), "unexpected ['extra']"),
        (lambda p: FitResult({**p, "dense_0/b": np.full(5, np.nan, np.float32)}, 1, 0.1, 0.1), "non-finite"),
        (lambda p: FitResult({**p, "dense_0/b": [0.0] * 5}, 1, 0.1, 0.1), "not a numpy array"),  # type: ignore[dict-item]
        (lambda p: FitResult(dict(p), -1, 0.1, 0.1), "num_samples=-1"),
        (lambda p: FitResult(dict(p), 1, float("nan"), 0.1), "loss=nan"),
        (lambda p: (p, 1), "not a FitResult"),
    ],
    ids=["dtype", "shape", "missing", "extra", "nan", "list", "num_samples", "loss", "tuple"],
)
def test_a_result_that_does_not_fit_the_model_is_a_failure(make: Any, words: str) -> None:
    out = runner(Returns(make)).run(task(), model())
    assert isinstance(out, Failed), out
    assert out.reason.startswith("trainer returned") and words in out.reason, out.reason


def test_check_result_accepts_a_good_result() -> None:
    m = model()
    assert check_result(FitResult(dict(m.params), 3, 0.2, 1), m.params) is None


def test_the_trainer_is_built_once_per_spec() -> None:
    factory = Returns(plus_one)
    r = runner(factory)
    m = model()
    for _ in range(3):
        assert isinstance(r.run(task(), m), Done)
    assert factory.built == 1
    other = messages.ModelVersion(version=5, params=m.params, spec={**SPEC, "seed": 1})
    assert isinstance(r.run(task(), other), Done)
    assert factory.built == 2


def test_a_sync_task_for_an_old_version_is_skipped() -> None:
    assert TaskRunner.skip_reason(task(mode="sync", version=3, round=3), latest=4) is not None
    assert TaskRunner.skip_reason(task(mode="sync", version=4, round=4), latest=4) is None
    assert TaskRunner.skip_reason(task(mode="sync", version=3, round=3), latest=None) is None
    assert TaskRunner.skip_reason(task(mode="async", version=None), latest=9) is None


def test_the_training_seed_depends_on_task_and_worker_only() -> None:
    assert derive_seed(1, "w0") == derive_seed(1, "w0")
    assert len({derive_seed(1, "w0"), derive_seed(2, "w0"), derive_seed(1, "w1")}) == 3
    assert 0 <= derive_seed(123, "x") < 2**31


# ------------------------------------------------------------------ joining a run
def test_a_shard_that_fits_the_spec_is_no_misfit() -> None:
    X, y = shard()
    assert misfit(SPEC, X, y, "fedmq.shared.trainer:MLPTrainer") is None
    assert misfit({"layers": "whatever"}, X, y, None) is None  # a spec of another kind: the trainer's business


@pytest.mark.parametrize(
    ("spec", "words"),
    [
        ({**SPEC, "input_dim": 13}, "the shard has 8 features per sample, the model takes 13"),
        ({**SPEC, "num_classes": 2}, "labels up to 2, the model has 2 classes"),
        ({**SPEC, "trainer": "other.module:T"}, "the model is for trainer 'other.module:T'"),
    ],
    ids=["features", "classes", "trainer"],
)
def test_a_shard_or_trainer_that_does_not_fit_is_a_misfit(spec: dict, words: str) -> None:
    X, y = shard()
    reason = misfit(spec, X, y, "fedmq.shared.trainer:MLPTrainer")
    assert reason is not None and words in reason, reason


def test_a_trainer_derived_from_the_models_trainer_fits() -> None:
    """A straggler or failing test trainer built on MLPTrainer trains MLPTrainer's models."""

    class Slow(MLPTrainer):
        pass

    X, y = shard()
    spec = {**SPEC, "trainer": "fedmq.shared.trainer:MLPTrainer"}
    assert TaskRunner(Slow, X, y, "w0", trainer_ref="my.module:Slow").misfit(spec) is None
    reason = TaskRunner(MLPTrainer, X, y, "w0", trainer_ref="fedmq.shared.trainer:MLPTrainer").misfit(
        {**SPEC, "trainer": "my.module:Slow"})
    assert reason is not None and "'my.module:Slow'" in reason  # not the other way round


def test_the_spec_names_the_trainer_without_it_being_part_of_the_architecture() -> None:
    X, y = shard()
    spec = {**SPEC, "trainer": " fedmq.shared.trainer : MLPTrainer "}
    r = TaskRunner(MLPTrainer, X, y, "w0", trainer_ref="fedmq.shared.trainer:MLPTrainer")
    assert r.misfit(spec) is None and r.spec_problem(spec) is None  # MLPTrainer refuses unknown keys
    m = messages.ModelVersion(version=0, params=MLPTrainer(SPEC).init_params(), spec=spec)
    assert isinstance(r.run(task(), m), Done)


def test_a_spec_the_trainer_cannot_build_is_a_spec_problem_found_once() -> None:
    calls = []

    def factory(spec: dict) -> Any:
        calls.append(spec)
        raise ValueError("unknown layer kind")

    r = runner(factory)
    for _ in range(2):
        reason = r.spec_problem(SPEC)
        assert reason is not None and "ValueError: unknown layer kind" in reason
    assert len(calls) == 1
    assert runner().spec_problem(SPEC) is None


def test_a_compressed_task_gets_a_compressed_delta_and_the_residual_is_kept_once_confirmed() -> None:
    m = model()
    r = runner(MLPTrainer)
    out = r.run(task(update_kind="delta", compression="topk:0.1"), m)
    assert isinstance(out, Done) and out.compressed is not None
    u = out.update
    assert (u.kind, u.compression) == ("delta", "topk:0.1")
    decoded = messages.decode(messages.encode(u))
    assert isinstance(decoded, messages.Update)
    for name, arr in decoded.params.items():
        assert arr.dtype == np.float32 and arr.shape == m.params[name].shape
        assert np.count_nonzero(arr) <= max(1, int(np.ceil(0.1 * arr.size)))
    assert r.feedback.residual is None  # not before the update is confirmed
    r.confirmed(out)
    assert r.feedback.residual is not None and set(r.feedback.residual) == set(m.params)


def test_a_delta_that_fp16_cannot_hold_is_a_failure_not_an_infinite_update() -> None:
    huge = Returns(lambda params: FitResult({k: v + np.float32(1e6) for k, v in params.items()}, 40, 0.5, 0.75))
    out = runner(huge).run(task(update_kind="delta", compression="fp16"), model())
    assert isinstance(out, Failed) and "float16" in out.reason
