"""The fedmq messages: frozen dataclasses, their msgpack wire form and their strict decoder.

On the wire every message is one msgpack map (see :mod:`fedmq.shared.codec`) with ``schema``
(:data:`SCHEMA_VERSION`), ``type`` (``"model"``, ``"task"``, ``"update"`` or ``"control"``)
and exactly the dataclass's fields. ``Params`` travel as a map name -> array map, in order.

Constructors are plain and check nothing; :func:`encode` only refuses what has no wire
form (TypeError/ValueError). All validation lives in :func:`decode`, which raises only
:class:`~shared.errors.DecodeError`, with a message naming the message type and field
(e.g. ``task.epochs must be >= 1, got 0``). It enforces, beyond the codec's rules:

* every field present, no other field; ``schema == SCHEMA_VERSION``; a known ``type``;
* ints are ints (not bool, not float); floats are finite, ints accepted and converted;
  None only for Optional fields;
* versions, ``round``, ``seed`` and ``num_samples`` >= 0; ``epochs``, ``batch_size`` >= 1;
  ``lr`` > 0; ``mu``, ``duration_s``, ``created_s``, ``sent_s`` >= 0;
* ``mode``, ``kind``, ``update_kind`` from :data:`MODES`, :data:`UPDATE_KINDS`,
  :data:`CONTROL_KINDS`; ``task_id`` and ``Update.worker_id`` non-empty;
* ``params`` a map of name -> array (dtype, shape, byte count, finiteness checked by
  :mod:`fedmq.shared.codec`); ``spec`` and ``info`` JSON-like maps (no bytes, arrays or
  non-finite floats);
* ``compression`` (tasks and updates; absent means ``none``) a scheme of
  :mod:`fedmq.shared.compression`; an update compressed with one has params in that scheme's
  wire form, checked strictly and decompressed to float32 by :func:`decode` (so a decoded
  update's params are float32 arrays whatever its compression, and writable when compressed).

Decoded params are read-only numpy views into the received buffer (see
:mod:`fedmq.shared.codec`); copy an array before changing it.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from typing import Any, TypeAlias, get_args

import numpy as np

from fedmq.shared import codec, compression
from fedmq.shared.errors import DecodeError

__all__ = [
    "CONTROL_KINDS",
    "DEFAULT_MAX_MESSAGE_BYTES",
    "MODES",
    "SCHEMA_VERSION",
    "UPDATE_KINDS",
    "Control",
    "Message",
    "ModelVersion",
    "Params",
    "Task",
    "Update",
    "decode",
    "encode",
    "encode_pieces",
    "message_type",
]

SCHEMA_VERSION = 2  # 2: every message names its run (run_id)
DEFAULT_MAX_MESSAGE_BYTES = 256 * 1024 * 1024 // 2  # 128 MiB, RabbitMQ 3.x max_message_size

MODES: tuple[str, ...] = ("sync", "async")
UPDATE_KINDS: tuple[str, ...] = ("weights", "delta")
CONTROL_KINDS: tuple[str, ...] = ("stop", "hello", "heartbeat", "bye", "failed", "refused")

Params: TypeAlias = dict[str, np.ndarray]  # ordered name -> array, e.g. "dense_0/W"


@dataclass(frozen=True)
class ModelVersion:
    """A global model: its version number, parameters and JSON-like architecture spec."""

    version: int
    params: Params
    spec: dict[str, Any]
    round: int | None = None
    created_s: float = 0.0
    run_id: str = ""  # the run this version belongs to; streams outlive runs
    # how params travel (--model-dtype): "float32"; "bfloat16" (uint16 bit patterns on the wire); or
    # "int8" (--compress int8's layers); float32 again once decoded: a decoded model holds float32 arrays
    dtype: str = "float32"


@dataclass(frozen=True)
class Task:
    """A request to a worker: train from ``version`` (None = newest it has) with these knobs."""

    task_id: str
    version: int | None
    mode: str  # "sync" | "async"
    epochs: int
    batch_size: int
    lr: float
    mu: float  # FedProx proximal coefficient, 0 = plain SGD
    seed: int
    round: int | None = None
    update_kind: str = "weights"  # what the update must carry: "weights" or "delta"
    run_id: str = ""  # the run that issued the task
    compression: str = "none"  # how the update's delta must be compressed (fedmq.shared.compression)
    model_bytes: int = 0  # the size of the model's parameters (0: not said): a worker that cannot hold it refuses


@dataclass(frozen=True)
class Update:
    """A worker's result for one task: full new weights or the delta new - base."""

    task_id: str
    worker_id: str
    base_version: int
    num_samples: int
    params: Params
    kind: str  # "weights" | "delta"
    train_loss: float
    train_accuracy: float
    duration_s: float
    round: int | None = None
    run_id: str = ""  # echoed from the task
    compression: str = "none"  # the task's; decoded params are float32 whatever it is


@dataclass(frozen=True)
class Control:
    """Out-of-band signalling between the aggregator and the workers."""

    kind: str  # "stop" | "hello" | "heartbeat" | "bye"
    worker_id: str = ""
    sent_s: float = 0.0
    info: dict[str, Any] = field(default_factory=dict)  # JSON-like
    run_id: str = ""  # "" where the message belongs to no run (a worker's hello)


Message: TypeAlias = ModelVersion | Task | Update | Control

_TYPE_NAMES: dict[type, str] = {
    ModelVersion: "model",
    Task: "task",
    Update: "update",
    Control: "control",
}
_TYPES_BY_NAME: dict[str, type] = {name: cls for cls, name in _TYPE_NAMES.items()}
_ENVELOPE = ("schema", "type")


def message_type(msg: Message) -> str:
    """The wire name of ``msg``'s type: "model", "task", "update" or "control"."""
    try:
        return _TYPE_NAMES[type(msg)]
    except KeyError:
        raise TypeError(f"{type(msg).__name__} is not a fedmq message") from None


# --------------------------------------------------------------------------- encoding


def encode(msg: Message) -> bytes:
    """The wire bytes of ``msg``; TypeError if a field has no wire form (e.g. a list param)."""
    return b"".join(encode_pieces(msg))


def encode_pieces(msg: Message) -> list[Any]:
    """:func:`encode` as pieces (bytes and zero-copy views of the params) whose concatenation is
    the wire bytes: a large update is sent chunk by chunk without one model-sized buffer."""
    name = message_type(msg)
    doc: dict[str, Any] = {"schema": SCHEMA_VERSION, "type": name}
    later = _LATER_FIELDS.get(type(msg), {})
    for f in fields(msg):
        value = getattr(msg, f.name)
        if f.name in later and value == later[f.name]:
            continue
        layered = (isinstance(msg, Update) and msg.compression != "none") or (
            isinstance(msg, ModelVersion) and msg.dtype == compression.INT8)  # maps of arrays per layer
        if f.name == "params" and not layered:
            _check_params_to_send(value, f"{name}.params")
        doc[f.name] = value
    return codec.pack_pieces(doc)


def _check_params_to_send(params: Any, where: str) -> None:
    if not isinstance(params, dict):
        raise TypeError(
            f"{where} must be a dict of name -> numpy array, not {type(params).__name__}"
        )
    for key, value in params.items():
        if not isinstance(key, str):
            raise TypeError(f"{where}: name {key!r} is not a str")
        if not isinstance(value, np.ndarray):
            raise TypeError(f"{where}[{key!r}] is a {type(value).__name__}, not a numpy array")


# --------------------------------------------------------------------------- validators

# A check gets (value, message type, field name), returns the value to store, and builds
# the "update.num_samples"-style location only when it raises.
Check: TypeAlias = Callable[[Any, str, str], Any]


def _kind(value: Any) -> str:
    if isinstance(value, np.ndarray):
        return "array"
    names = {dict: "map", list: "list", type(None): "None", bytes: "bytes"}
    return names.get(type(value), type(value).__name__)


def _brief(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _integer(minimum: int | None = None) -> Check:
    def check(value: Any, msg: str, key: str) -> int:
        if type(value) is not int:
            raise DecodeError(f"{msg}.{key} must be an int, got {_kind(value)} {_brief(value)}")
        if minimum is not None and value < minimum:
            raise DecodeError(f"{msg}.{key} must be >= {minimum}, got {value}")
        return value

    return check


def _number(minimum: float | None = None, *, above: bool = False) -> Check:
    """A finite float (ints accepted); ``minimum`` is exclusive when ``above``."""

    def check(value: Any, msg: str, key: str) -> float:
        if type(value) is float:
            number = value
        elif type(value) is int:
            try:
                number = float(value)
            except OverflowError:
                raise DecodeError(f"{msg}.{key} is {value}, too large for a float") from None
        else:
            raise DecodeError(f"{msg}.{key} must be a float, got {_kind(value)} {_brief(value)}")
        if not math.isfinite(number):
            raise DecodeError(f"{msg}.{key} must be finite, got {number}")
        if minimum is not None and (number <= minimum if above else number < minimum):
            raise DecodeError(
                f"{msg}.{key} must be {'>' if above else '>='} {minimum}, got {number}"
            )
        return number

    return check


def _text(choices: tuple[str, ...] | None = None, *, nonempty: bool = False) -> Check:
    def check(value: Any, msg: str, key: str) -> str:
        if type(value) is not str:
            raise DecodeError(f"{msg}.{key} must be a str, got {_kind(value)} {_brief(value)}")
        if choices is not None and value not in choices:
            raise DecodeError(
                f"{msg}.{key} must be one of {', '.join(choices)}; got {_brief(value)}"
            )
        if nonempty and not value:
            raise DecodeError(f"{msg}.{key} must not be empty")
        return value

    return check


def _optional(inner: Check) -> Check:
    def check(value: Any, msg: str, key: str) -> Any:
        return None if value is None else inner(value, msg, key)

    return check


def _params(value: Any, msg: str, key: str) -> Params:
    if type(value) is not dict:
        raise DecodeError(f"{msg}.{key} must be a map of name -> array, got {_kind(value)}")
    for name, arr in value.items():
        if type(arr) is not np.ndarray:
            raise DecodeError(
                f"{msg}.{key}[{name!r}] is a {_kind(arr)}, not an array map "
                "with exactly the keys dtype, shape, data (data a bin)"
            )
    return value


def _json_like(value: Any, where: str) -> None:
    """Accept None, bool, int, finite float, str, list and str-keyed map, recursively."""
    if value is None or type(value) in (bool, int, str):
        return
    if type(value) is float:
        if not math.isfinite(value):
            raise DecodeError(f"{where} is {value}; only finite floats are JSON-like")
    elif type(value) is list:
        for i, item in enumerate(value):
            _json_like(item, f"{where}[{i}]")
    elif type(value) is dict:
        for name, item in value.items():
            _json_like(item, f"{where}[{name!r}]")
    else:
        raise DecodeError(f"{where} is a {_kind(value)}, which is not JSON-like")


def _json_map(value: Any, msg: str, key: str) -> dict[str, Any]:
    if type(value) is not dict:
        raise DecodeError(f"{msg}.{key} must be a map, got {_kind(value)} {_brief(value)}")
    if value:
        _json_like(value, f"{msg}.{key}")
    return value


def _scheme(value: Any, msg: str, key: str) -> str:
    """A compression scheme, in its canonical form."""
    if type(value) is not str:
        raise DecodeError(f"{msg}.{key} must be a str, got {_kind(value)} {_brief(value)}")
    try:
        return compression.parse(value).text
    except ValueError as exc:
        raise DecodeError(f"{msg}.{key}: {exc}") from None


def _raw_params(value: Any, msg: str, key: str) -> dict[str, Any]:
    """An update's or model's params before their compression or dtype says what they hold."""
    if type(value) is not dict:
        raise DecodeError(f"{msg}.{key} must be a map of name -> array, got {_kind(value)}")
    return value


def _update_params(params: dict[str, Any], scheme: str, max_bytes: int) -> Params:
    """An update's float32 params: as sent, or decompressed (and strictly checked) from ``scheme``."""
    parsed = compression.parse(scheme)
    if not parsed.lossy:
        return _params(params, "update", "params")
    return compression.decode_params(params, parsed, max_bytes=max_bytes)


_VERSION = _integer(0)
_ROUND = _optional(_integer(0))
_TIME = _number(0.0)

_SCHEMAS: dict[type, dict[str, Check]] = {
    ModelVersion: {
        "version": _VERSION,
        "params": _raw_params,
        "spec": _json_map,
        "round": _ROUND,
        "created_s": _TIME,
        "run_id": _text(),
        "dtype": _text(compression.MODEL_DTYPES),
    },
    Task: {
        "task_id": _text(nonempty=True),
        "version": _optional(_VERSION),
        "mode": _text(MODES),
        "epochs": _integer(1),
        "batch_size": _integer(1),
        "lr": _number(0.0, above=True),
        "mu": _number(0.0),
        "seed": _integer(0),
        "round": _ROUND,
        "update_kind": _text(UPDATE_KINDS),
        "run_id": _text(),
        "compression": _scheme,
        "model_bytes": _integer(0),
    },
    Update: {
        "task_id": _text(nonempty=True),
        "worker_id": _text(nonempty=True),
        "base_version": _VERSION,
        "num_samples": _integer(0),
        "params": _raw_params,
        "kind": _text(UPDATE_KINDS),
        "train_loss": _number(),
        "train_accuracy": _number(),
        "duration_s": _TIME,
        "round": _ROUND,
        "run_id": _text(),
        "compression": _scheme,
    },
    Control: {
        "kind": _text(CONTROL_KINDS),
        "worker_id": _text(),
        "sent_s": _TIME,
        "info": _json_map,
        "run_id": _text(),
    },
}
assert all(list(checks) == [f.name for f in fields(cls)] for cls, checks in _SCHEMAS.items()), (
    "every dataclass field needs exactly one check"
)


_WIRE_KEYS = {cls: frozenset(_ENVELOPE) | checks.keys() for cls, checks in _SCHEMAS.items()}
#: fields added after a schema's first release: left out of the wire form while they hold their
#: default (so that peers without them read the message), and read as that default when absent
_LATER_FIELDS: dict[type, dict[str, Any]] = {Task: {"compression": "none", "model_bytes": 0},
                                              Update: {"compression": "none"},
                                              ModelVersion: {"dtype": "float32"}}

# --------------------------------------------------------------------------- decoding


def _names(keys: Any) -> str:
    return ", ".join(_brief(k) for k in sorted(keys))


def _envelope(doc: dict[str, Any]) -> type:
    """Check ``schema`` and ``type`` and return the message class."""
    if "schema" not in doc:
        raise DecodeError("not a fedmq message: no 'schema' field")
    schema = doc["schema"]
    if type(schema) is not int:
        raise DecodeError(f"'schema' must be an int, got {_kind(schema)} {_brief(schema)}")
    if schema != SCHEMA_VERSION:
        raise DecodeError(f"unknown schema version {schema}; this fedmq speaks {SCHEMA_VERSION}")
    name = doc.get("type")
    if type(name) is not str or name not in _TYPES_BY_NAME:
        raise DecodeError(
            f"unknown message type {_brief(name)}; expected one of {', '.join(_TYPES_BY_NAME)}"
        )
    return _TYPES_BY_NAME[name]


def _expected(expect: Any) -> tuple[type, ...]:
    """The classes in ``expect``: a message class, a tuple of them, or a union like Message."""
    classes = expect if isinstance(expect, tuple) else get_args(expect) or (expect,)
    for cls in classes:
        if cls not in _TYPE_NAMES:
            raise TypeError(f"expect: {cls!r} is not a fedmq message class")
    return classes


def decode(
    data: bytes | bytearray | memoryview,
    *,
    expect: type | tuple[type, ...] | Any | None = None,
    max_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
    max_decompressed_bytes: int | None = None,
) -> Message:
    """Decode and fully validate one message; raise DecodeError naming what is wrong.

    ``expect`` restricts the accepted message classes. ``len(data)`` is checked against
    ``max_bytes`` before anything is parsed; a compressed update's (or int8 model's) float32 params against
    ``max_decompressed_bytes`` (default ``max_bytes``) before they are allocated. (A non-message class in ``expect`` is a
    programming error and raises TypeError.)
    """
    wanted = _expected(expect) if expect is not None else None
    doc = codec.unpack(data, max_bytes)
    cls = _envelope(doc)
    name = _TYPE_NAMES[cls]
    if wanted is not None and cls not in wanted:
        raise DecodeError(
            f"expected {' or '.join(_TYPE_NAMES[c] for c in wanted)}, got a {name} message"
        )
    checks = _SCHEMAS[cls]
    if doc.keys() != _WIRE_KEYS[cls]:
        later = _LATER_FIELDS.get(cls, {})
        present = doc.keys() - set(_ENVELOPE)
        if unknown := present - checks.keys():
            raise DecodeError(f"unknown field(s) in {name}: {_names(unknown)}")
        if missing := checks.keys() - present - later.keys():
            raise DecodeError(f"missing field(s) in {name}: {_names(missing)}")
        doc = {**{key: value for key, value in later.items() if key not in doc}, **doc}
    values = {key: check(doc[key], name, key) for key, check in checks.items()}
    limit = max_bytes if max_decompressed_bytes is None else max_decompressed_bytes
    if cls is Update:
        values["params"] = _update_params(values["params"], values["compression"], limit)
    elif cls is ModelVersion and values["dtype"] == "float32":
        values["params"] = _params(values["params"], name, "params")
    elif cls is ModelVersion:
        values["params"] = compression.model_params(values["params"], values["dtype"], max_bytes=limit,
                                                    where=f"{name}.params")
    return cls(**values)
