"""``--export``: the final model in a standard format as well as ``model.npz``.

``safetensors`` writes ``RUN_DIR/model.safetensors`` (the parameters by name, as they travel:
float32, plus the model spec as JSON in the file's metadata under ``fedmq_spec``). A trainer
may add files of its own format through an ``export_files(params) -> {file name: bytes}``
method: :class:`fedmq.torch.TorchTrainer` adds ``model.pt``, a ``state_dict`` with the
module's own names and dtypes that ``torch.load(..., weights_only=True)`` reads.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from fedmq.shared.errors import ConfigError
from fedmq.shared.files import atomic_write_bytes

log = logging.getLogger("fedmq.aggregator")

FORMATS = ("safetensors",)
SAFETENSORS_FILE = "model.safetensors"
SPEC_METADATA_KEY = "fedmq_spec"


def check_export(fmt: str) -> None:
    """ConfigError before the run starts when ``fmt`` cannot be written here."""
    if fmt not in FORMATS:
        raise ConfigError(f"--export must be one of {', '.join(FORMATS)}, got {fmt!r}")
    try:
        import safetensors.numpy  # noqa: F401
    except ImportError:
        raise ConfigError("--export safetensors needs the safetensors package: pip install 'fedmq[export]'") from None


def safetensors_bytes(params: Mapping[str, np.ndarray], spec: Mapping[str, Any]) -> bytes:
    """``params`` as a safetensors file, the spec in its metadata."""
    from safetensors.numpy import save

    arrays = {name: np.ascontiguousarray(value) for name, value in params.items()}
    return bytes(save(arrays, metadata={SPEC_METADATA_KEY: json.dumps(dict(spec), sort_keys=True)}))


def export_files(params: Mapping[str, np.ndarray], spec: Mapping[str, Any], trainer: object,
                 fmt: str) -> dict[str, bytes]:
    """File name -> content of everything ``--export fmt`` writes for the final ``params``."""
    files = {SAFETENSORS_FILE: safetensors_bytes(params, spec)} if fmt == "safetensors" else {}
    extra = getattr(trainer, "export_files", None)
    if callable(extra):
        files.update(extra(dict(params)))
    return files


def export_model(out: Path, params: Mapping[str, np.ndarray], spec: Mapping[str, Any], trainer: object,
                 fmt: str) -> None:
    """Write the export files into the run directory ``out`` (atomically, each); a failure is
    logged as an error, as ``model.npz`` is written already."""
    try:
        files = export_files(params, spec, trainer, fmt)
        for name, blob in files.items():
            atomic_write_bytes(str(out / name), lambda f, b=blob: f.write(b))  # type: ignore[misc]
    except Exception as exc:  # a trainer's export may raise anything; the run is over either way
        log.error("--export %s failed: %s: %s (model.npz is written)", fmt, type(exc).__name__, exc)
        return
    log.info("exported %s", ", ".join(str(out / name) for name in files))
