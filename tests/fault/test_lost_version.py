"""A sync version published before its checkpoint landed: a resumed aggregator never gives its
number to other parameters (fedmq.aggregator.versions).

A sync aggregator publishes a round's new version while the checkpoint holding it is written on
another thread. Killed in between, it leaves the checkpoint of the round before, and the new
version's history entry (fsync'd before the publish) past the checkpoint's ``history_offset``.
The test kills a real aggregator mid-run, then makes its run directory hold exactly that: the
entry of the version after the checkpoint's, with a digest that is not the one the resumed
round will make (the lost aggregator averaged other updates), or with the one it will make.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from fedmq.aggregator import durable
from tests.conftest import delete_namespace, new_namespace
from tests.fault.test_faults import SYNC, WORKERS, all_confirmed, worker
from tests.helpers import Procs, assert_ledger_invariant, history_len, read_history, wait_for

pytestmark = [pytest.mark.broker, pytest.mark.fault, pytest.mark.slow]


def _run(amqp_url: str, shards: Path, procs: Procs, run: Path, prefix: str,
         lost_digest: str | None = None, ref: dict | None = None) -> int | None:
    """A sync run of 10 rounds; with ``ref`` (the reference run's history) the aggregator is
    killed after round 3, a lost version is put past its checkpoint, and the run resumed.
    Returns the number the lost version had (None without a kill)."""
    ns = new_namespace(prefix)
    common = ["--amqp-url", amqp_url, "--namespace", ns]
    agg_args = ["aggregator", "--test-data", str(shards / "test.npz"), "--out", str(run), *SYNC, *common]
    lost = None
    try:
        procs.start(f"{prefix}-agg", *agg_args)
        for i in range(WORKERS):
            worker(procs, shards, i, common, name=f"w{prefix}{i}")
        if ref is None:
            assert procs.wait(f"{prefix}-agg", 120) == 0, procs.dump()
            return None
        wait_for(lambda: history_len(run) >= 3, 60, "round 3")
        procs.kill(f"{prefix}-agg")
        meta, _ = durable.load_checkpoint(run)  # type: ignore[misc]
        state = meta["state"]
        lost = int(state["version"]) + 1
        digest = lost_digest or next(e["params_crc32"] for e in ref["history"] if e["version"] == lost)
        history = run / "history.jsonl"
        with open(history, "r+b") as f:  # as the kill would have left it inside the window
            f.truncate(int(state["history_offset"]))
            f.seek(0, 2)
            f.write(json.dumps({"version": lost, "round": lost, "accuracy": 0.5, "loss": 1.0,
                                "params_crc32": digest}).encode() + b"\n")
        procs.start(f"{prefix}-agg2", *agg_args, "--resume")
        assert procs.wait(f"{prefix}-agg2", 120) == 0, procs.dump()
        return lost
    finally:
        delete_namespace(amqp_url, ns)


def _same_model(a: Path, b: Path) -> bool:
    with np.load(a / "model.npz", allow_pickle=False) as x, np.load(b / "model.npz", allow_pickle=False) as y:
        return x.files == y.files and all(x[k].tobytes() == y[k].tobytes() for k in x.files)


def test_a_version_lost_with_its_checkpoint_is_never_renumbered_to_other_parameters(
        amqp_url: str, shards: Path, procs: Procs, tmp_path: Path) -> None:
    ref_dir = tmp_path / "ref"
    _run(amqp_url, shards, procs, ref_dir, "lvref")
    ref = read_history(ref_dir)
    assert [e["version"] for e in ref["history"]] == list(range(1, 11))
    assert all(len(e["params_crc32"]) == 8 for e in ref["history"])

    # the lost aggregator made other parameters for that version: the resumed one numbers its own past it
    other = tmp_path / "other"
    lost = _run(amqp_url, shards, procs, other, "lvoth", lost_digest="00000000", ref=ref)
    assert lost is not None
    hist = read_history(other)
    versions = [e["version"] for e in hist["history"]]
    assert lost not in versions and versions == [*range(1, lost), *range(lost + 1, 12)], versions
    assert [e["round"] for e in hist["history"]] == list(range(1, 11))
    assert hist["final"]["version"] == 11
    log = procs.log("lvoth-agg2")
    assert f"version {lost} is numbered {lost + 1}" in log, log[-3000:]
    # the same updates, in the same order: the same models, under other numbers
    assert [e["params_crc32"] for e in hist["history"]] == [e["params_crc32"] for e in ref["history"]]
    assert _same_model(ref_dir, other)
    assert_ledger_invariant(other, all_confirmed(procs, "wlvoth"))

    # it made the same parameters: the number stands
    same = tmp_path / "same"
    lost = _run(amqp_url, shards, procs, same, "lvsame", ref=ref)
    hist = read_history(same)
    assert [e["version"] for e in hist["history"]] == list(range(1, 11))
    assert "is numbered" not in procs.log("lvsame-agg2")
    assert _same_model(ref_dir, same)
    assert_ledger_invariant(same, all_confirmed(procs, "wlvsame"))
