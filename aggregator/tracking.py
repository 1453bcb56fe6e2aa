"""Experiment tracking: the run's config, every evaluated version, the fates and the final model.

``--track tensorboard`` writes TensorBoard event files to ``RUN_DIR/tensorboard`` (needs the
``fedmq[tensorboard]`` extra: tensorboardX); ``--track mlflow`` logs to MLflow (``fedmq[mlflow]``:
mlflow-skinny), to ``--track-uri`` or by default a file store in ``RUN_DIR/mlruns``. The library
is imported only when asked for. A tracker never stops a run: an error while logging is
reported once and tracking is switched off.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Protocol

from fedmq.shared.errors import ConfigError

log = logging.getLogger("fedmq.aggregator")

TRACKERS = ("tensorboard", "mlflow")
_EXTRA = {"tensorboard": ("tensorboardX", "tensorboard"), "mlflow": ("mlflow", "mlflow")}


class Tracker(Protocol):
    def start(self, run_id: str, config: Mapping[str, Any]) -> None: ...
    def version(self, entry: Mapping[str, Any]) -> None: ...
    def finish(self, final: Mapping[str, Any], counts: Mapping[str, int], model: Path) -> None: ...


def check_tracker(kind: str | None) -> None:
    """Configuration-time check: a known tracker whose library is installed."""
    if kind is None:
        return
    if kind not in TRACKERS:
        raise ConfigError(f"--track must be one of {', '.join(TRACKERS)}, got {kind!r}")
    module, extra = _EXTRA[kind]
    import importlib.util

    if importlib.util.find_spec(module) is None:
        raise ConfigError(f"--track {kind} needs {module}: pip install 'fedmq[{extra}]'")


def make_tracker(kind: str | None, run_dir: Path, uri: str | None = None) -> Tracker | None:
    if kind is None:
        return None
    check_tracker(kind)
    return TensorBoardTracker(run_dir / "tensorboard") if kind == "tensorboard" else MlflowTracker(
        uri or (run_dir / "mlruns").resolve().as_uri())


_METRICS = ("accuracy", "loss", "updates_applied", "staleness_mean")
_OPTIONAL_METRICS = ("dp_epsilon",)  # only in some runs (--dp-noise)


def _metrics(entry: Mapping[str, Any]) -> list[str]:
    return [*_METRICS, *(m for m in _OPTIONAL_METRICS if entry.get(m) is not None)]


class TensorBoardTracker:
    """Scalars per version (step = version), the config as text, the fates at the end."""

    def __init__(self, logdir: Path) -> None:
        self.logdir = logdir
        self._writer: Any = None

    def start(self, run_id: str, config: Mapping[str, Any]) -> None:
        from tensorboardX import SummaryWriter

        self._writer = SummaryWriter(logdir=str(self.logdir))
        self._writer.add_text("run", f"run {run_id}\n\n    " + json.dumps(dict(config), indent=2, default=str).replace("\n", "\n    "))

    def version(self, entry: Mapping[str, Any]) -> None:
        for name in _metrics(entry):
            self._writer.add_scalar(f"eval/{name}", float(entry[name]), int(entry["version"]),
                                    walltime=None)
        self._writer.flush()

    def finish(self, final: Mapping[str, Any], counts: Mapping[str, int], model: Path) -> None:
        step = int(final.get("version") or 0)
        for fate, n in counts.items():
            self._writer.add_scalar(f"fates/{fate}", float(n), step)
        self._writer.add_text("final", json.dumps(dict(final), default=str))
        self._writer.add_text("model", str(model))
        self._writer.close()


class MlflowTracker:
    """One MLflow run: params from the config, metrics per version, fates, model.npz as an artifact."""

    def __init__(self, uri: str) -> None:
        self.uri = uri
        self._client: Any = None
        self._run_id = ""

    def start(self, run_id: str, config: Mapping[str, Any]) -> None:
        if self.uri.startswith("file:"):
            # MLflow 3 refuses the file store unless told (it prefers a database); a local
            # directory in the run dir is what a user without a tracking server wants
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        from mlflow.tracking import MlflowClient

        self._client = MlflowClient(tracking_uri=self.uri)
        experiment = self._client.get_experiment_by_name("fedmq")
        experiment_id = experiment.experiment_id if experiment else self._client.create_experiment("fedmq")
        run = self._client.create_run(experiment_id, run_name=run_id, tags={"fedmq.run_id": run_id})
        self._run_id = run.info.run_id
        for key, value in config.items():
            self._client.log_param(self._run_id, key, json.dumps(value, default=str)[:500])

    def version(self, entry: Mapping[str, Any]) -> None:
        step = int(entry["version"])
        for name in _metrics(entry):
            self._client.log_metric(self._run_id, name, float(entry[name]), step=step)

    def finish(self, final: Mapping[str, Any], counts: Mapping[str, int], model: Path) -> None:
        step = int(final.get("version") or 0)
        for fate, n in counts.items():
            self._client.log_metric(self._run_id, f"fate_{fate}", float(n), step=step)
        if model.exists():
            self._client.log_artifact(self._run_id, str(model))
        self._client.set_terminated(self._run_id, status="FAILED" if final.get("failed") else "FINISHED")


class SafeTracker:
    """Wraps a tracker so that a logging error is said once and never stops the run."""

    def __init__(self, inner: Tracker | None) -> None:
        self.inner = inner

    def call(self, method: str, *args: Any) -> None:
        if self.inner is None:
            return
        try:
            getattr(self.inner, method)(*args)
        except Exception as exc:  # noqa: BLE001 (a tracking backend's errors are not ours to die of)
            log.warning("experiment tracking failed (%s: %s); the run goes on without it", type(exc).__name__, exc)
            self.inner = None
