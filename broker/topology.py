"""The RabbitMQ topology of one federation, every name prefixed by its namespace.

=====================  ======================================================================
``<ns>.models``        stream: every model version, newest last; late joiners read from ``last``
``<ns>.presence``      stream: hello / heartbeat / bye from workers (read by status and aggregator)
``<ns>.tasks``         quorum queue, delivery limit, dead-lettered to ``<ns>.tasks.dlq``
``<ns>.updates``       quorum queue, single active consumer, dead-lettered to ``<ns>.updates.dlq``
``<ns>.dlx``           direct exchange feeding the two dead-letter queues
``<ns>.control``       fanout exchange: stop messages to every worker
``<ns>.lock``          quorum queue, single active consumer: the active aggregator holds its token
                       unacked, standbys wait (:mod:`fedmq.broker.lock`)
=====================  ======================================================================

Everything that processes share is replicated on a RabbitMQ cluster (quorum queues and
streams), so a federation survives the loss of any one node of three. Declaring is idempotent; see the handbook (GUIDE.md §2) for the measured behaviour behind it.

A model version on ``<ns>.models`` carries the headers :data:`VERSION_HEADER` (its version,
an int) and :data:`RUN_HEADER` (its run id, a str), so that a worker can index the stream
without decoding every version; a message without them is decoded to learn both.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from fedmq.shared.errors import ConfigError

#: header of a model message: its version (int)
VERSION_HEADER = "x-fedmq-version"
#: header of a model message: its run id (str, docs/protocol.md)
RUN_HEADER = "x-fedmq-run"
#: consumer argument: how long (ms) the broker lets the consumer hold a delivery unacked before it
#: closes the channel; honoured by RabbitMQ 3.12+ and 4.x, ignored by older brokers (which only
#: have the node-wide ``consumer_timeout``, 30 min by default). Set per consumer, not per queue,
#: so that namespaces declared before keep their arguments.
CONSUMER_TIMEOUT_ARG = "x-consumer-timeout"

_VALID_NS = set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_.")


@dataclass(frozen=True)
class Topology:
    """Names and arguments of every entity of a namespace."""

    namespace: str = "fedmq"
    task_delivery_limit: int = 3
    update_delivery_limit: int = 10
    models_max_bytes: int = 2 * 1024**3
    models_segment_bytes: int = 64 * 1024**2
    models_max_age: str = "6h"
    presence_max_age: str = "1h"

    def __post_init__(self) -> None:
        if not self.namespace or not set(self.namespace) <= _VALID_NS:
            raise ConfigError(
                f"namespace {self.namespace!r} may only hold letters, digits, '-', '_' and '.'"
            )

    # names -----------------------------------------------------------------------------
    @property
    def models(self) -> str:
        return f"{self.namespace}.models"

    @property
    def presence(self) -> str:
        return f"{self.namespace}.presence"

    @property
    def tasks(self) -> str:
        return f"{self.namespace}.tasks"

    @property
    def updates(self) -> str:
        return f"{self.namespace}.updates"

    @property
    def dlx(self) -> str:
        return f"{self.namespace}.dlx"

    @property
    def tasks_dlq(self) -> str:
        return f"{self.namespace}.tasks.dlq"

    @property
    def updates_dlq(self) -> str:
        return f"{self.namespace}.updates.dlq"

    @property
    def control(self) -> str:
        return f"{self.namespace}.control"

    @property
    def lock(self) -> str:
        return f"{self.namespace}.lock"

    @property
    def queues(self) -> tuple[str, ...]:
        return (
            self.lock,
            self.models,
            self.presence,
            self.tasks,
            self.updates,
            self.tasks_dlq,
            self.updates_dlq,
        )

    @property
    def dead_letter_queues(self) -> dict[str, str]:
        """Work queue -> its dead-letter queue."""
        return {self.tasks: self.tasks_dlq, self.updates: self.updates_dlq}

    # arguments -------------------------------------------------------------------------
    def _work_queue_args(self, dl_key: str, delivery_limit: int) -> dict[str, Any]:
        return {
            "x-queue-type": "quorum",
            "x-delivery-limit": delivery_limit,
            "x-dead-letter-exchange": self.dlx,
            "x-dead-letter-routing-key": dl_key,
            "x-dead-letter-strategy": "at-least-once",
            "x-overflow": "reject-publish",
        }

    def declarations(self) -> list[tuple[str, dict[str, Any]]]:
        """(queue name, arguments) for every durable queue, in declaration order."""
        stream = {"x-queue-type": "stream"}
        return [
            (self.lock, {"x-queue-type": "quorum", "x-single-active-consumer": True}),
            (
                self.models,
                {
                    **stream,
                    "x-max-age": self.models_max_age,
                    "x-max-length-bytes": self.models_max_bytes,
                    "x-stream-max-segment-size-bytes": self.models_segment_bytes,
                },
            ),
            (
                self.presence,
                {
                    **stream,
                    "x-max-age": self.presence_max_age,
                    "x-stream-max-segment-size-bytes": 4 * 1024**2,
                },
            ),
            (self.tasks, self._work_queue_args("tasks", self.task_delivery_limit)),
            (
                self.updates,
                {
                    **self._work_queue_args("updates", self.update_delivery_limit),
                    "x-single-active-consumer": True,
                },
            ),
            (self.tasks_dlq, {"x-queue-type": "quorum"}),
            (self.updates_dlq, {"x-queue-type": "quorum"}),
        ]

    def declare(self, channel: Any) -> None:
        """Declare every exchange, queue and binding on a pika channel (idempotent)."""
        channel.exchange_declare(self.dlx, exchange_type="direct", durable=True)
        channel.exchange_declare(self.control, exchange_type="fanout", durable=True)
        for name, args in self.declarations():
            channel.queue_declare(name, durable=True, arguments=args)
        channel.queue_bind(self.tasks_dlq, self.dlx, routing_key="tasks")
        channel.queue_bind(self.updates_dlq, self.dlx, routing_key="updates")
