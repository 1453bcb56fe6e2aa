"""Checks an update must pass before it may touch the model (beyond what decoding checks)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace

import numpy as np

from fedmq.shared import messages
from fedmq.shared.errors import ValidationError


def check_update(
    update: messages.Update,
    shapes: Mapping[str, tuple[int, ...]],
    *,
    expected_kind: str,
    current_version: int,
    compression: str = "none",
) -> None:
    """Raise :class:`ValidationError` naming the first thing that does not fit the model."""
    who = f"update from worker {update.worker_id!r} (task {update.task_id})"
    if update.compression != compression:
        raise ValidationError(f"{who} is compressed with {update.compression}, this run asked for {compression}")
    if update.kind != expected_kind:
        raise ValidationError(f"{who} carries {update.kind}, this strategy expects {expected_kind}")
    if update.base_version > current_version:
        raise ValidationError(
            f"{who} refers to version {update.base_version}, newer than the current version {current_version}"
        )
    if update.num_samples <= 0:
        raise ValidationError(f"{who} reports {update.num_samples} training samples")
    missing = [k for k in shapes if k not in update.params]
    extra = [k for k in update.params if k not in shapes]
    if missing or extra:
        raise ValidationError(f"{who} has layers {sorted(update.params)}; the model has {sorted(shapes)}")
    for name, expected in shapes.items():
        array = update.params[name]
        if tuple(array.shape) != tuple(expected):
            raise ValidationError(
                f"{who} has layer {name!r} of shape {tuple(array.shape)}, model expects {tuple(expected)}"
            )
        if array.dtype != np.float32:
            raise ValidationError(f"{who} has layer {name!r} of dtype {array.dtype}, model expects float32")


def as_weights(update: messages.Update, base: Mapping[str, np.ndarray]) -> messages.Update:
    """``update``'s delta as the weights ``base + delta`` (``base`` being its base version), for a
    strategy that averages weights (FedAvg) in a run whose updates are compressed deltas.

    The delta's arrays (decompressed, so the update's own) are added to in place: no second copy.
    """
    params = {}
    for name, delta in update.params.items():
        out = delta if delta.flags.writeable else delta.copy()
        params[name] = np.add(out, base[name], out=out)
    return replace(update, params=params, kind="weights")


def expected_update_bytes(params: Mapping[str, np.ndarray]) -> int:
    """A generous size limit for one update of this model: its raw bytes plus 5% and 64 KiB."""
    raw = sum(int(v.nbytes) for v in params.values())
    return int(raw * 1.05) + 64 * 1024
