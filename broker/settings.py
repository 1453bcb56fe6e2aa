"""Broker connection settings, built from an AMQP URL, and password masking.

Every log line and error that mentions a broker goes through :func:`mask_url`, so a
password never reaches a terminal, a log file or ``history.json``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace
from urllib.parse import urlsplit

from fedmq.shared.errors import ConfigError

DEFAULT_AMQP_URL = "amqp://guest:guest@localhost:5672/"
DEFAULT_NAMESPACE = "fedmq"

_PASSWORD = re.compile(r"(amqps?://[^:/@]*:)([^@]*)(@)")


def mask_url(url: str) -> str:
    """Return ``url`` with its password replaced by ``***``."""
    return _PASSWORD.sub(r"\1***\3", url)


def mask_text(text: str) -> str:
    """Mask every AMQP URL password that appears inside ``text``."""
    return _PASSWORD.sub(r"\1***\3", text)


@dataclass(frozen=True)
class BrokerSettings:
    """How to reach RabbitMQ. Build with :meth:`from_url`."""

    url: str = DEFAULT_AMQP_URL
    heartbeat_s: int = 30
    blocked_connection_timeout_s: float = 60.0
    connect_timeout_s: float = 5.0
    reconnect_initial_s: float = 1.0
    reconnect_max_s: float = 30.0

    @classmethod
    def from_url(cls, url: str, **overrides: float) -> BrokerSettings:
        parts = urlsplit(url)
        if parts.scheme not in ("amqp", "amqps"):
            raise ConfigError(
                f"broker URL {mask_url(url)!r} must start with amqp:// or amqps://"
            )
        if not parts.hostname:
            raise ConfigError(f"broker URL {mask_url(url)!r} has no host")
        return replace(cls(url=url), **overrides)  # type: ignore[arg-type]

    @property
    def masked_url(self) -> str:
        return mask_url(self.url)

    @property
    def username(self) -> str:
        from urllib.parse import unquote

        return unquote(urlsplit(self.url).username or "guest")
