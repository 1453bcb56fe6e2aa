"""--require-user-id decisions (pure)."""

from __future__ import annotations

from fedmq.aggregator.identity import IdentityBook


def test_an_update_without_user_id_is_refused() -> None:
    book = IdentityBook()
    assert "no broker-validated user_id" in (IdentityBook.unsigned(None) or "")
    assert "no broker-validated user_id" in (book.refuse("w1", None) or "")
    assert book.bound == {}


def test_a_worker_id_belongs_to_the_first_user_that_used_it() -> None:
    book = IdentityBook()
    assert book.refuse("w1", "alice") is None
    assert book.refuse("w2", "bob") is None
    assert book.refuse("w1", "alice") is None
    reason = book.refuse("w1", "bob")
    assert reason is not None and "'w1' belongs to broker user 'alice'" in reason and "'bob'" in reason
    # the binding is kept in the checkpoint
    again = IdentityBook(book.to_meta())
    assert again.refuse("w1", "bob") is not None and again.refuse("w1", "alice") is None
