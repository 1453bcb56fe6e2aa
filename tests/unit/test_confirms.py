"""The bookkeeping of publisher confirms in flight (fedmq.broker.confirms), without a broker."""

from __future__ import annotations

from dataclasses import dataclass

from fedmq.broker.confirms import BASIC_PUBLISH, InFlight


@dataclass(eq=False)
class Pub:
    exchange: str
    routing_key: str
    message_id: str | None = None

    def key(self) -> tuple[str, str, str | None]:
        return self.exchange, self.routing_key, self.message_id


def sent(*pubs: Pub) -> InFlight[Pub]:
    inflight: InFlight[Pub] = InFlight(Pub.key, lambda p: 1)
    for n, pub in enumerate(pubs, 1):
        assert inflight.sent(pub) == n  # delivery tags count from 1 in the order sent
    return inflight


def test_an_ack_settles_its_own_tag_and_a_multiple_ack_every_tag_up_to_it() -> None:
    a, b, c, d = (Pub("", f"q{i}") for i in range(4))
    inflight = sent(a, b, c, d)
    assert [s.publish for s in inflight.settle(2, multiple=False, acked=True)] == [b]
    assert [s.publish for s in inflight.settle(3, multiple=True, acked=True)] == [a, c]
    assert list(inflight) == [d]
    assert inflight.settle(3, multiple=False, acked=True) == []  # settled already: nothing
    (last,) = inflight.settle(4, multiple=False, acked=False)
    assert last.publish is d and not last.acked and not last.returned
    assert len(inflight) == 0


def test_a_return_belongs_to_the_oldest_unconfirmed_publish_with_its_target() -> None:
    a, b, c = Pub("", "tasks", "t1"), Pub("", "tasks", "t1"), Pub("", "other", "t1")
    inflight = sent(a, b, c)
    assert inflight.returned("", "tasks", "t1") is a
    assert inflight.returned("", "tasks", "t1") is b  # a was returned already: the next one
    assert inflight.returned("", "nowhere", "t1") is None
    settled = {s.publish.routing_key + str(id(s.publish) == id(a)): s.returned
               for s in inflight.settle(3, multiple=True, acked=True)}
    assert settled == {"tasksTrue": True, "tasksFalse": True, "otherFalse": False}


def test_a_return_is_matched_on_the_message_id_too() -> None:
    a, b = Pub("x", "k", "first"), Pub("x", "k", "second")
    inflight = sent(a, b)
    assert inflight.returned("x", "k", "second") is b
    out = {s.publish.message_id: s.returned for s in inflight.settle(2, multiple=True, acked=True)}
    assert out == {"first": False, "second": True}


def closed(inflight: InFlight[Pub], by: tuple[int, int]) -> InFlight[Pub]:
    inflight.closed_by = by
    return inflight


def test_a_close_caused_by_a_publish_names_the_only_one_in_flight_and_none_of_several() -> None:
    a, b = Pub("", "q"), Pub("", "q")
    assert closed(sent(a), BASIC_PUBLISH).culprit() is a
    assert closed(sent(a, b), BASIC_PUBLISH).culprit() is None  # which one? sent again one at a time
    assert closed(sent(a, b), BASIC_PUBLISH).refused_a_publish
    assert not closed(sent(), BASIC_PUBLISH).refused_a_publish


def test_a_close_caused_by_something_else_is_no_publishs_fault() -> None:
    a = Pub("", "q")
    basic_ack = (60, 80)  # e.g. 406 "unknown delivery tag": not the publish in flight
    assert closed(sent(a), basic_ack).culprit() is None and not closed(sent(a), basic_ack).refused_a_publish
    assert sent(a).culprit() is None  # not closed by the broker


def test_forget_and_take_all() -> None:
    a, b, c = Pub("", "a"), Pub("", "b"), Pub("", "c")
    inflight = sent(a, b, c)
    inflight.returned("", "b", None)
    inflight.forget(b)
    assert list(inflight) == [a, c]
    assert inflight.take_all() == [a, c] and len(inflight) == 0
    assert inflight.sent(Pub("", "d")) == 4  # tags go on counting on the same channel


def test_the_bytes_in_flight_are_counted_as_sent_and_as_settled() -> None:
    a, b, c = Pub("", "a"), Pub("", "b"), Pub("", "c")
    sizes = {id(a): 10, id(b): 200, id(c): 3000}
    inflight: InFlight[Pub] = InFlight(Pub.key, lambda p: sizes[id(p)])
    for p in (a, b, c):
        inflight.sent(p)
    assert inflight.bytes == 3210
    inflight.settle(1, multiple=False, acked=True)
    assert inflight.bytes == 3200
    inflight.forget(c)
    assert inflight.bytes == 200
    inflight.take_all()
    assert inflight.bytes == 0
