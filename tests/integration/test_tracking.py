"""--track tensorboard|mlflow: config, every evaluated version, fates and the final model, logged locally."""

from __future__ import annotations

import json
import os
import struct
import subprocess
from pathlib import Path

import pytest

from fedmq.runner import fedmq_argv

pytestmark = [pytest.mark.broker, pytest.mark.slow]


def run(tmp_path: Path, amqp_url: str, namespace: str, *args: str) -> Path:
    out = tmp_path / "run"
    proc = subprocess.run(
        fedmq_argv("run", "--workers", "2", "--dataset", "digits", "--mode", "sync", "--rounds", "3",
                   "--namespace", namespace, "--out", str(out), *args),
        capture_output=True, text=True, timeout=180, stdin=subprocess.DEVNULL,
        env={**os.environ, "FEDMQ_AMQP_URL": amqp_url},
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return out


def tfrecords(path: Path) -> list[bytes]:
    """The records of a TensorBoard event file (TFRecord framing: length, crc, data, crc)."""
    data, out, i = path.read_bytes(), [], 0
    while i < len(data):
        (n,) = struct.unpack_from("<Q", data, i)
        out.append(data[i + 12 : i + 12 + n])
        i += 12 + n + 4
    return out


def test_tensorboard_gets_every_evaluated_version(tmp_path: Path, amqp_url: str, namespace: str) -> None:
    pytest.importorskip("tensorboardX")
    from tensorboardX.proto.event_pb2 import Event

    out = run(tmp_path, amqp_url, namespace, "--track", "tensorboard")
    (events_file,) = (out / "tensorboard").glob("events.out.tfevents.*")
    scalars: dict[str, dict[int, float]] = {}
    for record in tfrecords(events_file):
        event = Event.FromString(record)
        for value in event.summary.value:
            if value.HasField("simple_value"):
                scalars.setdefault(value.tag, {})[event.step] = value.simple_value
    history = json.loads((out / "history.json").read_text())["history"]
    assert set(scalars["eval/accuracy"]) == {h["version"] for h in history}
    for h in history:
        assert scalars["eval/accuracy"][h["version"]] == pytest.approx(h["accuracy"], abs=1e-6)
    assert scalars["fates/applied"][history[-1]["version"]] == 6  # 3 rounds x 2 workers


def test_mlflow_gets_params_metrics_fates_and_the_model(tmp_path: Path, amqp_url: str, namespace: str,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("mlflow")
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    from mlflow.tracking import MlflowClient

    out = run(tmp_path, amqp_url, namespace, "--track", "mlflow")
    client = MlflowClient(tracking_uri=(out / "mlruns").resolve().as_uri())
    doc = json.loads((out / "history.json").read_text())
    (found,) = client.search_runs([client.get_experiment_by_name("fedmq").experiment_id])
    assert found.info.run_name == doc["run_id"] and found.info.status == "FINISHED"
    assert json.loads(found.data.params["mode"]) == "sync"
    accuracy = {m.step: m.value for m in client.get_metric_history(found.info.run_id, "accuracy")}
    assert accuracy == {h["version"]: pytest.approx(h["accuracy"]) for h in doc["history"]}
    assert found.data.metrics["fate_applied"] == 6
    assert [a.path for a in client.list_artifacts(found.info.run_id)] == ["model.npz"]


def test_an_unknown_tracker_is_a_usage_error(tmp_path: Path) -> None:
    proc = subprocess.run(fedmq_argv("run", "--workers", "2", "--dataset", "digits", "--track", "wandb", "--out",
                                     str(tmp_path / "r")), capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "wandb" in proc.stderr
