"""Trainers for tests, plugged in with --trainer like any user's trainer."""

from __future__ import annotations

import os
import time
from typing import Any

import numpy as np

from fedmq.shared.trainer import FitResult, MLPTrainer


class SleepyTrainer(MLPTrainer):
    """Trains normally, then keeps the CPU of a 'long task' busy by blocking for a while."""

    def fit(self, params: dict[str, np.ndarray], X: np.ndarray, y: np.ndarray, **kw: Any) -> FitResult:
        result = super().fit(params, X, y, **kw)
        time.sleep(float(os.environ.get("FEDMQ_TEST_SLEEP_S", "4")))
        return result


class FailingTrainer(MLPTrainer):
    """A buggy trainer: every fit raises."""

    def fit(self, params: dict[str, np.ndarray], X: np.ndarray, y: np.ndarray, **kw: Any) -> FitResult:
        raise RuntimeError("this trainer always fails")
