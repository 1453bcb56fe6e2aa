"""Chaos by hand: SIGKILL the aggregator and --resume it, restart the broker, reach the target.

Runs an asynchronous FedBuff federation (4 worker processes) on a private RabbitMQ node it
starts itself, injects both faults, and checks the ledger afterwards.

    python scripts/chaos_demo.py [WORK_DIR]
"""

from __future__ import annotations

import json
import shutil
import sys
import time
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fedmq.broker.provision import PrivateNode  # noqa: E402
from tests.helpers import (  # noqa: E402
    Procs,
    assert_ledger_invariant,
    confirmed_updates,
    history_len,
    read_history,
    read_ledger,
    split,
    wait_for,
)


def main(base: Path) -> int:
    run = base / "run"
    for path in (run, base / "logs"):
        shutil.rmtree(path, ignore_errors=True)
    shards = split(base / "shards", 4)
    node = PrivateNode().start()
    procs = Procs(base / "logs")
    common = ["--amqp-url", node.url, "--namespace", "chaos"]
    agg = ["aggregator", "--test-data", str(shards / "test.npz"), "--out", str(run), "--mode", "async",
           "--strategy", "fedbuff", "--buffer-size", "2", "--min-workers", "4", "--target-accuracy", "0.95",
           "--checkpoint-every", "4", *common]
    t0 = time.time()

    def say(what: str) -> None:
        print(f"t={time.time() - t0:5.1f}s  {what}", flush=True)

    try:
        procs.start("agg", *agg)
        for i in range(4):
            procs.start(f"w{i}", "worker", "--data", str(shards / f"worker-{i}.npz"), "--worker-id", f"w{i}",
                        "--slowdown", "20", "--log-format", "json", *common)
        wait_for(lambda: history_len(run) >= 3, 60, "3 versions")
        say(f"version {read_history(run)['final']['version']}: SIGKILL the aggregator, start it with --resume")
        procs.kill("agg")
        procs.start("agg2", *agg, "--resume")
        wait_for(lambda: "resumed from checkpoint" in procs.log("agg2"), 30, "the resume")
        say(next(line for line in procs.log("agg2").splitlines() if "resumed" in line).split(": ", 1)[1])
        wait_for(lambda: history_len(run) >= 6, 60, "6 versions")
        say(f"version {read_history(run)['final']['version']}: stopping the broker")
        node.stop()
        say("broker stopped; starting it again")
        node.start()
        say("broker up")
        code = procs.wait("agg2", 180)
        codes = [procs.wait(f"w{i}", 60) for i in range(4)]
        say(f"aggregator exit {code}, worker exits {codes}")
        print("final:", json.dumps(read_history(run)["final"]))
        ledger = read_ledger(run)
        applied = Counter(e["task_id"] for e in ledger if e["fate"] == "applied")
        print(f"updates.jsonl: {len(ledger)} lines, fates {dict(Counter(e['fate'] for e in ledger))}, "
              f"most applications of one task id: {max(applied.values())}")
        confirmed = [c for i in range(4) for c in confirmed_updates(procs.log(f"w{i}"))]
        assert_ledger_invariant(run, confirmed)
        print(f"ledger invariant holds for {len(confirmed)} confirmed updates; "
              f"reconnections: {sum(procs.log(n).count('reconnected') for n in procs.procs)}")
        return 0 if code == 0 and not any(codes) else 1
    finally:
        procs.close()
        node.remove()


if __name__ == "__main__":
    sys.exit(main(Path(sys.argv[1] if len(sys.argv) > 1 else "/tmp/fedmq-chaos")))
