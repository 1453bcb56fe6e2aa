"""Broker connection settings, built from an AMQP URL, and password masking.

Every log line and error that mentions a broker goes through :func:`mask_url`, so a
password never reaches a terminal, a log file or ``history.json``.

Several addresses. ``url`` may be a comma-separated list of URLs, the nodes of one RabbitMQ
cluster (``amqp://u:p@node1:5672/,amqp://u:p@node2:5672/``). A client tries them in the order
given, and after losing a node starts with the one after it (see
:class:`fedmq.broker.client.Client`). They must agree on the user and the vhost: a client
is one identity in one vhost, whichever node it reaches.

Maximum message size. RabbitMQ refuses a message over its ``max_message_size`` by closing
the channel (406 PRECONDITION_FAILED), after the whole body was sent; AMQP has no way to ask
a broker for the limit. So the client checks every body before sending it against
:attr:`BrokerSettings.max_message_bytes`:

* set explicitly (``BrokerSettings.from_url(url, max_message_bytes=...)``, or the
  ``FEDMQ_MAX_MESSAGE_BYTES`` environment variable when no override is given), that limit;
* otherwise (``None``, the default) the broker's *default* limit for the version it announces
  when the connection opens: 16 MiB for RabbitMQ 4.x, 128 MiB for RabbitMQ 3.x and any other
  broker (:func:`default_max_message_bytes`).

A broker configured below that still answers 406, which fails that one publish with
:class:`~fedmq.shared.errors.MessageTooLarge` (never a retry); a broker configured above it
needs the setting raised to match.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any
from urllib.parse import urlsplit

from fedmq.shared.errors import ConfigError

DEFAULT_AMQP_URL = "amqp://guest:guest@localhost:5672/"
DEFAULT_NAMESPACE = "fedmq"
MAX_MESSAGE_BYTES_ENV = "FEDMQ_MAX_MESSAGE_BYTES"
#: setting -> the environment variable that gives it when :meth:`BrokerSettings.from_url` is
#: not told (the --tls-* options of every command set these, so `fedmq run` hands them on)
TLS_ENV = {
    "tls_ca": "FEDMQ_TLS_CA",
    "tls_cert": "FEDMQ_TLS_CERT",
    "tls_key": "FEDMQ_TLS_KEY",
    "tls_external": "FEDMQ_TLS_EXTERNAL",
    "tls_verify_hostname": "FEDMQ_TLS_VERIFY_HOSTNAME",
}
_TRUE, _FALSE = {"1", "true", "yes", "on"}, {"0", "false", "no", "off"}

MiB = 1024 * 1024
RABBITMQ3_MAX_MESSAGE_BYTES = 128 * MiB  # RabbitMQ 3.x default max_message_size
RABBITMQ4_MAX_MESSAGE_BYTES = 16 * MiB  # RabbitMQ 4.x default max_message_size

_PASSWORD = re.compile(r"(amqps?://[^:/@]*:)([^@]*)(@)")


def mask_url(url: str) -> str:
    """Return ``url`` with its password replaced by ``***``."""
    return _PASSWORD.sub(r"\1***\3", url)


def mask_text(text: str) -> str:
    """Mask every AMQP URL password that appears inside ``text``."""
    return _PASSWORD.sub(r"\1***\3", text)


def default_max_message_bytes(server_properties: Mapping[str, Any] | None) -> int:
    """The default ``max_message_size`` of the broker that sent these ``connection.start``
    properties: 16 MiB from RabbitMQ 4.0 on, 128 MiB before (and for unknown brokers)."""
    props = server_properties or {}
    product, version = props.get("product", b""), props.get("version", b"")
    product = product.decode(errors="replace") if isinstance(product, bytes) else str(product)
    version = version.decode(errors="replace") if isinstance(version, bytes) else str(version)
    major = re.match(r"\s*(\d+)\.", version)
    if "rabbitmq" in product.lower() and major and int(major.group(1)) >= 4:
        return RABBITMQ4_MAX_MESSAGE_BYTES
    return RABBITMQ3_MAX_MESSAGE_BYTES


def format_bytes(n: int) -> str:
    """``n`` bytes for a human: ``"160.0 MiB (167772160 bytes)"``."""
    if n >= MiB:
        return f"{n / MiB:.1f} MiB ({n} bytes)"
    return f"{n} bytes"


@dataclass(frozen=True)
class BrokerSettings:
    """How to reach RabbitMQ. Build with :meth:`from_url`."""

    url: str = DEFAULT_AMQP_URL
    heartbeat_s: int = 30
    blocked_connection_timeout_s: float = 60.0
    connect_timeout_s: float = 5.0
    reconnect_initial_s: float = 1.0
    reconnect_max_s: float = 30.0
    #: the largest body the client sends; None: the broker's default for its version
    max_message_bytes: int | None = None
    #: how long a publish waits for the broker's confirm unless told otherwise
    confirm_timeout_s: float = 120.0
    #: how long a reconnect keeps retrying refusals that may be left over from our previous
    #: connection (an exclusive queue or consumer the broker has not released yet, a login
    #: refused while the broker restarts) before it gives up
    refused_retry_s: float = 90.0

    #: TLS (``amqps://``): CA bundle to verify the broker with (None: the system's CAs)
    tls_ca: str | None = None
    #: TLS client certificate and its key (PEM), for brokers that ask for one or EXTERNAL auth
    tls_cert: str | None = None
    tls_key: str | None = None
    #: check that the broker's certificate names the host of the URL (on unless told)
    tls_verify_hostname: bool = True
    #: log in with the client certificate (SASL EXTERNAL) instead of the URL's password
    tls_external: bool = False

    def __post_init__(self) -> None:
        if self.max_message_bytes is not None and self.max_message_bytes <= 0:
            raise ConfigError(f"max_message_bytes must be > 0, got {self.max_message_bytes}")
        if self.confirm_timeout_s <= 0:
            raise ConfigError(f"confirm_timeout_s must be > 0, got {self.confirm_timeout_s}")

    @classmethod
    def from_url(cls, url: str, **overrides: Any) -> BrokerSettings:
        """Settings for ``url`` (one URL, or several comma-separated: one cluster's nodes)."""
        urls = split_urls(url)
        if not urls:
            raise ConfigError("the broker URL is empty")
        for one in urls:
            parts = urlsplit(one)
            if parts.scheme not in ("amqp", "amqps"):
                raise ConfigError(
                    f"broker URL {mask_url(one)!r} must start with amqp:// or amqps://"
                )
            if not parts.hostname:
                raise ConfigError(f"broker URL {mask_url(one)!r} has no host")
        who = {(urlsplit(one).username or "guest", urlsplit(one).path or "/") for one in urls}
        if len(who) > 1:
            raise ConfigError(
                f"the broker URLs {mask_url(url)!r} name different users or vhosts; the nodes of "
                "one cluster are reached as one user in one vhost"
            )
        if "max_message_bytes" not in overrides and os.environ.get(MAX_MESSAGE_BYTES_ENV):
            overrides["max_message_bytes"] = _env_bytes(MAX_MESSAGE_BYTES_ENV)
        for key, env in TLS_ENV.items():
            raw = os.environ.get(env, "").strip()
            if key not in overrides and raw:
                overrides[key] = _env_bool(env, raw) if key in ("tls_external", "tls_verify_hostname") else raw
        return replace(cls(url=url), **overrides)

    @property
    def urls(self) -> tuple[str, ...]:
        """Every broker address, in the order given."""
        return split_urls(self.url)

    @property
    def masked_url(self) -> str:
        return mask_url(self.url)

    @property
    def tls(self) -> bool:
        return any(urlsplit(one).scheme == "amqps" for one in self.urls)

    @property
    def identity(self) -> str | None:
        """The user name RabbitMQ knows us by, for ``user_id``: the URL's user; None when we
        log in with a certificate (EXTERNAL) and the URL names no user."""
        if self.tls_external and not urlsplit(self.urls[0]).username:
            return None
        return self.username

    @property
    def username(self) -> str:
        from urllib.parse import unquote

        return unquote(urlsplit(self.urls[0]).username or "guest")


def split_urls(url: str) -> tuple[str, ...]:
    """``"a, b,"`` -> ``("a", "b")``: the addresses of a comma-separated URL list."""
    return tuple(one.strip() for one in url.split(",") if one.strip())


def _env_bool(name: str, raw: str) -> bool:
    if raw.lower() in _TRUE:
        return True
    if raw.lower() in _FALSE:
        return False
    raise ConfigError(f"{name}={raw!r} must be true or false")


def _env_bytes(name: str) -> int:
    raw = os.environ[name].strip()
    try:
        value = int(raw)
    except ValueError:
        raise ConfigError(f"{name}={raw!r} is not a whole number of bytes") from None
    if value <= 0:
        raise ConfigError(f"{name}={raw!r} must be > 0")
    return value
