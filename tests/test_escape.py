"""The attach escape sequence (``Ctrl-]`` then a command), parsed without I/O."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from serialmuxd.escape import ESCAPE, Action, Break, Detach, EscapeParser, Help, Send

E = bytes([ESCAPE])


def merged(actions: list[Action]) -> list[Action]:
    """Adjacent Sends joined: how the actions look regardless of read boundaries."""
    out: list[Action] = []
    for a in actions:
        if isinstance(a, Send) and out and isinstance(out[-1], Send):
            out[-1] = Send(out[-1].data + a.data)
        elif not (isinstance(a, Send) and not a.data):
            out.append(a)
    return out


def feed_in_pieces(data: bytes, cuts: list[int]) -> list[Action]:
    p = EscapeParser()
    actions: list[Action] = []
    last = 0
    for c in [*sorted(set(cuts)), len(data)]:
        actions += p.feed(data[last:c])
        last = c
    return merged(actions)


def test_plain_keystrokes_pass_through_unchanged() -> None:
    """Typing without Ctrl-] sends exactly what was typed, in one chunk per read."""
    assert EscapeParser().feed(b"echo $((6*7))\r") == [Send(b"echo $((6*7))\r")]
    assert EscapeParser().feed(b"") == []


def test_ctrl_bracket_dot_detaches() -> None:
    """Ctrl-] . detaches; what was typed before it is still sent first."""
    assert EscapeParser().feed(b"ls\r" + E + b".") == [Send(b"ls\r"), Detach()]


def test_ctrl_bracket_b_sends_break_and_the_rest_goes_on() -> None:
    """Ctrl-] b is a BREAK, and the key after it (the SysRq command) goes to the guest."""
    assert EscapeParser().feed(E + b"bh") == [Break(), Send(b"h")]


def test_ctrl_bracket_question_mark_asks_for_help() -> None:
    assert EscapeParser().feed(E + b"?") == [Help()]


def test_double_ctrl_bracket_sends_one_literal() -> None:
    """Ctrl-] Ctrl-] sends a single 0x1d (for a guest program that wants it)."""
    assert EscapeParser().feed(b"a" + E + E + b"z") == [Send(b"a" + E + b"z")]


def test_unknown_command_sends_both_bytes() -> None:
    """A stray Ctrl-] followed by another key loses nothing: both bytes reach the guest."""
    assert EscapeParser().feed(E + b"x") == [Send(E + b"x")]
    assert EscapeParser().feed(E + b"B") == [Send(E + b"B")]


def test_escape_is_recognised_mid_line() -> None:
    """Like telnet (not ssh), the escape works anywhere, not only after a newline."""
    assert EscapeParser().feed(b"half a line" + E + b".") == [Send(b"half a line"), Detach()]


def test_sequence_split_across_reads() -> None:
    """A Ctrl-] at the end of one read and its command at the start of the next still count."""
    p = EscapeParser()
    assert p.feed(b"abc" + E) == [Send(b"abc")]
    assert p.pending
    assert p.feed(b".") == [Detach()]
    p = EscapeParser()
    assert p.feed(E) == []
    assert p.feed(E) == [Send(E)]
    assert not p.pending
    p = EscapeParser()
    assert p.feed(E) == []
    assert p.feed(b"b") == [Break()]


def test_input_after_detach_is_dropped() -> None:
    """Keys typed after Ctrl-] . never reach the guest, even in the same read."""
    p = EscapeParser()
    assert p.feed(E + b".rm -rf /\r") == [Detach()]
    assert p.feed(b"more") == []


def test_several_commands_in_one_read_keep_their_order() -> None:
    assert EscapeParser().feed(b"x" + E + b"?y" + E + b"bz" + E + b".") == [
        Send(b"x"),
        Help(),
        Send(b"y"),
        Break(),
        Send(b"z"),
        Detach(),
    ]


keys = st.lists(st.sampled_from([E, b".", b"b", b"?", b"x", b"\r", b"\x03", b"B"]), max_size=40).map(b"".join)


@given(keys, st.lists(st.integers(0, 40), max_size=10))
def test_read_boundaries_never_change_the_result(data: bytes, cuts: list[int]) -> None:
    """However the input is split into reads, the actions are the same."""
    cuts = [c for c in cuts if c <= len(data)]
    assert feed_in_pieces(data, cuts) == feed_in_pieces(data, [])


@given(keys)
def test_matches_a_byte_at_a_time_model(data: bytes) -> None:
    """Against a direct model of the rules, byte by byte."""
    expected: list[Action] = []
    pending = False
    for b in data:
        if pending:
            pending = False
            if b == ESCAPE:
                expected.append(Send(E))
            elif b == ord("."):
                expected.append(Detach())
                break
            elif b == ord("b"):
                expected.append(Break())
            elif b == ord("?"):
                expected.append(Help())
            else:
                expected.append(Send(E + bytes([b])))
        elif b == ESCAPE:
            pending = True
        else:
            expected.append(Send(bytes([b])))
    assert merged(EscapeParser().feed(data)) == merged(expected)
