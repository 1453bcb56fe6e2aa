"""Version numbers across restarts (fedmq.aggregator.versions), without a broker: the digest, the
history entries a resumed aggregator finds past its checkpoint, and the numbering rule, alone and
in the coordinator."""

from __future__ import annotations

import json

import numpy as np

from fedmq.aggregator import versions
from fedmq.aggregator.core import Evaluate
from tests.unit.test_core import (
    SHAPES,
    Driver,
    checkpoint,
    config,
    coordinator,
    model,
    of,
    restore,
    update,
)


def test_the_digest_tells_parameters_apart_and_not_their_order() -> None:
    a = {"w": np.arange(6, dtype=np.float32).reshape(2, 3), "b": np.zeros(3, np.float32)}
    assert versions.params_digest(a) == versions.params_digest(dict(reversed(list(a.items()))))
    assert len(versions.params_digest(a)) == 8
    changed = {**a, "b": np.array([0, 0, np.float32(1e-30)], np.float32)}
    assert versions.params_digest(changed) != versions.params_digest(a)
    assert versions.params_digest({"w": a["w"].reshape(3, 2), "b": a["b"]}) != versions.params_digest(a)
    assert versions.params_digest({"w": a["w"].T.copy().T, "b": a["b"]}) == versions.params_digest(a)


def test_entries_past_the_checkpoint_are_complete_lines_only() -> None:
    tail = (json.dumps({"version": 4, "params_crc32": "0000abcd"}) + "\n" + "not json\n"
            + json.dumps({"version": 5}) + "\n" + '{"version": 6, "par').encode()
    entries = versions.entries_in(tail)
    assert [e["version"] for e in entries] == [4, 5]
    # an entry without a digest is an async version's: made again under its number, as before
    assert versions.lost_versions(entries, 3) == {4: "0000abcd"}
    assert versions.lost_versions(entries, 4) == {}
    assert versions.entries_in(b"") == []


def test_a_lost_number_is_kept_only_for_the_same_parameters() -> None:
    assert versions.renumber(4, None, {}) == (4, {})
    assert versions.renumber(4, "aa", {4: "aa", 5: "bb"}) == (4, {5: "bb"})
    assert versions.renumber(5, "bb", {5: "bb"}) == (5, {})
    assert versions.renumber(4, "ab", {4: "aa", 5: "bb"}) == (6, {})
    assert versions.renumber(4, "aa", {4: None}) == (5, {})  # a digest not known: never the same
    assert versions.renumber(7, "aa", {4: "aa"}) == (7, {})


def _round_one(run: Driver, a: float, b: float, now: float) -> list:
    run.send(update("r00001-000", "w0", round_=1, value=a), now)
    return run.send(update("r00001-001", "w1", round_=1, value=b), now + 0.1)


def _two_workers(run: Driver, now: float) -> Driver:
    run.start(now)
    run.hello("w0", now)
    run.hello("w1", now)
    return run


def test_a_resumed_sync_round_keeps_its_number_only_if_it_makes_the_lost_versions_parameters() -> None:
    cfg = config(mode="sync", rounds=3, workers_per_round=2, min_workers=2, seed=3)
    run = _two_workers(Driver(coordinator(cfg)), 0.0)
    saved = checkpoint(run.core, 0.5)  # before round 1 closes: its checkpoint never landed
    _round_one(run, 1.0, 2.0, 1.0)
    lost = run.history[0]
    assert lost["version"] == 1 and lost["params_crc32"] == versions.params_digest(run.core.params)

    def resumed() -> Driver:
        again = Driver(restore(cfg, saved, 50.0))
        again.core.lost = versions.lost_versions([lost], 0)
        return _two_workers(again, 50.0)

    # the same updates again: the same parameters, the same number
    same = resumed()
    got = _round_one(same, 1.0, 2.0, 51.0)
    assert [e.version for e in of(Evaluate, got)] == [1] and of(Evaluate, got)[0].renumbered_from is None
    assert same.history[0]["params_crc32"] == lost["params_crc32"] and same.core.lost == {}

    # other updates (say a worker's came too late this time): other parameters, the next number
    other = resumed()
    ev = of(Evaluate, _round_one(other, 1.0, 3.0, 51.0))[0]
    assert (ev.version, ev.renumbered_from) == (2, 1)
    assert [h["version"] for h in other.history] == [2] and other.history[0]["round"] == 1
    # round 2 is issued from version 2; an update trained from the lost version 1 is stale
    late = other.send(update("r00002-000", "w0", base=1, round_=2, value=9.0), 52.0)
    assert "stale" in [s.fate for s in late if hasattr(s, "fate")]
    for k in SHAPES:
        assert other.core.params[k].tobytes() != model()[k].tobytes()
