"""The one error hierarchy of fedmq.

Every error a user can cause (bad bytes, bad files, bad options, an unreachable broker)
is a ``FedmqError`` whose message says what is wrong and, where possible, what to do.
Library errors (pika, msgpack, numpy) are translated at the module boundary that sees them.
"""

from __future__ import annotations


class FedmqError(Exception):
    """Root of every error fedmq raises on purpose."""


class DecodeError(FedmqError):
    """Bytes that are not a valid fedmq message (wrong schema, fields, dtypes, shapes, values, size)."""


class DataError(FedmqError):
    """A dataset, shard or partition request that cannot be honoured."""


class ConfigError(FedmqError):
    """An option, configuration file or plug-in reference that is invalid."""


class ValidationError(FedmqError):
    """A well-formed message whose content does not fit the model (shapes, version, values)."""


class BrokerError(FedmqError):
    """The broker cannot be reached, refused us, or dropped the connection."""


class TrainingError(FedmqError):
    """A trainer raised while fitting or evaluating."""
