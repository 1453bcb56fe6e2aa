"""The pure part of handling a task: model + task + shard in, an update, a skip or a failure out.

No broker, no clock of its own beyond measuring the fit, no logging: :class:`TaskRunner`
decides whether a task is still worth training (:meth:`TaskRunner.skip_reason`), trains it
with the user's trainer (built once per model spec) and checks what the trainer returned
before it becomes an :class:`~fedmq.shared.messages.Update`. Everything around it (trust
checks, decoding, waiting for the model, backoff, publishing, acks) is plumbing and lives in
:mod:`fedmq.worker.service`.

A trainer that raises, or returns parameters that do not fit the model (other names, shapes
or dtypes, non-finite values) or non-finite metrics, is a :class:`Failed` with a reason that
says which: the worker reports it to the aggregator rather than send an update it would reject.

A task with a ``compression`` (``--compress`` on the aggregator) gets its delta in that scheme's
wire form (:mod:`fedmq.shared.compression`); top-k's error-feedback residual is kept by
:meth:`TaskRunner.confirmed`, called once the broker confirmed the update.

Before a worker trains on a run at all, :func:`misfit` says whether its shard and trainer can
take part (the model's feature count and classes, the trainer the model's spec names): if
not, the worker refuses the run (docs/protocol.md). The spec's ``"trainer"`` entry names the
trainer reference and is not part of the architecture: trainers get the spec without it.
"""

from __future__ import annotations

import hashlib
import math
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TypeAlias, cast

import numpy as np

from fedmq.shared import codec, compression, messages
from fedmq.shared.compression import Compressed, ErrorFeedback
from fedmq.shared.trainer import FitResult, Trainer
from fedmq.worker.attack import Attack

UPDATE_DTYPE = np.dtype(np.float32)


def derive_seed(task_seed: int, worker_id: str) -> int:
    """A per-(task seed, worker) training seed, stable across processes and restarts."""
    digest = hashlib.blake2b(f"{task_seed}:{worker_id}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & 0x7FFF_FFFF


def work_id(task: messages.Task, worker_id: str) -> str:
    """The id an update carries (the aggregator's dedupe key).

    In a synchronous round a task is only a ticket to contribute; the unit of work is "this
    worker's contribution to round r", whichever ticket it drew. Otherwise it is the task id.
    """
    if task.mode == "sync" and task.round is not None:
        return f"r{task.round:05d}:{worker_id}"
    return task.task_id


@dataclass(frozen=True)
class Done:
    """The task was trained: ``update`` is ready to publish."""

    update: messages.Update
    compute_s: float  # seconds inside the trainer
    compressed: Compressed | None = None  # its compressed form, whose residual is kept once confirmed


@dataclass(frozen=True)
class Failed:
    """The task could not be trained here; ``reason`` says why (one line)."""

    reason: str


@dataclass(frozen=True)
class Skipped:
    """The task is not worth training any more (ack it); ``reason`` says why."""

    reason: str


Outcome: TypeAlias = Done | Failed | Skipped

#: the spec entry naming the trainer reference (``package.module:attr``) the model is for
SPEC_TRAINER_KEY = "trainer"


def same_trainer(a: str, b: str) -> bool:
    """Whether two ``package.module:attr`` references name the same trainer (spaces aside)."""
    return [part.strip() for part in a.split(":")] == [part.strip() for part in b.split(":")]


def trainer_names(factory: object) -> set[str]:
    """The references a trainer factory answers to: its own and, for a class, those of the
    classes it derives from (a test trainer built on MLPTrainer trains MLPTrainer's models)."""
    classes = factory.__mro__ if isinstance(factory, type) else (factory,)
    names = set()
    for cls in classes:
        module, name = getattr(cls, "__module__", None), getattr(cls, "__qualname__", None)
        if cls is not object and isinstance(module, str) and isinstance(name, str):
            names.add(f"{module}:{name}")
    return names


def trainer_spec(spec: dict) -> dict:
    """``spec`` as a trainer factory gets it: without the trainer reference."""
    return {k: v for k, v in spec.items() if k != SPEC_TRAINER_KEY} if SPEC_TRAINER_KEY in spec else spec


def _count(value: object) -> int | None:
    return int(value) if isinstance(value, int | np.integer) and not isinstance(value, bool) else None


def misfit(spec: dict, X: np.ndarray, y: np.ndarray, trainer_ref: str | None,
           also: Iterable[str] = ()) -> str | None:
    """Why a worker with shard ``(X, y)`` and trainer ``trainer_ref`` cannot train the model of
    ``spec``; None if nothing says it cannot.

    Checked: the trainer the spec names (``spec["trainer"]``, where given): ``trainer_ref`` or
    one of the references in ``also`` (see :func:`trainer_names`); the sample shape
    (``input_shape``, as the default :func:`fedmq.shared.spec.build_spec` and the PyTorch and
    scikit-learn trainers write it), the feature count (``input_dim``, the numpy MLP's, which
    flattens samples of any shape) and the classes (``num_classes``) of specs that have them.
    Other specs are the trainer's business.
    """
    named = spec.get(SPEC_TRAINER_KEY)
    if isinstance(named, str) and trainer_ref is not None \
            and not any(same_trainer(named, ref) for ref in (trainer_ref, *also)):
        return f"the model is for trainer {named!r}, this worker runs {trainer_ref!r} (--trainer)"
    features = int(np.prod(X.shape[1:])) if X.ndim >= 2 else 1
    shape = spec.get("input_shape")
    if isinstance(shape, list) and all(_count(n) is not None for n in shape) and tuple(shape) != X.shape[1:]:
        return (f"the shard's samples have shape {tuple(int(n) for n in X.shape[1:])}, "
                f"the model takes samples of shape {tuple(int(n) for n in shape)}")
    input_dim = _count(spec.get("input_dim"))
    if input_dim is not None and input_dim != features:
        return f"the shard has {features} features per sample, the model takes {input_dim}"
    classes = _count(spec.get("num_classes"))
    if classes is not None and y.size and int(y.max()) >= classes:
        return f"the shard has labels up to {int(y.max())}, the model has {classes} classes (0..{classes - 1})"
    return None


def check_result(result: object, base: messages.Params) -> str | None:
    """Why a trainer's ``result`` cannot become an update of the model ``base``; None if it can."""
    if not isinstance(result, FitResult):
        return f"returned {type(result).__name__}, not a FitResult"
    params = result.params
    if not isinstance(params, dict):
        return f"returned params of type {type(params).__name__}, not a dict of arrays"
    if set(params) != set(base):
        missing, extra = sorted(set(base) - set(params)), sorted(set(params) - set(base))
        return f"returned parameters that do not match the model's (missing {missing}, unexpected {extra})"
    for name, want in base.items():
        got = params[name]
        if not isinstance(got, np.ndarray):
            return f"returned {name} as {type(got).__name__}, not a numpy array"
        if got.shape != want.shape:
            return f"returned {name} with shape {got.shape}, the model's is {want.shape}"
        if got.dtype != UPDATE_DTYPE:
            return f"returned {name} with dtype {got.dtype}, expected {UPDATE_DTYPE}"
        if not codec.all_finite(got):
            return f"returned non-finite values (NaN or inf) in {name}"
    if isinstance(result.num_samples, bool) or not isinstance(result.num_samples, int | np.integer) \
            or result.num_samples < 0:
        return f"returned num_samples={result.num_samples!r}, not a whole number >= 0"
    for metric in ("loss", "accuracy"):
        value = getattr(result, metric)
        if isinstance(value, bool) or not isinstance(value, int | float | np.number) or not math.isfinite(float(value)):
            return f"returned {metric}={value!r}, not a finite number"
    return None


class TaskRunner:
    """Trains tasks on one shard with one trainer factory (a trainer per model spec, reused)."""

    def __init__(
        self,
        factory: Callable[[dict], Trainer],
        X: np.ndarray,
        y: np.ndarray,
        worker_id: str,
        *,
        trainer_ref: str | None = None,
        clock: Callable[[], float] = time.monotonic,
        attack: Attack | None = None,
    ) -> None:
        self.factory = factory
        self.X = X
        self.y = y
        self.worker_id = worker_id
        self.trainer_ref = trainer_ref  # the --trainer reference, compared with the spec's
        self._names = trainer_names(factory)  # and the references it also answers to
        self.clock = clock
        self.attack = attack  # --attack: what this (hostile) worker does to its updates
        self._labels: tuple[int, np.ndarray] | None = None  # (classes, the labels it trains on)
        self._trainer: tuple[str, Trainer] | None = None
        self._unbuildable: dict[str, str] = {}  # spec key -> why the factory failed on it
        self.feedback = ErrorFeedback()  # top-k's residual for the current run (in memory only)

    @staticmethod
    def skip_reason(task: messages.Task, latest: int | None) -> str | None:
        """Why ``task`` is not worth training when the newest model known is ``latest``.

        A synchronous task for a version older than the newest is from a round that is over.
        """
        if task.mode == "sync" and task.version is not None and latest is not None and task.version < latest:
            return f"task {task.task_id} is for version {task.version}, the model is at {latest}"
        return None

    def misfit(self, spec: dict) -> str | None:
        """Why this shard and trainer cannot take part in a run of ``spec`` (see :func:`misfit`)."""
        return misfit(spec, self.X, self.y, self.trainer_ref, self._names)

    def trainer(self, spec: dict) -> Trainer:
        """The trainer for ``spec`` (built once per spec; the last one is kept)."""
        key = repr(sorted(spec.items()))
        if self._trainer is None or self._trainer[0] != key:
            self._trainer = None  # drop the old one before building the next
            self._trainer = (key, self.factory(trainer_spec(spec)))
        return self._trainer[1]

    def spec_problem(self, spec: dict) -> str | None:
        """Why the trainer cannot be built from ``spec`` (a wrong spec); None if it can."""
        key = repr(sorted(spec.items()))
        if key in self._unbuildable:
            return self._unbuildable[key]
        try:
            self.trainer(spec)
        except Exception as exc:  # a user factory may raise anything
            if len(self._unbuildable) >= 16:
                self._unbuildable.clear()
            reason = self._unbuildable[key] = f"the trainer cannot be built from its spec: {type(exc).__name__}: {exc}"
            return reason
        return None

    def _train_labels(self, spec: dict) -> np.ndarray:
        """The labels to train on: the shard's, or what a label-flip attack makes of them."""
        if self.attack is None or self.attack.kind != "label-flip":
            return self.y
        classes = _count(spec.get("num_classes")) or (int(self.y.max()) + 1 if self.y.size else 1)
        if self._labels is None or self._labels[0] != classes:
            self._labels = (classes, self.attack.labels(self.y, classes))
        return self._labels[1]

    def run(self, task: messages.Task, model: messages.ModelVersion) -> Done | Failed:
        """Train ``task`` from ``model``: the update to publish, or why there is none."""
        started = self.clock()
        try:
            trainer = self.trainer(model.spec)
            result = trainer.fit(
                model.params, self.X, self._train_labels(model.spec),
                epochs=task.epochs, batch_size=task.batch_size, lr=task.lr, mu=task.mu,
                seed=derive_seed(task.seed, self.worker_id),
            )
        except Exception as exc:  # a user trainer may raise anything
            return Failed(f"trainer raised {type(exc).__name__}: {exc}")
        compute_s = self.clock() - started
        bad = check_result(result, model.params)
        if bad is not None:
            return Failed(f"trainer {bad}")
        params = {name: result.params[name] for name in model.params}  # the model's order
        # a compressed delta is formed inside the compressor (int8: block by block, no model-sized
        # delta array); an attack tampers with the delta itself, so it is formed here first
        base = None
        if task.update_kind == "delta":
            if task.compression != "none" and self.attack is None:
                base = model.params
            else:
                params = compression.deltas(params, model.params)
        if self.attack is not None:
            params = self.attack.tamper(params, model.params, delta=task.update_kind == "delta",
                                        seed=derive_seed(task.seed, self.worker_id))
        compressed = None
        if task.compression != "none":
            try:
                compressed = self.feedback.compress(task.run_id, params, compression.parse(task.compression), base=base)
            except ValueError as exc:
                return Failed(f"the update cannot be compressed with {task.compression}: {exc}")
            params = cast(messages.Params, compressed.layers)  # the wire form; decoded back to float32
        update = messages.Update(
            task_id=work_id(task, self.worker_id), worker_id=self.worker_id, base_version=model.version,
            num_samples=int(result.num_samples), params=params, kind=task.update_kind,
            train_loss=float(result.loss), train_accuracy=float(result.accuracy),
            duration_s=compute_s, round=task.round, run_id=task.run_id, compression=task.compression,
        )
        return Done(update, compute_s, compressed)

    def confirmed(self, done: Done) -> None:
        """``done``'s update was confirmed by the broker: its residual (top-k) is the one to carry."""
        if done.compressed is not None:
            self.feedback.keep(done.compressed)
