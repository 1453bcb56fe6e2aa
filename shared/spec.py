"""How a run's trainer turns its own configuration and the data into the model spec.

The aggregator builds no architecture itself: it hands the trainer factory the trainer's
configuration (``--trainer-config KEY=VALUE`` pairs, repeated, or the ``[trainer]`` table of
the TOML config), the shape of one sample and the number of classes, and the factory answers
with the spec that then travels with every model version. A factory says how through an
optional ``spec_from`` attribute (a classmethod on a trainer class)::

    spec_from(config: dict, *, input_shape: tuple[int, ...], num_classes: int, seed: int) -> dict

which validates ``config`` (a :class:`~fedmq.shared.errors.ConfigError` naming an unknown or
bad key, see :func:`check_keys`) and returns a JSON-able dict. A factory without one gets
``{"input_shape": [...], "num_classes": k, "seed": seed, **config}`` and validates it itself
when it is called with it.

Values of ``KEY=VALUE`` pairs are read as JSON where they parse as JSON (``lr=0.1``,
``hidden=[64,32]``, ``bn=true``, ``name="x"``) and as text otherwise (``module=pkg.mod:make``,
``hidden=64,32``, which the MLP also takes).
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import math
import os
import sys
import threading
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from fedmq.shared.errors import ConfigError

#: the key of the spec and of trainer configurations that picks the device (``cpu``,
#: ``cuda``, ``auto``); ``--device`` sets it
DEVICE_KEY = "device"
DEVICES = ("auto", "cpu", "cuda")


def parse_value(text: str) -> Any:
    """A ``--trainer-config`` value: JSON where it parses as JSON, the text itself otherwise."""
    try:
        value = json.loads(text)
    except ValueError:
        return text
    if isinstance(value, float) and not math.isfinite(value):
        return text
    return value


def parse_trainer_config(pairs: Iterable[str]) -> dict[str, Any]:
    """``["lr=0.1", "module=m:f"]`` -> ``{"lr": 0.1, "module": "m:f"}``; ConfigError on a pair
    without ``=`` or with an empty key (the last of two equal keys wins)."""
    config: dict[str, Any] = {}
    for pair in pairs:
        key, sep, value = str(pair).partition("=")
        key = key.strip()
        if not sep or not key:
            raise ConfigError(f"--trainer-config takes KEY=VALUE, got {pair!r}")
        config[key.replace("-", "_")] = parse_value(value.strip())
    return config


def config_pairs(table: Mapping[str, Any]) -> tuple[str, ...]:
    """A TOML ``[trainer]`` table as ``--trainer-config`` pairs (values as JSON, read back the same)."""
    if not isinstance(table, Mapping):
        raise ConfigError(f"the [trainer] table must be a table of KEY = VALUE, got {table!r}")
    return tuple(f"{key}={json.dumps(value)}" for key, value in table.items())


def check_keys(config: Mapping[str, Any], allowed: Iterable[str], trainer: str,
               required: Iterable[str] = ()) -> None:
    """ConfigError unless ``config`` has only ``allowed`` keys and every ``required`` one."""
    known = sorted(set(allowed))
    unknown = sorted(k for k in config if k not in known)
    if unknown:
        raise ConfigError(
            f"unknown --trainer-config key {unknown[0]!r} for {trainer}; its keys are {', '.join(known)}"
        )
    missing = [k for k in required if k not in config]
    if missing:
        raise ConfigError(f"{trainer} needs --trainer-config {missing[0]}=...")


def check_device(value: Any, trainer: str, supported: Sequence[str] = DEVICES) -> str:
    """``value`` if it names a device ``trainer`` runs on; ConfigError otherwise."""
    if value not in DEVICES:
        raise ConfigError(f"--device must be one of {', '.join(DEVICES)}, got {value!r}")
    if value not in supported:
        raise ConfigError(f"{trainer} runs on {' or '.join(d for d in supported if d != 'auto')} only, "
                          f"not --device {value}")
    return str(value)


def run_trainer_config(factory: object, pairs: Iterable[str], *, device: str,
                       mlp_options: Mapping[str, Any]) -> dict[str, Any]:
    """The configuration a run gives its trainer: ``--trainer-config`` over the shorthands.

    ``--device`` (unless ``auto``) is the ``device`` key; the run's MLP options (``--hidden``,
    ``--activation``, ``--loss``) are the keys of the same names of a factory that lists them
    in its ``SHORTHANDS`` attribute (the numpy MLP and trainers derived from it). A
    ``--trainer-config`` pair wins over both.
    """
    shorthands = getattr(factory, "SHORTHANDS", ())
    config: dict[str, Any] = {k: v for k, v in mlp_options.items() if k in shorthands}
    if device != "auto":
        config[DEVICE_KEY] = device
    config.update(parse_trainer_config(pairs))
    return config


def build_spec(factory: object, config: Mapping[str, Any], *, input_shape: Sequence[int],
               num_classes: int, seed: int) -> dict[str, Any]:
    """The spec of a run's model: the factory's ``spec_from`` answer, or the default (see the module doc)."""
    shape = tuple(int(n) for n in input_shape)
    spec_from = getattr(factory, "spec_from", None)
    if callable(spec_from):
        try:
            spec = spec_from(dict(config), input_shape=shape, num_classes=int(num_classes), seed=int(seed))
        except ConfigError:
            raise
        except Exception as exc:  # a user's spec_from may raise anything: one line, no traceback
            raise ConfigError(f"the trainer rejected its --trainer-config: {type(exc).__name__}: {exc}") from None
    else:
        spec = {"input_shape": list(shape), "num_classes": int(num_classes), "seed": int(seed), **config}
    if not isinstance(spec, dict):
        raise ConfigError(f"the trainer's spec_from returned {type(spec).__name__}, not a dict")
    try:
        json.dumps(spec)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"the trainer's spec is not JSON-able ({exc}); it travels with every model") from None
    return spec


def resolve_ref(ref: str, what: str) -> Any:
    """The object a ``package.module:attr`` or ``path/to/file.py:attr`` reference names.

    ``attr`` may be dotted. A ``.py`` path (relative to the working directory) is loaded as a
    module of its own, so an example's model file needs no package and no PYTHONPATH.
    ConfigError with one sentence on any failure.
    """
    if not isinstance(ref, str) or ref.count(":") != 1:
        raise ConfigError(f"{what} {ref!r} must look like 'package.module:attr' or 'path/file.py:attr'")
    module_name, attr_path = (part.strip() for part in ref.split(":"))
    if not module_name or not attr_path:
        raise ConfigError(f"{what} {ref!r} must name both a module and an attribute, like 'package.module:attr'")
    try:
        if module_name.endswith(".py"):
            module = _load_file(module_name, ref, what)
        else:
            module = importlib.import_module(module_name)
    except ConfigError:
        raise
    except ModuleNotFoundError as exc:
        raise ConfigError(
            f"{what} module {module_name!r} (from {ref!r}) cannot be imported: {exc}; check it is installed or on PYTHONPATH"
        ) from None
    except Exception as exc:  # the user's module raised while importing
        raise ConfigError(
            f"importing {what} module {module_name!r} (from {ref!r}) failed with {type(exc).__name__}: {exc}"
        ) from None
    obj: Any = module
    for name in attr_path.split("."):
        try:
            obj = getattr(obj, name)
        except AttributeError:
            raise ConfigError(f"{what} module {module_name!r} has no attribute {attr_path!r} (from {ref!r})") from None
    return obj


#: one file module loads at a time: it is in sys.modules before its body has run, and a second
#: thread (pooled workers taking their first task together) would get it half made ("has no
#: attribute"); re-entrant, for a user module that loads another by path while it loads
_FILE_LOAD_LOCK = threading.RLock()


def _load_file(path: str, ref: str, what: str) -> Any:
    with _FILE_LOAD_LOCK:
        return _load_file_locked(path, ref, what)


def _load_file_locked(path: str, ref: str, what: str) -> Any:
    if not os.path.isfile(path):
        raise ConfigError(f"{what} file {path!r} (from {ref!r}) does not exist (relative to {os.getcwd()})")
    name = "fedmq_user_" + os.path.splitext(os.path.abspath(path))[0].strip(os.sep).replace(os.sep, "_").replace("-", "_")
    if name in sys.modules:
        return sys.modules[name]
    loader_spec = importlib.util.spec_from_file_location(name, path)
    if loader_spec is None or loader_spec.loader is None:
        raise ConfigError(f"{what} file {path!r} (from {ref!r}) cannot be loaded as a Python module")
    module = importlib.util.module_from_spec(loader_spec)
    sys.modules[name] = module
    try:
        loader_spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[name]
        raise
    return module


def make_trainer(factory: Any, spec: dict[str, Any]) -> Any:
    """``factory(spec)``; whatever a user's factory raises becomes a one-line ConfigError."""
    try:
        return factory(spec)
    except ConfigError:
        raise
    except Exception as exc:
        raise ConfigError(f"the trainer cannot be built from its spec: {type(exc).__name__}: {exc}") from None
