"""The demo guest's shell and kernel (pure state machine, no I/O, no clock)."""

from __future__ import annotations

import re

import pytest

from serialmuxd.backends.demoshell import (
    BOOT_LINES,
    FEED_OUTPUT_LIMIT,
    MAX_LINE,
    MAX_REPEAT,
    MAX_TYPEAHEAD,
    PROMPT,
    STREAM_CHUNK,
    SYSRQ_WINDOW_S,
    Action,
    DemoShell,
)

T0 = 1_700_000_000.0  # 2023-11-14T22:13:20Z
BOOTED_AT = T0 + 2.0


def booted() -> DemoShell:
    sh = DemoShell()
    sh.boot_log(T0)
    sh.boot_done(BOOTED_AT)
    return sh


def run(sh: DemoShell, keys: bytes, now: float = BOOTED_AT, chunk: int = 1 << 20) -> bytes:
    """Type ``keys`` and collect everything the guest prints, lazy output included."""
    out = sh.feed(keys, now)
    while sh.pending:
        out += sh.read(chunk, now)
    return out


def command(sh: DemoShell, line: str) -> str:
    """Output of one command line, without its echo and the next prompt."""
    out = run(sh, line.encode() + b"\r")
    echo = line.encode() + b"\r\n"
    assert out.startswith(echo), out[:200]
    assert out.endswith(PROMPT), out[-200:]
    return out[len(echo) : -len(PROMPT)].decode()


# --- boot -------------------------------------------------------------------


def test_boot_log_prints_about_25_kernel_lines_a_banner_and_the_prompt() -> None:
    """Booting prints a kernel-like log with timestamps, the banner line, then `demo# `."""
    chunks = DemoShell().boot_log(T0)
    text = b"".join(c for _, c in chunks)
    assert text.startswith(b"[    0.000000] Linux version 6.1.0-demo ")
    assert b"\r\nserialmuxd demo guest\r\n" in text
    assert text.endswith(b"\r\n" + PROMPT)
    klines = re.findall(rb"^\[ *(\d+\.\d{6})\] ", text, re.M)
    assert 20 <= len(klines) <= 30
    stamps = [float(s) for s in klines]
    assert stamps == sorted(stamps)


def test_boot_log_delays_follow_the_kernel_timestamps() -> None:
    """The delays add up to a boot of about a second and never go negative."""
    chunks = DemoShell().boot_log(T0)
    delays = [d for d, _ in chunks]
    assert all(d >= 0 for d in delays)
    assert 0.8 <= sum(delays) <= 3.0
    assert sum(delays[: len(BOOT_LINES)]) == pytest.approx(BOOT_LINES[-1][0])


def test_input_during_boot_waits_until_the_prompt() -> None:
    """Keys typed while booting are typeahead: echoed and run once the shell is up."""
    sh = DemoShell()
    sh.boot_log(T0)
    assert sh.feed(b"echo early\r", T0 + 0.5) == b""
    assert not sh.pending
    sh.boot_done(BOOTED_AT)
    assert sh.pending
    assert sh.read(4096, BOOTED_AT) == b"echo early\r\nearly\r\n" + PROMPT


# --- line discipline ------------------------------------------------------------


def test_typed_printable_characters_are_echoed() -> None:
    """Each printable key is echoed as typed, nothing else."""
    sh = booted()
    assert sh.feed(b"ec", BOOTED_AT) == b"ec"
    assert sh.feed(b"ho \xc3\xa9", BOOTED_AT) == b"ho \xc3\xa9"


def test_backspace_and_del_erase_with_bs_space_bs() -> None:
    """Backspace (^H) and DEL both erase the last character visibly; a multibyte one whole."""
    sh = booted()
    assert sh.feed(b"echo ab\x7f", BOOTED_AT) == b"echo ab\x08 \x08"
    assert sh.feed(b"\x08c\xc3\xa9\x7f\r", BOOTED_AT) == b"\x08 \x08c\xc3\xa9\x08 \x08\r\nc\r\n" + PROMPT


def test_backspace_on_an_empty_line_prints_nothing() -> None:
    """Erasing past the prompt does not eat the prompt."""
    sh = booted()
    assert sh.feed(b"\x7f\x7f\x08", BOOTED_AT) == b""


def test_ctrl_c_prints_caret_c_and_a_new_prompt() -> None:
    """Ctrl-C abandons the line: `^C`, a new line, a fresh prompt; the line is not run."""
    sh = booted()
    assert sh.feed(b"echo no\x03", BOOTED_AT) == b"echo no^C\r\n" + PROMPT
    assert command(sh, "echo $?") == "130\r\n"


def test_ctrl_u_clears_the_line() -> None:
    """Ctrl-U erases the whole line on screen and in the buffer."""
    sh = booted()
    out = sh.feed(b"abc\x15", BOOTED_AT)
    assert out == b"abc" + b"\x08 \x08" * 3
    assert command(sh, "echo ok") == "ok\r\n"


def test_ctrl_w_erases_the_last_word() -> None:
    """Ctrl-W erases back to the previous word."""
    sh = booted()
    sh.feed(b"echo one two", BOOTED_AT)
    assert sh.feed(b"\x17", BOOTED_AT) == b"\x08 \x08" * 3
    assert run(sh, b"\r") == b"\r\none\r\n" + PROMPT  # the trailing blank is not a word


def test_cr_or_lf_executes_and_crlf_executes_once() -> None:
    """CR, LF and CR LF each run the line once (no extra empty prompt for CR LF or CR NUL)."""
    sh = booted()
    assert sh.feed(b"echo a\r", BOOTED_AT) == b"echo a\r\na\r\n" + PROMPT
    assert sh.feed(b"echo b\n", BOOTED_AT) == b"echo b\r\nb\r\n" + PROMPT
    assert sh.feed(b"echo c\r\n", BOOTED_AT) == b"echo c\r\nc\r\n" + PROMPT
    assert sh.feed(b"echo d\r\x00", BOOTED_AT) == b"echo d\r\nd\r\n" + PROMPT
    assert sh.feed(b"\r\r", BOOTED_AT) == (b"\r\n" + PROMPT) * 2


@pytest.mark.parametrize(
    "seq",
    [
        b"\x1b[A",  # arrow up
        b"\x1b[D",
        b"\x1bOA",  # arrow up in application cursor mode
        b"\x1b[24;80R",  # cursor position report (answer to ESC[6n)
        b"\x1b[?1;2c",  # device attributes reply
        b"\x1b[3~",  # Delete key
        b"\x1b[200~",  # bracketed paste start
        b"\x1b]11;rgb:0000/0000/0000\x07",  # OSC colour reply, BEL-terminated
        b"\x1b]10;rgb:ffff/ffff/ffff\x1b\\",  # OSC, ST-terminated
        b"\x1bx",  # Alt+x
    ],
)
def test_escape_sequences_from_the_terminal_are_ignored(seq: bytes) -> None:
    """Function keys and terminal replies are swallowed, never echoed as garbage."""
    sh = booted()
    assert sh.feed(b"echo a" + seq + b"b", BOOTED_AT) == b"echo ab"
    assert run(sh, b"\r") == b"\r\nab\r\n" + PROMPT


def test_escape_sequence_split_across_reads_is_ignored() -> None:
    """A cursor report cut in two by the transport is still swallowed."""
    sh = booted()
    assert sh.feed(b"x\x1b[12", BOOTED_AT) == b"x"
    assert sh.feed(b";40Ry", BOOTED_AT) == b"y"


def test_ctrl_c_inside_an_escape_sequence_still_interrupts() -> None:
    """A control key cuts a half-received escape sequence short and acts as itself."""
    sh = booted()
    assert sh.feed(b"abc\x1b[1\x03", BOOTED_AT) == b"abc^C\r\n" + PROMPT


def test_line_length_is_bounded() -> None:
    """A line stops growing at 4095 bytes; further keys ring the bell."""
    sh = booted()
    out = sh.feed(b"x" * (MAX_LINE + 10), BOOTED_AT)
    assert out == b"x" * MAX_LINE + b"\x07" * 10


# --- commands -------------------------------------------------------------------


def test_echo_arithmetic_prints_42() -> None:
    """`echo $((6*7))` prints 42."""
    sh = booted()
    assert run(sh, b"echo $((6*7))\r") == b"echo $((6*7))\r\n42\r\n" + PROMPT


@pytest.mark.parametrize(
    ("expr", "value"),
    [
        ("1+2*3", "7"),
        ("(1+2)*3", "9"),
        ("7/2", "3"),
        ("-7/2", "-3"),  # truncates toward zero, as C does
        ("-7%3", "-1"),
        ("2-3-4", "-5"),
        (" 10 - -2 ", "12"),
        ("0x10+010", "24"),
        ("9223372036854775807+1", "-9223372036854775808"),  # 64-bit wrap, as ash
        ("", "0"),
    ],
)
def test_echo_arithmetic_follows_shell_rules(expr: str, value: str) -> None:
    """$((…)) does + - * / % with precedence, parentheses and 64-bit integers."""
    assert command(booted(), f"echo $(({expr}))") == value + "\r\n"


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("echo $((1/0))", "sh: divide by zero"),
        ("echo $((1+))", "sh: arithmetic syntax error"),
        ("echo $((1+2)", "sh: syntax error: missing '))'"),
        ("echo $((" + "(" * 100 + "1" + ")" * 100 + "))", "sh: arithmetic syntax error: nested too deeply"),
    ],
)
def test_bad_arithmetic_prints_an_error_not_a_crash(line: str, message: str) -> None:
    """Arithmetic errors are shell errors with status 2."""
    sh = booted()
    assert command(sh, line) == message + "\r\n"
    assert command(sh, "echo $?") == "2\r\n"


def test_echo_quotes_and_variables() -> None:
    """Quotes group words, single quotes stop expansion, $HOME, $? and -n work."""
    sh = booted()
    assert command(sh, "echo \"a  b\" 'c $((1+1))' $HOME ${USER}") == "a  b c $((1+1)) /root root\r\n"
    assert command(sh, "echo -n x") == "x"


def test_true_false_and_status() -> None:
    """`true`/`false` set $?, and `;` runs commands in turn."""
    sh = booted()
    assert command(sh, "false; echo $?; true; echo $?") == "1\r\n0\r\n"


def test_unknown_command_prints_not_found() -> None:
    """An unknown command prints `sh: CMD: not found` and sets status 127."""
    sh = booted()
    assert command(sh, "frobnicate --now") == "sh: frobnicate: not found\r\n"
    assert command(sh, "echo $?") == "127\r\n"


def test_pipes_and_redirections_are_refused_with_a_reason() -> None:
    """The demo shell says plainly what it cannot do."""
    assert "not supported in the demo guest" in command(booted(), "echo hi > /tmp/x")


def test_help_lists_the_commands() -> None:
    """`help` names every command the guest knows."""
    text = command(booted(), "help")
    for name in ("echo", "uname", "dmesg", "yes", "seq", "date", "uptime", "hostname", "reboot", "poweroff"):
        assert name in text


def test_uname() -> None:
    """`uname` prints Linux; `-a` the full line with hostname, release and machine."""
    sh = booted()
    assert command(sh, "uname") == "Linux\r\n"
    assert command(sh, "uname -r") == "6.1.0-demo\r\n"
    full = command(sh, "uname -a")
    assert full.startswith("Linux demo 6.1.0-demo #1 ") and full.endswith(" x86_64 GNU/Linux\r\n")
    assert command(sh, "uname -z") == "uname: invalid option -- 'z'\r\n"


def test_hostname_date_uptime() -> None:
    """`hostname`, `date` (UTC, from the time given) and `uptime` (since boot) look like Linux."""
    sh = booted()
    assert command(sh, "hostname") == "demo\r\n"
    assert run(sh, b"date\r", T0) == b"date\r\nTue Nov 14 22:13:20 UTC 2023\r\n" + PROMPT
    out = run(sh, b"uptime\r", T0 + 3 * 3600 + 5 * 60 + 7).decode()
    assert (
        out == "uptime\r\n 01:18:27 up  3:05,  1 user,  load average: 0.00, 0.00, 0.00\r\n" + PROMPT.decode()
    )
    assert " up 2 min," in command_at(sh, "uptime", T0 + 150)


def command_at(sh: DemoShell, line: str, now: float) -> str:
    return run(sh, line.encode() + b"\r", now).decode()


def test_clear_clears_the_screen() -> None:
    """`clear` sends home + erase-display."""
    assert command(booted(), "clear") == "\x1b[H\x1b[2J"


def test_cat_etc_fstab_and_missing_file() -> None:
    """`cat /etc/fstab` shows a plausible fstab; a missing file says so."""
    sh = booted()
    fstab = command(sh, "cat /etc/fstab")
    assert "/etc/fstab" in fstab and " ext4 " in fstab and "errors=remount-ro" in fstab
    assert command(sh, "cat /nope") == "cat: /nope: No such file or directory\r\n"


def test_dmesg_reprints_the_boot_log() -> None:
    """`dmesg` prints the kernel lines of this boot, plus later kernel messages."""
    sh = booted()
    boot = b"".join(c for _, c in DemoShell().boot_log(T0)).decode()
    kernel_lines = [ln for ln in boot.split("\r\n") if ln.startswith("[")]
    text = command(sh, "dmesg")
    assert text.split("\r\n")[: len(kernel_lines)] == kernel_lines
    sh.nmi(BOOTED_AT)
    assert "Uhhuh. NMI received" in command(sh, "dmesg")


def test_exit_starts_a_fresh_login_shell() -> None:
    """`exit`, `logout` and Ctrl-D on an empty line give the banner and a new prompt."""
    sh = booted()
    for keys in (b"exit\r", b"logout\r", b"\x04"):
        out = run(sh, keys)
        assert b"serialmuxd demo guest" in out and out.endswith(b"\r\n\r\n" + PROMPT)
    assert sh.feed(b"ab\x04", BOOTED_AT) == b"ab"  # Ctrl-D with text on the line does nothing


def test_reboot_prints_shutdown_and_asks_for_a_reboot_once() -> None:
    """`reboot` prints the shutdown messages and hands REBOOT to the backend exactly once."""
    sh = booted()
    out = sh.feed(b"reboot\r", BOOTED_AT)
    assert out.endswith(b"] reboot: Restarting system\r\n")
    assert sh.take_action() is Action.REBOOT
    assert sh.take_action() is None
    assert sh.feed(b"echo ignored\r", BOOTED_AT) == b""  # going down: input is ignored
    assert not sh.pending
    sh.boot_log(BOOTED_AT + 1)
    sh.boot_done(BOOTED_AT + 3)
    assert command(sh, "echo back") == "back\r\n"


def test_poweroff_asks_for_power_off() -> None:
    """`poweroff` prints `reboot: Power down` and hands POWEROFF to the backend."""
    sh = booted()
    assert sh.feed(b"poweroff\r", BOOTED_AT).endswith(b"] reboot: Power down\r\n")
    assert sh.take_action() is Action.POWEROFF


# --- large outputs are lazy and bounded --------------------------------------------


def test_yes_n_prints_y_n_times_lazily_in_bounded_chunks() -> None:
    """`yes 5000` prints `y` 5000 times, handed out in chunks no larger than asked for."""
    sh = booted()
    first = sh.feed(b"yes 5000\r", BOOTED_AT)
    assert first == b"yes 5000\r\n"  # nothing produced eagerly
    assert sh.pending
    chunks = []
    while sh.pending:
        chunk = sh.read(230, BOOTED_AT)
        assert 0 < len(chunk) <= 230
        chunks.append(chunk)
    out = b"".join(chunks)
    assert out == b"y\r\n" * 5000 + PROMPT


def test_yes_with_text_and_count() -> None:
    """`yes hello 3` repeats the text."""
    assert command(booted(), "yes hello there 3") == "hello there\r\n" * 3


def test_yes_count_is_capped_at_a_million_and_says_so() -> None:
    """`yes` prints at most 1,000,000 lines and tells the user when it caps."""
    sh = booted()
    out = run(sh, b"yes 5000000\r", chunk=1 << 22)
    assert out.startswith(b"yes 5000000\r\nyes: the demo guest prints at most 1000000 lines\r\n")
    assert out.count(b"y\r\n") == MAX_REPEAT
    assert out.endswith(PROMPT)


def test_yes_without_count_stops_at_the_cap_or_ctrl_c() -> None:
    """`yes` alone runs until Ctrl-C (at most the cap); Ctrl-C flushes and gives a prompt."""
    sh = booted()
    sh.feed(b"yes\r", BOOTED_AT)
    assert sh.read(1000, BOOTED_AT) == (b"y\r\n" * 334)[:1000]
    assert sh.feed(b"\x03", BOOTED_AT) == b"^C\r\n" + PROMPT
    assert not sh.pending
    assert command(sh, "echo $?") == "130\r\n"


def test_seq_prints_numbered_lines() -> None:
    """`seq` takes LAST, FIRST LAST or FIRST INCR LAST like coreutils."""
    sh = booted()
    assert command(sh, "seq 3") == "1\r\n2\r\n3\r\n"
    assert command(sh, "seq 9 11") == "9\r\n10\r\n11\r\n"
    assert command(sh, "seq 10 -4 1") == "10\r\n6\r\n2\r\n"
    assert command(sh, "seq 5 1") == ""
    assert command(sh, "seq x") == "seq: invalid number 'x'\r\n"
    assert command(sh, "seq 1 0 5") == "seq: invalid zero increment value: '0'\r\n"


def test_seq_is_lazy_and_capped() -> None:
    """`seq 1 10000000` is produced lazily and stops at 1,000,000 lines, saying so."""
    sh = booted()
    assert sh.feed(b"seq 1 10000000\r", BOOTED_AT).endswith(b"at most 1000000 lines\r\n")
    first = sh.read(STREAM_CHUNK, BOOTED_AT)
    assert first.startswith(b"1\r\n2\r\n3\r\n") and len(first) <= STREAM_CHUNK
    total, last = len(first), first
    while sh.pending:
        last = sh.read(1 << 20, BOOTED_AT)
        total += len(last)
    assert last.endswith(b"999999\r\n1000000\r\n" + PROMPT)


def test_typeahead_during_a_running_job_runs_after_it() -> None:
    """Keys typed while `seq` prints wait their turn, as in a tty, then run in order."""
    sh = booted()
    sh.feed(b"seq 2000\r", BOOTED_AT)
    sh.read(100, BOOTED_AT)
    assert sh.feed(b"echo after\r", BOOTED_AT) == b""
    rest = b""
    while sh.pending:
        rest += sh.read(512, BOOTED_AT)
    assert rest.endswith(b"1999\r\n2000\r\n" + PROMPT + b"echo after\r\nafter\r\n" + PROMPT)


def test_commands_after_a_job_on_the_same_line_run_after_it() -> None:
    """`seq 2; echo done` prints the numbers, then done, then one prompt."""
    assert command(booted(), "seq 2; echo done") == "1\r\n2\r\ndone\r\n"


def test_a_big_paste_never_builds_a_big_output_at_once() -> None:
    """Pasting many commands at once: feed returns a bounded amount, the rest is lazy."""
    sh = booted()
    out = sh.feed(b"dmesg\r" * 2000, BOOTED_AT)
    dmesg_len = len(command(booted(), "dmesg"))
    assert len(out) <= FEED_OUTPUT_LIMIT + dmesg_len + 100
    assert sh.pending
    total = len(out)
    while sh.pending:
        chunk = sh.read(8192, BOOTED_AT)
        assert len(chunk) <= 8192
        total += len(chunk)
    assert total >= 2000 * dmesg_len  # every pasted command ran, in turn


# --- kernel: SysRq and NMI -------------------------------------------------------------


def sysrq(sh: DemoShell, key: bytes, now: float = BOOTED_AT) -> bytes:
    sh.arm_sysrq(now)
    return sh.feed(key, now)


def test_sysrq_h_after_break_prints_help() -> None:
    """BREAK then `h`: the kernel's SysRq HELP line, on a line of its own, and no echo of `h`."""
    sh = booted()
    out = sysrq(sh, b"h")
    assert re.fullmatch(rb"\r\n\[ *\d+\.\d{6}\] sysrq: HELP : loglevel\(0-9\) reBoot Crash [^\r\n]*\r\n", out)
    assert sh.feed(b"\r", BOOTED_AT) == b"\r\n" + PROMPT  # the h did not reach the shell


def test_only_the_first_byte_after_break_is_a_sysrq_key() -> None:
    """BREAK arms SysRq for one key: the bytes after it are ordinary input."""
    sh = booted()
    out = sysrq(sh, b"secho hi\r")
    assert b"sysrq: Emergency Sync" in out and b"Emergency Sync complete" in out
    assert out.endswith(b"echo hi\r\nhi\r\n" + PROMPT)


def test_sysrq_window_expires_after_5_seconds() -> None:
    """A key more than 5 s after the BREAK is plain input."""
    sh = booted()
    sh.arm_sysrq(BOOTED_AT)
    assert sh.feed(b"h", BOOTED_AT + SYSRQ_WINDOW_S + 0.1) == b"h"


@pytest.mark.parametrize(
    ("key", "text"),
    [
        (b"s", b"sysrq: Emergency Sync"),
        (b"u", b"sysrq: Emergency Remount R/O"),
        (b"t", b"sysrq: Show State"),
        (b"w", b"sysrq: Show Blocked State"),
        (b"m", b"sysrq: Show Memory"),
        (b"7", b"sysrq: Loglevel set to 7"),
        (b"q", b"sysrq: HELP : loglevel(0-9) reBoot"),
    ],
)
def test_sysrq_keys_print_what_linux_prints(key: bytes, text: bytes) -> None:
    """Each SysRq key prints its kernel message; unknown keys print HELP."""
    sh = booted()
    out = sysrq(sh, key)
    assert text in out
    assert sh.take_action() is None


def test_sysrq_t_w_m_print_a_short_dump() -> None:
    """t, w and m print a few lines of plausible state, not just the title."""
    for key in (b"t", b"w", b"m"):
        assert sysrq(booted(), key).count(b"\r\n") >= 4


@pytest.mark.parametrize(("key", "text"), [(b"e", b"Terminate All Tasks"), (b"i", b"Kill All Tasks")])
def test_sysrq_e_and_i_kill_the_shell_and_a_new_one_starts(key: bytes, text: bytes) -> None:
    """SysRq e/i kill everything but init: the running job dies and a fresh shell prompts."""
    sh = booted()
    sh.feed(b"yes\r", BOOTED_AT)
    sh.read(100, BOOTED_AT)
    out = sysrq(sh, key)
    assert b"sysrq: " + text in out
    assert out.endswith(PROMPT)
    assert not sh.pending


def test_sysrq_b_reboots_at_once() -> None:
    """SysRq b prints `sysrq: Resetting` and asks for a reboot, even while a job runs."""
    sh = booted()
    sh.feed(b"seq 100000\r", BOOTED_AT)
    sh.read(100, BOOTED_AT)
    assert b"sysrq: Resetting" in sysrq(sh, b"b")
    assert sh.take_action() is Action.REBOOT
    assert not sh.pending


def test_sysrq_c_panics_then_asks_for_the_panic_reboot() -> None:
    """SysRq c prints a kernel panic and hands PANIC (hang, then reboot) to the backend."""
    sh = booted()
    out = sysrq(sh, b"c")
    assert b"Kernel panic - not syncing: sysrq triggered crash" in out
    assert b"---[ end Kernel panic" in out
    assert sh.take_action() is Action.PANIC


def test_sysrq_o_powers_off() -> None:
    """SysRq o powers the guest off."""
    sh = booted()
    sysrq(sh, b"o")
    assert sh.take_action() is Action.POWEROFF


def test_sysrq_works_during_boot() -> None:
    """SysRq is the kernel's: it answers while the shell is not up yet."""
    sh = DemoShell()
    sh.boot_log(T0)
    assert b"sysrq: HELP" in sysrq(sh, b"h", T0 + 0.5)


def test_nmi_prints_the_unknown_nmi_message() -> None:
    """An NMI prints `Uhhuh. NMI received for unknown reason 00 on CPU 0.` with a timestamp."""
    sh = booted()
    sh.feed(b"ec", BOOTED_AT)
    out = sh.nmi(BOOTED_AT + 10)
    assert re.match(rb"\r\n\[ +12\.0{6}\] Uhhuh\. NMI received for unknown reason 00 on CPU 0\.\r\n", out)
    assert b"Dazed and confused, but trying to continue" in out
    assert sh.feed(b"ho x\r", BOOTED_AT + 10).endswith(b"x\r\n" + PROMPT)  # the line survived


def test_typeahead_is_bounded() -> None:
    """Input held during a job is capped like a tty buffer, so memory stays bounded."""
    sh = booted()
    sh.feed(b"yes\r", BOOTED_AT)
    for _ in range(5):
        sh.feed(b"x" * MAX_TYPEAHEAD, BOOTED_AT)
    assert sh.feed(b"\x03", BOOTED_AT) == b"^C\r\n" + PROMPT  # and Ctrl-C flushes it all
    assert not sh.pending
