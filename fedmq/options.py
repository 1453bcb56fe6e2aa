"""Option plumbing shared by every command: config files, broker options, logging options.

Precedence, highest first: command-line flags, environment variables (``FEDMQ_AMQP_URL``,
``FEDMQ_NAMESPACE``, ``FEDMQ_LOG_LEVEL``, ``FEDMQ_LOG_FORMAT``, and ``FEDMQ_<COMMAND>_<OPTION>``
for the rest, e.g. ``FEDMQ_AGGREGATOR_ROUNDS``), the TOML file given with ``--config``, then
the defaults. This is click's own order (command line, environment, ``default_map``,
default); ``--config`` is an eager option that fills ``default_map`` from the file.

A config file holds keys for the command it is given to, either at the top level or under a
table named after the command (``[aggregator]``, ``[worker]``, ``[run]``); keys are option
names with ``_`` or ``-``. An unknown key is an error that names it.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from fedmq.broker.settings import DEFAULT_AMQP_URL, DEFAULT_NAMESPACE, BrokerSettings
from fedmq.broker.topology import Topology
from fedmq.shared.errors import ConfigError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

COMMAND_TABLES = ("aggregator", "worker", "workers", "run", "broker", "data")


def load_config_file(path: str, command: click.Command, command_name: str) -> dict[str, Any]:
    try:
        doc = tomllib.loads(Path(path).read_text())
    except FileNotFoundError:
        raise ConfigError(f"config file {path} does not exist") from None
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(f"config file {path} is not valid TOML: {exc}") from None
    known = {p.name for p in command.params if p.name} - {"config"}
    values: dict[str, Any] = {}
    for key, value in doc.items():
        if isinstance(value, dict) and key in COMMAND_TABLES:
            if key != command_name:
                continue
            for sub_key, sub_value in value.items():
                values[_param_name(sub_key, known, path, f"[{key}]")] = sub_value
        else:
            values[_param_name(key, known, path, "")] = value
    return values


def _param_name(key: str, known: set[str], path: str, table: str) -> str:
    name = key.replace("-", "_")
    if name not in known:
        where = f" in {table}" if table else ""
        raise ConfigError(f"config file {path}: unknown key {key!r}{where} (known: {', '.join(sorted(known))})")
    return name


def _config_callback(ctx: click.Context, _param: click.Parameter, value: str | None) -> str | None:
    if value:
        assert ctx.command is not None
        try:
            values = load_config_file(value, ctx.command, ctx.info_name or "")
        except ConfigError as exc:
            raise click.BadParameter(str(exc)) from None
        ctx.default_map = {**(ctx.default_map or {}), **values}
    return value


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


def broker_options(fn: Callable[..., Any]) -> Callable[..., Any]:
    fn = click.option("--namespace", default=DEFAULT_NAMESPACE, envvar="FEDMQ_NAMESPACE", show_default=True,
                      help="Prefix of every queue and exchange (several federations can share a broker).")(fn)
    fn = click.option("--amqp-url", default=DEFAULT_AMQP_URL, envvar="FEDMQ_AMQP_URL", show_default=True,
                      help="RabbitMQ URL (amqp:// or amqps://).")(fn)
    return fn


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
