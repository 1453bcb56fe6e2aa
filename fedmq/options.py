"""Option plumbing shared by every command: config files, broker, logging and aggregator options.

Precedence, highest first: command-line flags, environment variables (``FEDMQ_AMQP_URL``,
``FEDMQ_NAMESPACE``, ``FEDMQ_LOG_LEVEL``, ``FEDMQ_LOG_FORMAT``, and ``FEDMQ_<COMMAND>_<OPTION>``
for the rest, e.g. ``FEDMQ_AGGREGATOR_ROUNDS``), the TOML file given with ``--config``, then
the defaults. This is click's own order (command line, environment, ``default_map``,
default); ``--config`` is an eager option that fills ``default_map`` from the file.

A config file holds keys for the command it is given to, either at the top level or under a
table named after the command (``[aggregator]``, ``[worker]``, ``[run]``, ``[data]`` for
``data split``); keys are option names as on the command line (``workers``, ``data``,
``buffer-size``), with ``_`` or ``-``. An unknown key is an error that names it. ``fedmq run``
also reads the ``[aggregator]`` table, so that the file that configures ``fedmq aggregator``
configures the aggregator of ``fedmq run`` the same way (its ``[run]`` table wins over it; the
top level is lowest). A ``[trainer]`` table is the trainer's own configuration: it gives
``--trainer-config`` (KEY=VALUE pairs, values as JSON) to the commands that take it and is
skipped by the others. Environment variables follow the option names too: ``--workers`` of
``run`` is ``FEDMQ_RUN_WORKERS`` (see :class:`FlagEnvOption`).

The aggregator's options (``fedmq aggregator`` and ``fedmq run``) are generated from the fields
of :class:`fedmq.aggregator.config.AggregatorConfig`, the one list of them: adding a field
adds the option to both commands, to ``run``'s hand-over to its aggregator
(:func:`aggregator_argv`) and to the config-file keys. See "aggregator options" below.
"""

from __future__ import annotations

import dataclasses
import os
import re
import sys
import typing
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import click

from fedmq.broker.settings import (
    DEFAULT_AMQP_URL,
    DEFAULT_NAMESPACE,
    TLS_ENV,
    BrokerSettings,
    mask_text,
)
from fedmq.broker.topology import Topology
from fedmq.shared.errors import ConfigError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

#: the config-file table that holds the trainer's configuration (what --trainer-config gives)
TRAINER_TABLE = "trainer"
COMMAND_TABLES = ("aggregator", "worker", "workers", "run", "broker", "data")
#: tables a command reads besides its own, lowest precedence first: `run` configures its
#: aggregator from the same [aggregator] table as `fedmq aggregator`
EXTRA_TABLES: dict[str, tuple[str, ...]] = {"run": ("aggregator",)}


class FlagEnvOption(click.Option):
    """An option whose environment variable follows its flag, not only its parameter name.

    click derives ``<PREFIX>_<PARAMETER NAME>``; for ``--workers`` stored as ``num_workers``
    that would be ``FEDMQ_RUN_NUM_WORKERS``. This also reads ``FEDMQ_RUN_WORKERS``, the name a
    user derives from ``--help`` (the flag's name wins when both are set).
    """

    def resolve_envvar_value(self, ctx: click.Context) -> str | None:
        flag = long_flag(self)
        if self.envvar is None and self.allow_from_autoenv and ctx.auto_envvar_prefix and flag:
            rv = os.environ.get(f"{ctx.auto_envvar_prefix}_{flag.upper()}")
            if rv:
                return rv
        return super().resolve_envvar_value(ctx)


def long_flag(param: click.Parameter) -> str | None:
    """``--buffer-size`` -> ``buffer_size``: the option's first long flag as a key (None for
    an argument)."""
    if not isinstance(param, click.Option):
        return None
    flag = next((o for o in param.opts if o.startswith("--")), None)
    return flag[2:].replace("-", "_") if flag else None


def option_keys(command: click.Command) -> dict[str, str]:
    """Config-file key -> parameter name: each option's flag name (``workers``) and its
    parameter name (``num_workers``)."""
    keys: dict[str, str] = {}
    for p in command.params:
        if not p.name or p.name == "config":
            continue
        keys[p.name] = p.name
        flag = long_flag(p)
        if flag:
            keys[flag] = p.name
    return keys


def load_config_file(path: str, command: click.Command, command_name: str) -> dict[str, Any]:
    """The option values a TOML file gives ``command`` (parameter name -> value).

    Top-level keys, then the :data:`EXTRA_TABLES` of the command, then its own table, each
    overriding the one before. An unknown key is a ConfigError naming it; in an extra table
    (``[aggregator]`` read by ``run``), a key the other command takes but this one does not
    (``test-data``: `run` makes its own test set) is skipped.
    """
    try:
        doc = tomllib.loads(Path(path).read_text())
    except FileNotFoundError:
        raise ConfigError(f"config file {path} does not exist") from None
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(f"config file {path} is not valid TOML: {exc}") from None
    known = option_keys(command)
    values: dict[str, Any] = {}
    if isinstance(doc.get(TRAINER_TABLE), dict):  # [trainer]: the trainer's own configuration
        table = doc.pop(TRAINER_TABLE)
        if "trainer_config" in known:
            values["trainer_config"] = _pairs(None, None, table)
    for key, value in doc.items():
        if not (isinstance(value, dict) and key in COMMAND_TABLES):
            values[_param_name(key, known, path, "")] = value
    for table in (*EXTRA_TABLES.get(command_name, ()), command_name):
        section = doc.get(table)
        if not isinstance(section, dict):
            continue
        foreign = _foreign_keys(table) if table != command_name else set()
        for sub_key, sub_value in section.items():
            if sub_key.replace("-", "_") in foreign and sub_key.replace("-", "_") not in known:
                continue
            values[_param_name(sub_key, known, path, f"[{table}]")] = sub_value
    return values


def _pairs(_ctx: click.Context | None, _param: click.Parameter | None, value: Any) -> tuple[str, ...]:
    """--trainer-config values as KEY=VALUE strings: from the command line, or a table (a
    ``[trainer]`` table or an inline one) or list from a config file."""
    from fedmq.shared.spec import config_pairs

    try:
        if isinstance(value, Mapping):
            return config_pairs(value)
        items = [value] if isinstance(value, str) else list(value or ())
        for item in items:
            if not isinstance(item, str) or "=" not in item:
                raise ConfigError(f"--trainer-config takes KEY=VALUE, got {item!r}")
        return tuple(items)
    except ConfigError as exc:
        raise click.BadParameter(str(exc)) from None


def _foreign_keys(table: str) -> set[str]:
    """Keys that are valid in another command's table (only [aggregator] is read by another)."""
    if table == "aggregator":
        return {f.name for f in config_fields()}
    return set()


def _param_name(key: str, known: dict[str, str], path: str, table: str) -> str:
    name = key.replace("-", "_")
    if name not in known:
        where = f" in {table}" if table else ""
        aliased = {v for k, v in known.items() if k != v}  # num_workers: shown as workers
        shown = sorted(k.replace("_", "-") for k in known if k not in aliased)
        raise ConfigError(f"config file {path}: unknown key {key!r}{where} (known: {', '.join(shown)})")
    return known[name]


def _command_table(ctx: click.Context) -> str:
    """The config table of the command being parsed: its name, or its group's (``data split``
    reads ``[data]``)."""
    name = ctx.info_name or ""
    if name not in COMMAND_TABLES and ctx.parent is not None and ctx.parent.info_name in COMMAND_TABLES:
        return ctx.parent.info_name or name
    return name


def _config_callback(ctx: click.Context, _param: click.Parameter, value: str | None) -> str | None:
    if value:
        assert ctx.command is not None
        try:
            values = load_config_file(value, ctx.command, _command_table(ctx))
        except ConfigError as exc:
            raise click.BadParameter(str(exc)) from None
        ctx.default_map = {**(ctx.default_map or {}), **values}
    return value


def parse_label_column(value: str | int | None, data_file: str | None) -> str | int:
    """``--label-column NAME|INDEX`` -> what :func:`fedmq.shared.data.read_csv` takes.

    A column of the CSV's header with that name wins; otherwise an integer is an index (``0``:
    the first column, ``-1``: the last); None is the last column.
    """
    if value is None:
        return -1
    if isinstance(value, int):
        return value
    text = str(value).strip()
    if data_file and text in csv_header(data_file):
        return text
    try:
        return int(text)
    except ValueError:
        return text


def csv_header(path: str) -> list[str]:
    """The column names of a CSV file's header row ([] when it cannot be read)."""
    import csv

    try:
        with open(path, newline="", encoding="utf-8") as f:
            for row in csv.reader(f):
                if row and any(c.strip() for c in row):
                    return [c.strip() for c in row]
    except (OSError, UnicodeDecodeError, csv.Error):
        pass
    return []


def config_option(fn: Callable[..., Any]) -> Callable[..., Any]:
    return click.option(
        "--config", type=click.Path(dir_okay=False), is_eager=True, expose_value=False,
        callback=_config_callback, help="TOML file with option values (flags and FEDMQ_* env win).",
    )(fn)


def logging_options(fn: Callable[..., Any]) -> Callable[..., Any]:
    fn = click.option("--log-format", type=click.Choice(["text", "json"]), default="text",
                      envvar="FEDMQ_LOG_FORMAT", show_default=True, help="Log line format.")(fn)
    fn = click.option("--log-level", type=click.Choice(["debug", "info", "warning", "error"], case_sensitive=False),
                      default="info", envvar="FEDMQ_LOG_LEVEL", show_default=True, help="Log verbosity.")(fn)
    return fn


def _tls_to_env(ctx: click.Context, param: click.Parameter, value: Any) -> None:
    """Hand a --tls-* value to the broker settings (and to processes `fedmq run` starts)
    through its FEDMQ_TLS_* variable (see fedmq.broker.settings.TLS_ENV)."""
    name = str(param.name)
    if name == "tls_no_verify_hostname":
        if value:
            os.environ[TLS_ENV["tls_verify_hostname"]] = "false"
    elif name == "tls_external":
        if value:
            os.environ[TLS_ENV["tls_external"]] = "true"
    elif value is not None:
        os.environ[TLS_ENV[name]] = str(value)


def tls_options(fn: Callable[..., Any]) -> Callable[..., Any]:
    """--tls-ca, --tls-cert, --tls-key, --tls-external, --tls-no-verify-hostname (amqps://)."""
    common: dict[str, Any] = {"expose_value": False, "callback": _tls_to_env}
    fn = click.option("--tls-no-verify-hostname", is_flag=True, default=False, **common,
                      help="TLS: do not check that the broker's certificate names the host dialled "
                           "(the certificate is still verified against the CA). Env FEDMQ_TLS_VERIFY_HOSTNAME=false.")(fn)
    fn = click.option("--tls-external", is_flag=True, default=False, **common,
                      help="TLS: log in with the client certificate (SASL EXTERNAL) instead of a "
                           "password. Env FEDMQ_TLS_EXTERNAL.")(fn)
    fn = click.option("--tls-key", type=click.Path(dir_okay=False), default=None, **common,
                      help="TLS: the client certificate's private key (PEM). Env FEDMQ_TLS_KEY.")(fn)
    fn = click.option("--tls-cert", type=click.Path(dir_okay=False), default=None, **common,
                      help="TLS: client certificate (PEM), for mutual TLS. Env FEDMQ_TLS_CERT.")(fn)
    fn = click.option("--tls-ca", type=click.Path(dir_okay=False), default=None, **common,
                      help="TLS: CA bundle (PEM) that signed the broker's certificate "
                           "(default: the system's CAs). Env FEDMQ_TLS_CA.")(fn)
    return fn


def broker_options(fn: Callable[..., Any]) -> Callable[..., Any]:
    fn = tls_options(fn)
    fn = click.option("--namespace", default=DEFAULT_NAMESPACE, envvar="FEDMQ_NAMESPACE", show_default=True,
                      help="Prefix of every queue and exchange (several federations can share a broker).")(fn)
    fn = click.option("--amqp-url", default=DEFAULT_AMQP_URL, envvar="FEDMQ_AMQP_URL", show_default=True,
                      help="RabbitMQ URL (amqp:// or amqps://); several, comma-separated, for the "
                           "nodes of a cluster (tried in order; a lost node is tried last).")(fn)
    return fn


_ANY_URL_PASSWORD = re.compile(r"([A-Za-z][A-Za-z0-9+.-]*://[^:/@\s'\"]*:)([^@\s'\"]*)(@)")


def mask_secrets(text: str) -> str:
    """``text`` with the password of every URL in it (any scheme, not only amqp://) as ``***``."""
    return _ANY_URL_PASSWORD.sub(r"\1***\3", mask_text(text))


def broker_from(amqp_url: str, namespace: str, **overrides: Any) -> tuple[BrokerSettings, Topology]:
    return BrokerSettings.from_url(amqp_url, **overrides), Topology(namespace)


def parse_int_list(_ctx: click.Context | None, _param: click.Parameter | None, value: Any) -> tuple[int, ...]:
    """``64,32`` (or a list from a config file) -> (64, 32)."""
    if isinstance(value, list | tuple):
        items = [str(v) for v in value]
    else:
        items = [v for v in str(value).strip("[]() ").replace(" ", "").split(",") if v]
    try:
        out = tuple(int(v) for v in items)
    except ValueError:
        raise click.BadParameter(f"expected comma-separated integers, got {value!r}") from None
    if not out or any(v <= 0 for v in out):
        raise click.BadParameter(f"expected positive layer sizes, got {value!r}")
    return out


# ====================================================================== aggregator options
# The `aggregator` and `run` commands take one option per field of
# fedmq.aggregator.config.AggregatorConfig, generated from the dataclass: its name, type and
# default. A new field is a new option with no change here; AGGREGATOR_OPTION_DETAILS only
# narrows a type (ranges, choices) or adds help, and a field's ``metadata["help"]`` wins over
# it. The dataclass is imported when a command is parsed, not when this module is: it loads
# numpy, which must wait until `fedmq` has set the BLAS thread variables (see fedmq.cli.main).

#: fields that are not command-line options (set by code, or not expressible as a flag)
NOT_OPTIONS = frozenset({"extra"})
#: fields only `fedmq aggregator` takes as generated options; `fedmq run` sets the test set
#: itself and has its own --out (the run directory, which is also the aggregator's), and makes
#: the keys of its aggregator and workers itself (`run --sign`)
AGGREGATOR_ONLY = frozenset({"test_data", "out", "signing_key", "worker_keys"})

_POSITIVE_INT = click.IntRange(min=1)
_POSITIVE_FLOAT = click.FloatRange(min=0, min_open=True)


def _choices(what: str) -> click.Choice:
    if what == "strategy":
        from fedmq.aggregator.strategies import STRATEGIES

        return click.Choice(list(STRATEGIES))
    if what == "robust":
        from fedmq.aggregator.robust import ROBUST_RULES

        return click.Choice(list(ROBUST_RULES))
    if what == "staleness":
        from fedmq.aggregator.strategies import STALENESS_DEFAULT_A

        return click.Choice(list(STALENESS_DEFAULT_A))
    from fedmq.shared.nn import ACTIVATIONS, LOSSES

    return click.Choice(list(ACTIVATIONS if what == "activation" else LOSSES))


#: per field, click settings beyond the type and default the dataclass gives (callables are
#: called when the options are built, so that their imports wait too)
AGGREGATOR_OPTION_DETAILS: dict[str, dict[str, Any]] = {
    "test_data": {"type": click.Path(dir_okay=False), "help": "Held-out .npz (X, y) to evaluate every version on."},
    "out": {"type": click.Path(file_okay=False), "help": "Run directory."},
    "resume": {"help": "Continue from the newest checkpoint in --out."},
    "mode": {"type": click.Choice(["sync", "async"])},
    "track": {"type": click.Choice(["tensorboard", "mlflow"])},
    "strategy": {"type": lambda: _choices("strategy"), "help": "Default: fedavg for sync, fedbuff for async."},
    "rounds": {"type": _POSITIVE_INT, "help": "Sync rounds (default 20 if nothing else stops the run)."},
    "max_updates": {"type": _POSITIVE_INT, "help": "Stop after this many applied updates."},
    "target_accuracy": {"type": click.FloatRange(0, 1, min_open=True), "help": "Stop at this test accuracy."},
    "time_limit": {"type": _POSITIVE_FLOAT, "help": "Seconds."},
    "workers_per_round": {"type": _POSITIVE_INT, "help": "Sync: C (default: every live worker)."},
    "min_workers": {"type": _POSITIVE_INT, "help": "Wait for this many workers before starting."},
    "round_timeout": {"type": _POSITIVE_FLOAT, "help": "Sync: seconds a round waits for its updates."},
    "concurrency": {"type": _POSITIVE_INT, "help": "Async: tasks outstanding (default: live workers)."},
    "buffer_size": {"type": _POSITIVE_INT, "help": "FedBuff K."},
    "mixing": {"type": click.FloatRange(0, 1, min_open=True), "help": "FedAsync α."},
    "staleness": {"type": lambda: _choices("staleness"), "help": "Staleness weighting s(τ)."},
    "staleness_a": {"help": "polynomial a (0.5) or hinge a (10)."},
    "staleness_b": {"help": "hinge b (4)."},
    "max_staleness": {"type": click.IntRange(min=0), "help": "Record older updates as stale."},
    "server_lr": {"type": _POSITIVE_FLOAT, "help": "FedBuff η."},
    "hidden": {"help": "Hidden layer sizes, e.g. 64,32."},
    "activation": {"type": lambda: _choices("activation")},
    "loss": {"type": lambda: _choices("loss")},
    "epochs": {"type": _POSITIVE_INT, "help": "Local epochs per task."},
    "batch_size": {"type": _POSITIVE_INT},
    "lr": {"type": _POSITIVE_FLOAT, "help": "Workers' learning rate."},
    "proximal_mu": {"type": click.FloatRange(min=0), "help": "FedProx μ."},
    "seed": {"help": "Model initialisation (and, for `run`, data split) seed."},
    "trainer": {"help": "Trainer factory MODULE:ATTR (see README, 'Bring your own model')."},
    "device": {"type": click.Choice(["auto", "cpu", "cuda"])},
    "export": {"type": click.Choice(["safetensors"])},
    "checkpoint_every": {"type": _POSITIVE_INT, "help": "Checkpoint after N updates."},
    "checkpoint_interval": {"type": _POSITIVE_FLOAT, "help": "...or after T seconds."},
    "task_timeout": {"type": _POSITIVE_FLOAT, "help": "Async: reissue a task not answered in this many seconds."},
    "drain_timeout": {"type": click.FloatRange(min=0), "help": "Seconds to wait for workers' last updates after stopping."},
    "max_update_bytes": {"type": _POSITIVE_INT, "help": "Reject larger updates (default: model size + 5%)."},
    "robust": {"type": lambda: _choices("robust")},
    "trim_fraction": {"type": click.FloatRange(0, 0.5, max_open=True)},
    "byzantine": {"type": click.IntRange(min=0)},
    "clip_norm": {"type": _POSITIVE_FLOAT},
    "dp_clip": {"type": _POSITIVE_FLOAT},
    "dp_noise": {"type": click.FloatRange(min=0)},
    "dp_delta": {"type": click.FloatRange(0, 1, min_open=True, max_open=True)},
    "presence_timeout": {"type": _POSITIVE_FLOAT, "help": "Seconds without a heartbeat before a worker counts as gone."},
}

_SCALARS: dict[Any, click.ParamType] = {int: click.INT, float: click.FLOAT, str: click.STRING}


@dataclasses.dataclass(frozen=True)
class ConfigField:
    """One AggregatorConfig field as the command line sees it."""

    name: str
    kind: Any  # int, float, str, bool or tuple (of ints), None removed
    optional: bool
    default: Any  # dataclasses.MISSING when the option is required
    help: str | None

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")


def config_fields() -> list[ConfigField]:
    """Every AggregatorConfig field that is an option, in the dataclass's order."""
    from fedmq.aggregator.config import AggregatorConfig

    hints = typing.get_type_hints(AggregatorConfig)
    out = []
    for f in dataclasses.fields(AggregatorConfig):
        if f.name in NOT_OPTIONS:
            continue
        kind, optional = _kind(f.name, hints[f.name])
        if f.default is not dataclasses.MISSING:
            default = f.default
        elif f.default_factory is not dataclasses.MISSING:
            default = f.default_factory()
        else:
            default = dataclasses.MISSING
        details = AGGREGATOR_OPTION_DETAILS.get(f.name, {})
        out.append(ConfigField(f.name, kind, optional, default, f.metadata.get("help", details.get("help"))))
    return out


def _kind(name: str, hint: Any) -> tuple[Any, bool]:
    args = typing.get_args(hint)
    optional = type(None) in args
    if optional:
        rest = [a for a in args if a is not type(None)]
        if len(rest) != 1:
            raise TypeError(f"AggregatorConfig.{name}: cannot make a command-line option of {hint}")
        hint = rest[0]
    if hint in (int, float, str, bool):
        return hint, optional
    if typing.get_origin(hint) is tuple and typing.get_args(hint) == (int, ...):
        return tuple, optional
    if typing.get_origin(hint) is tuple and typing.get_args(hint) == (str, ...):
        return list, optional  # a repeated option: --trainer-config K=V --trainer-config K2=V2
    raise TypeError(
        f"AggregatorConfig.{name}: cannot make a command-line option of {hint}; "
        "add it to fedmq.options.NOT_OPTIONS or give it a type there"
    )


def aggregator_params(command: str) -> list[click.Parameter]:
    """The click options for AggregatorConfig's fields: all of them for ``aggregator``, for
    ``run`` all but :data:`AGGREGATOR_ONLY`."""
    params: list[click.Parameter] = []
    for f in config_fields():
        if command != "aggregator" and f.name in AGGREGATOR_ONLY:
            continue
        details = AGGREGATOR_OPTION_DETAILS.get(f.name, {})
        kwargs: dict[str, Any] = {"help": f.help}
        required = f.default is dataclasses.MISSING
        if f.kind is bool:
            decls = [f"{f.flag}/--no-{f.flag[2:]}"] if f.default is True else [f.flag]
            kwargs.update(is_flag=True, default=bool(f.default) if not required else False)
        else:
            if f.kind is list:
                kwargs.update(type=click.STRING, multiple=True, callback=_pairs)
                default: Any = tuple(f.default) if not required else ()
            elif f.kind is tuple:
                kwargs.update(type=click.STRING, callback=parse_int_list)
                default = None if required or f.default is None else ",".join(str(v) for v in f.default)
            else:
                kwargs["type"] = _SCALARS[f.kind]
                default = None if required else f.default
            decls = [f.flag]
            kwargs.update(default=default, required=required, show_default=default is not None)
        if "type" in details:
            kind = details["type"]
            kwargs["type"] = kind() if callable(kind) and not isinstance(kind, click.ParamType) else kind
        params.append(click.Option(decls, **kwargs))
    return params


def aggregator_argv(values: Mapping[str, Any]) -> list[str]:
    """`fedmq aggregator` flags that give AggregatorConfig ``values`` (fields ``run`` shares;
    a missing or None value is left to the aggregator's default)."""
    argv: list[str] = []
    for f in config_fields():
        value = values.get(f.name)
        if f.name in AGGREGATOR_ONLY or value is None:
            continue
        if f.kind is bool:
            if bool(value) != bool(f.default):
                argv.append(f.flag if value else f"--no-{f.flag[2:]}")
            continue
        if f.kind is list:
            for item in value:
                argv += [f.flag, str(item)]
            continue
        if f.kind is tuple:
            value = ",".join(str(v) for v in value)
        argv += [f.flag, str(value)]
    return argv


def aggregator_config(values: Mapping[str, Any], **fixed: Any) -> Any:
    """A validated AggregatorConfig from command options ``values`` (other keys ignored) and
    ``fixed`` fields; raises ConfigError."""
    from fedmq.aggregator.config import AggregatorConfig

    names = {f.name for f in config_fields()}
    fields = {k: v for k, v in values.items() if k in names and v is not None}
    return AggregatorConfig(**{**fields, **fixed}).validate()


class ConfigCommand(click.Command):
    """A click command that also takes the AggregatorConfig options, built on first use.

    ``fedmq --help`` and the other commands never build them (nor import numpy); parsing or
    showing the help of this command does.
    """

    _own: list[click.Parameter]

    def __init__(self, *args: Any, config_params: Callable[[], list[click.Parameter]], **kwargs: Any) -> None:
        self._pending: Callable[[], list[click.Parameter]] | None = config_params
        super().__init__(*args, **kwargs)

    @property
    def params(self) -> list[click.Parameter]:
        if self._pending is not None:
            build, self._pending = self._pending, None
            extra = build()
            own = self._own
            # after the command's own options, before the broker and logging ones
            at = next((i for i, p in enumerate(own) if p.name in ("amqp_url", "log_level")), len(own))
            self._own = own[:at] + extra + own[at:]
            names = [p.name for p in self._own]
            clash = sorted({n for n in names if n is not None and names.count(n) > 1})
            if clash:
                raise TypeError(f"command {self.name!r}: options {clash} are defined twice "
                                "(an AggregatorConfig field has the name of one of the command's own options)")
        return self._own

    @params.setter
    def params(self, value: list[click.Parameter]) -> None:
        self._own = list(value)
