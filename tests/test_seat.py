"""The takeover state machine: last writer wins, watchers never take the seat."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from serialmuxd.console import Seat


def test_new_attach_takes_over_and_names_previous() -> None:
    seat = Seat()
    assert seat.sit("a") is None
    assert seat.sit("b") == "a"
    assert seat.active == "b"


def test_watchers_never_hold_the_seat() -> None:
    seat = Seat()
    seat.sit("a")
    seat.watch("w")
    assert seat.active == "a"
    assert not seat.leave("w")
    assert seat.active == "a"


def test_leaving_holder_frees_seat_but_stale_leave_does_not() -> None:
    """A session that was taken over leaving later must not unseat the newcomer."""
    seat = Seat()
    seat.sit("a")
    seat.sit("b")
    assert not seat.leave("a")
    assert seat.active == "b"
    assert seat.leave("b")
    assert seat.active is None


@given(st.lists(st.tuples(st.sampled_from(["sit", "leave", "watch"]), st.integers(0, 5)), max_size=60))
def test_seat_matches_model(ops: list[tuple[str, int]]) -> None:
    """Against a model: the seat is held by the last sitter that has not left."""
    seat = Seat()
    model: str | None = None
    for op, i in ops:
        sid = f"s{i}"
        if op == "sit":
            prev = seat.sit(sid)
            assert prev == (model if model != sid else None)
            model = sid
        elif op == "leave":
            was = seat.leave(sid)
            assert was == (model == sid)
            if model == sid:
                model = None
        else:
            seat.watch(sid)
        assert seat.active == model
