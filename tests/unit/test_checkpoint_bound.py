"""The checkpoint's cost does not grow with the run: no history list in it, and a settled-task
set bounded by what an update can still claim (an update for an id dropped from it is never
applied). Pure core and files, no broker; the Driver and helpers come from test_core.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from fedmq.aggregator import taskids
from fedmq.aggregator.core import RunState, Settle
from fedmq.aggregator.history import HISTORY_TAIL, History
from fedmq.rundir import complete_history, history_len, read_history
from tests.unit.test_core import (
    Driver,
    checkpoint,
    config,
    coordinator,
    failure,
    fates,
    of,
    restore,
    tasks,
    update,
)

MEMORY = 8


def async_driver(**kw: Any) -> Driver:
    cfg = config(mode="async", strategy="fedasync", concurrency=2, max_updates=100_000, issued_memory=MEMORY, **kw)
    run = Driver(coordinator(cfg))
    run.start(0.0)
    run.hello("w0", 0.0)
    return run


def apply_async(run: Driver, first: int, last: int, t0: float) -> None:
    """Answer tasks ``first``..``last`` (issued two ahead, concurrency 2), each applied."""
    for i in range(first, last + 1):
        now = t0 + i * 1e-3
        run.hello("w0", now)  # stays live
        got = run.send(update(f"a{i:06d}-t", base=run.core.state.version), now)
        assert fates(got) == ["applied"], (i, got)


def meta_size(run: Driver, now: float) -> int:
    return len(json.dumps(checkpoint(run.core, now)[0]))


def test_async_checkpoint_meta_does_not_grow_with_versions_and_tasks() -> None:
    run = async_driver()
    apply_async(run, 1, 100, 1.0)
    early = checkpoint(run.core, 2.0)[0]
    apply_async(run, 101, 2000, 2.0)
    late = checkpoint(run.core, 10.0)[0]
    assert late["version"] == 2000 and late["evaluations"] == 2000
    assert "history" not in late and late["last_evaluated"]["version"] == 2000
    # the settled set: only ids still issued (the last MEMORY + outstanding)
    state = RunState.from_meta(late, 10.0)
    assert len(state.applied_tasks) <= MEMORY + 2 and len(state.issued) <= MEMORY + 2
    assert len(late["issued_runs"]) <= 3 and late["applied_runs"] == []  # consecutive ids: runs
    # the same size after 100 or 2,000 versions, but for the longer numbers in it
    assert len(json.dumps(late)) <= len(json.dumps(early)) + 200


def test_sync_checkpoint_meta_does_not_grow_with_rounds() -> None:
    cfg = config(mode="sync", rounds=10_000, workers_per_round=2, min_workers=2)
    run = Driver(coordinator(cfg))
    run.start(0.0)
    sizes = {}
    for r in range(1, 301):
        now = float(r)
        run.hello("w0", now)
        run.hello("w1", now)
        for slot, w in enumerate(("w0", "w1")):
            run.send(update(f"r{r:05d}-{slot:03d}", w, base=r - 1, round_=r), now + 0.1 * (slot + 1))
        if r in (10, 300):
            sizes[r] = meta_size(run, now + 0.5)
    assert run.core.state.round == 300
    meta = checkpoint(run.core, 400.0)[0]
    assert RunState.from_meta(meta, 0.0).applied_tasks == {"r00300-000", "r00300-001"}  # the last closed round only
    assert sizes[300] <= sizes[10] + 200


def test_an_update_for_an_expired_applied_id_is_rejected_not_applied() -> None:
    run = async_driver()
    apply_async(run, 1, 40, 1.0)
    saved = checkpoint(run.core, 2.0)
    assert "a000001-t" not in RunState.from_meta(saved[0], 0.0).applied_tasks  # dropped: older than the issued memory
    st = run.core.state
    before = (st.version, st.counts["applied"])
    got = run.send(update("a000001-t", base=0), 3.0, redelivered=True)  # a redelivered copy
    assert fates(got) == ["rejected"]
    assert "issued too long ago" in str(of(Settle, got)[0].reason)
    assert (st.version, st.counts["applied"]) == before
    # its failure report likewise counts for nothing
    got = run.send(failure("a000002-t"), 3.1)
    assert fates(got) == ["rejected"]
    # and after a crash and --resume the same
    resumed = Driver(restore(run.core.config, saved, 100.0))
    resumed.start(100.0)
    resumed.hello("w0", 100.0)
    got = resumed.send(update("a000001-t", base=0), 101.0, redelivered=True)
    assert fates(got) == ["rejected"] and resumed.core.state.counts["applied"] == 40


def test_ids_a_crashed_incarnation_issued_after_its_checkpoint_are_never_applied_twice() -> None:
    """The predecessor's window (ids above its checkpoint's task_seq) is recognised after the
    resume; an id of it applied then stays settled however many tasks follow."""
    run = async_driver()
    apply_async(run, 1, 5, 1.0)
    saved = checkpoint(run.core, 2.0)  # task_seq 7: a6, a7 outstanding
    apply_async(run, 6, 6, 2.0)  # a8 goes out, then the aggregator dies
    assert "a000008-t" in run.core.state.outstanding
    cfg = run.core.config
    meta, strategy_meta, strategy_arrays, params = saved
    from fedmq.aggregator.policy import make_policy
    from fedmq.aggregator.strategies import make_strategy

    strategy = make_strategy(cfg.strategy_name)
    strategy.restore(strategy_meta, strategy_arrays)
    from fedmq.aggregator.core import Coordinator

    resumed = Driver(Coordinator.from_meta(meta, config=cfg, strategy=strategy, policy=make_policy(cfg),
                                           params=params, now=100.0, incarnation="u"))
    resumed.start(100.0)
    resumed.hello("w0", 100.0)
    assert fates(resumed.send(update("a000008-t", base=5), 101.0)) == ["applied"]  # the dead one's task
    for i in range(1, 60):  # many more of the resumed incarnation's own tasks
        now = 101.0 + i * 1e-3
        resumed.hello("w0", now)
        [task, *_] = sorted(resumed.core.state.outstanding)
        assert fates(resumed.send(update(task, base=resumed.core.state.version), now)) == ["applied"]
    again = checkpoint(resumed.core, 200.0)[0]
    kept = RunState.from_meta(again, 0.0).applied_tasks
    assert "a000008-t" in kept  # still claimable through the window: kept
    applied = resumed.core.state.counts["applied"]
    got = resumed.send(update("a000008-t", base=5), 201.0, redelivered=True)
    assert fates(got) == ["duplicate"] and resumed.core.state.counts["applied"] == applied
    assert len(kept) <= MEMORY + 2 + 1


def test_sync_update_of_a_forgotten_round_is_stale() -> None:
    cfg = config(mode="sync", rounds=100, workers_per_round=1, min_workers=1)
    run = Driver(coordinator(cfg))
    run.start(0.0)
    for r in range(1, 6):
        run.hello("w0", float(r))
        run.send(update(f"r{r:05d}-000", "w0", base=r - 1, round_=r), r + 0.5)
    checkpoint(run.core, 10.0)  # forgets rounds 1..4
    assert run.core.state.applied_tasks == {"r00005-000"}
    got = run.send(update("r00001-000", "w0", base=0, round_=1), 11.0, redelivered=True)
    assert fates(got) == ["stale"] and run.core.state.counts["applied"] == 5
    assert fates(run.send(update("r00005-000", "w0", base=4, round_=5), 11.1)) == ["duplicate"]
    assert tasks(run.tick(11.2)) == []


def test_a_checkpoint_with_the_whole_history_is_still_read() -> None:
    run = async_driver()
    apply_async(run, 1, 3, 1.0)
    meta, *rest = checkpoint(run.core, 2.0)
    legacy = {k: v for k, v in meta.items() if k not in ("last_evaluated", "evaluations", "history_offset")}
    legacy["history"] = run.history
    resumed = restore(run.core.config, (legacy, *rest), 10.0)
    assert resumed.state.legacy_history == run.history
    assert resumed.state.last_evaluated == run.history[-1] and resumed.state.evaluations == 3


# ---------------------------------------------------------------------- history.jsonl and its readers
def entry(v: int) -> dict[str, Any]:
    return {"version": v, "accuracy": v / 1000, "loss": 1.0, "time_s": float(v), "updates_applied": v}


def test_history_is_cut_back_to_the_checkpoint_on_resume(tmp_path: Path) -> None:
    h = History(tmp_path)
    for v in range(1, 4):
        h.record(entry(v))
    offset = h.commit()
    h.record(entry(4))  # after the checkpoint, then a crash
    h.commit()
    h.close()
    again = History(tmp_path, truncate_to=offset)
    again.record(entry(4))  # made again by the resumed run
    again.commit()
    assert [e["version"] for e in again.entries(full=True)] == [1, 2, 3, 4]
    assert [e["version"] for e in again.entries(full=False)] == [1, 2, 3, 4]
    again.close()
    fresh = History(tmp_path)  # a new run starts it empty
    assert fresh.entries(full=True) == []
    fresh.close()
    legacy = History(tmp_path, truncate_to=123, legacy=[entry(1), entry(2)])
    legacy.commit()
    assert [e["version"] for e in legacy.entries(full=True)] == [1, 2]
    legacy.close()


def test_history_tail_is_bounded(tmp_path: Path) -> None:
    h = History(tmp_path)
    for v in range(1, HISTORY_TAIL + 50):
        h.record(entry(v))
    h.commit()
    assert len(h.entries(full=False)) == HISTORY_TAIL and h.entries(full=False)[-1]["version"] == HISTORY_TAIL + 49
    h.close()


def test_readers_complete_a_running_history_from_history_jsonl(tmp_path: Path) -> None:
    (tmp_path / "history.jsonl").write_text("".join(json.dumps(entry(v)) + "\n" for v in range(1, 151))
                                            + '{"version": 151, "acc')  # a line being written
    doc = {"history": [entry(v) for v in range(51, 151)], "history_complete": False, "evaluations": 150,
           "history_log": "history.jsonl", "final": {"version": 150}}
    (tmp_path / "history.json").write_text(json.dumps(doc))
    assert [e["version"] for e in read_history(tmp_path)["history"]] == list(range(1, 151))
    assert history_len(tmp_path) == 150
    done = {**doc, "history_complete": True}
    assert complete_history(tmp_path, done) is done
    from fedmq.status import collect

    assert collect(tmp_path, broker=False)["evaluations"] == 150


def test_task_id_runs_round_trip_in_order() -> None:
    issued = {"a1234567": "open", "a00000x-t": "open", "a000001-": "open", "a000002-t-2": "open", "a000005-t": "open", "a000006-t": "open", "a000007-t": "failed", "a000008-t": "open",
              "a000003-u": "open", "a999999-t": "open", "a1000000-t": "open", "r00001-000": "open", "odd": "failed"}
    runs = taskids.pack(issued)
    assert list(taskids.unpack(json.loads(json.dumps(runs))).items()) == list(issued.items())
    assert len(runs) == 12
    many = {f"a{i:06d}-t": "open" for i in range(1, 5000)}
    assert taskids.pack(many) == [["t", 1, 4999, "open", 6]]
    applied = {f"a{i:06d}-t" for i in (1, 2, 3, 7)} | {"r00002:w1"}
    assert taskids.unpack_set(taskids.pack_set(applied)) == applied
    marked = taskids.unpack_marked(json.loads(json.dumps(taskids.pack_marked(issued, {"a000006-t", "odd"}))))
    assert list(marked[0].items()) == list(issued.items()) and marked[1] == {"a000006-t", "odd"}


def test_a_checkpoint_packs_ids_it_packed_before_without_parsing_them_again() -> None:
    """Every checkpoint of an async run packs the same --issued-memory ids (4,096) again: parsing
    each one every time was 90 % of ``to_meta`` (3.7 of 4.1 s over a 3,000-update run)."""
    issued = {f"a{i:06d}-q1w2e3": "open" for i in range(1, 4097)}
    applied = {f"a{i:06d}-q1w2e3" for i in range(1, 4085)}
    first = taskids.pack_marked(issued, applied)
    before = taskids._parse.cache_info()
    issued[f"a{4097:06d}-q1w2e3"] = "open"  # the next checkpoint: one id more, one applied more
    applied.add(f"a{4085:06d}-q1w2e3")
    again = taskids.pack_marked(issued, applied)
    after = taskids._parse.cache_info()
    assert after.misses - before.misses == 1 and after.hits - before.hits == 4096
    assert first == [["q1w2e3", 1, 4084, "open/applied", 6], ["q1w2e3", 4085, 4096, "open", 6]]
    assert again == [["q1w2e3", 1, 4085, "open/applied", 6], ["q1w2e3", 4086, 4097, "open", 6]]
