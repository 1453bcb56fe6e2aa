"""A test-only worker that SIGKILLs itself at a named point of handling a task.

    python -m tests.crashing_worker --crash-at update_confirmed --data SHARD --worker-id W \\
        --amqp-url URL --namespace NS [--log-format json]

(run from the repository root). The points are those of :meth:`fedmq.worker.service.Worker.at`:
``task_started``, ``half_published`` (half the chunks of a chunked update are confirmed) and
``update_confirmed`` (the broker confirmed the update, the ack is next).
Product code knows nothing of this: the crash lives in a subclass that overrides the hook.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys

from fedmq.broker.settings import BrokerSettings
from fedmq.broker.topology import Topology
from fedmq.shared.logs import setup_logging
from fedmq.worker.service import Worker, WorkerConfig


class CrashingWorker(Worker):
    """A :class:`Worker` killed (SIGKILL, no clean-up at all) when it reaches ``crash_at``."""

    crash_at = "update_confirmed"

    def at(self, point: str, task_id: str) -> None:
        if point == self.crash_at:
            os.kill(os.getpid(), signal.SIGKILL)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.crashing_worker", description=__doc__)
    parser.add_argument("--crash-at", required=True, choices=["task_started", "half_published", "update_confirmed"])
    parser.add_argument("--trainer", default=None)
    parser.add_argument("--chunk-bytes", type=int, default=None)
    parser.add_argument("--data", required=True)
    parser.add_argument("--worker-id", required=True)
    parser.add_argument("--amqp-url", required=True)
    parser.add_argument("--namespace", required=True)
    parser.add_argument("--log-format", default="json", choices=["json", "text"])
    args = parser.parse_args(argv)
    setup_logging("info", args.log_format)
    extra = {k: v for k, v in (("trainer", args.trainer), ("chunk_bytes", args.chunk_bytes)) if v is not None}
    worker = CrashingWorker(WorkerConfig(data=args.data, worker_id=args.worker_id, **extra),
                            BrokerSettings.from_url(args.amqp_url), Topology(args.namespace))
    worker.crash_at = args.crash_at
    signal.signal(signal.SIGTERM, lambda *_: worker.request_stop())
    return worker.run()


if __name__ == "__main__":
    sys.exit(main())
