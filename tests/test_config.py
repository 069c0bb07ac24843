"""The config loader: typed, frozen, and every mistake named by its key path."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from serialmuxd.config import Role, load_config, parse_config
from serialmuxd.errors import ConfigError

HASH = "a" * 64


def err(data: dict[str, Any]) -> str:
    with pytest.raises(ConfigError) as e:
        parse_config(data, source="config.toml")
    return str(e.value)


def test_minimal_config_gets_contract_defaults() -> None:
    """A console with only name and uart inherits every default of the contract."""
    cfg = parse_config({"console": [{"name": "vm1", "uart": "unix:/run/qemu/vm1.serial"}]})
    c = cfg.consoles[0]
    assert c.settings.baud == 115200
    assert c.settings.ring_bytes == 1048576
    assert c.settings.replay_bytes == 4096
    assert c.settings.idle_timeout_s == 0
    assert c.settings.detach_sequence == b""
    assert c.qmp_chardev == "serial0"
    assert cfg.http.listen == ("127.0.0.1:7480",)


def test_config_is_frozen() -> None:
    """Config objects cannot be mutated behind the daemon's back."""
    cfg = parse_config({})
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.daemon.state_dir = "/tmp"  # type: ignore[misc]


def test_per_console_settings_override_defaults() -> None:
    """Every [defaults] key may be set in a [[console]] for that console alone."""
    cfg = parse_config(
        {
            "defaults": {"replay_bytes": 100, "detach_sequence": "exit\r"},
            "console": [
                {"name": "a", "uart": "demo:"},
                {"name": "b", "uart": "demo:", "replay_bytes": 7, "idle_timeout_s": 30},
            ],
        }
    )
    a, b = cfg.consoles
    assert a.settings.replay_bytes == 100 and a.settings.detach_sequence == b"exit\r"
    assert b.settings.replay_bytes == 7 and b.settings.idle_timeout_s == 30


def test_unknown_key_names_the_console_and_key() -> None:
    """A typo is an error naming file, console index, name and key."""
    msg = err(
        {
            "console": [
                {"name": "a", "uart": "demo:"},
                {"name": "a2", "uart": "demo:"},
                {"name": "vm3", "uart": "demo:", "uartt": "x"},
            ]
        }
    )
    assert msg.startswith("config.toml: console[2] (vm3).uartt: unknown key")


def test_bad_uart_names_key_path() -> None:
    """An unknown backend form says which forms exist."""
    msg = err(
        {
            "console": [
                {"name": "a", "uart": "demo:"},
                {"name": "b", "uart": "demo:"},
                {"name": "vm3", "uart": "ftp://x"},
            ]
        }
    )
    assert msg.startswith("config.toml: console[2] (vm3).uart: unknown backend")
    assert "unix:/path" in msg


@pytest.mark.parametrize("name", ["a/b", "..", ".", "x\x00y", "x" * 65, "x" * 10_000, "", "vm 1", "é"])
def test_invalid_console_names_refused(name: str) -> None:
    """Names become file and URL parts: /, .., NUL, 10 kB and friends are refused."""
    msg = err({"console": [{"name": name, "uart": "demo:"}]})
    assert "console[0].name" in msg
    assert len(msg) < 300  # a 10 kB name is not echoed back whole


def test_duplicate_console_names_refused() -> None:
    msg = err({"console": [{"name": "vm1", "uart": "demo:"}, {"name": "vm1", "uart": "demo:"}]})
    assert "console[1] (vm1).name: duplicate" in msg


def test_wrong_types_named() -> None:
    assert "defaults.baud: must be an integer, not a string" in err({"defaults": {"baud": "fast"}})
    assert "http.listen: must be an array" in err({"http": {"listen": "127.0.0.1:1"}})
    assert "daemon.state_dir: must be a string" in err({"daemon": {"state_dir": 3}})
    assert "defaults.idle_timeout_s: must be a number" in err({"defaults": {"idle_timeout_s": True}})


def test_replay_larger_than_ring_refused() -> None:
    assert "replay_bytes: must not exceed ring_bytes" in err(
        {"defaults": {"ring_bytes": 4096, "replay_bytes": 5000}}
    )


def test_user_roles_parsed_and_validated() -> None:
    cfg = parse_config(
        {"user": [{"name": "alice", "token_sha256": HASH, "roles": {"*": "reader", "web-*": "owner"}}]}
    )
    assert cfg.users[0].roles == (("*", Role.READER), ("web-*", Role.OWNER))
    assert "unknown role 'admin'" in err(
        {"user": [{"name": "a", "token_sha256": HASH, "roles": {"*": "admin"}}]}
    )
    assert "token_sha256: must be 64 hex digits" in err({"user": [{"name": "a", "token_sha256": "xyz"}]})


def test_token_hash_not_in_repr() -> None:
    """Token hashes never show up in a repr (and so never in a log line)."""
    cfg = parse_config({"user": [{"name": "alice", "token_sha256": HASH}]})
    assert HASH not in repr(cfg) and "aaaa" not in repr(cfg.users[0])


def test_plaintext_on_public_address_refused() -> None:
    """A non-loopback listener without TLS needs allow_plaintext = true, said clearly."""
    msg = err({"http": {"listen": ["0.0.0.0:7480"]}})
    assert "http.listen[0]" in msg and "allow_plaintext" in msg
    user = [{"name": "alice", "token_sha256": HASH}]
    parse_config({"http": {"listen": ["0.0.0.0:7480"], "allow_plaintext": True}, "user": user})
    parse_config({"http": {"listen": ["[::1]:7480", "127.0.0.1:1"]}})


def test_open_access_only_on_loopback() -> None:
    """With no [[user]] everyone is owner: refused on a non-loopback address, even with TLS."""
    msg = err({"http": {"listen": ["0.0.0.0:7480"], "tls_cert": "/c.pem", "tls_key": "/k.pem"}})
    assert "http.listen[0]" in msg and "no [[user]] is configured" in msg


def test_tls_cert_without_key_refused() -> None:
    assert "tls_cert and tls_key go together" in err({"http": {"tls_cert": "/x.pem"}})


def test_load_config_reports_toml_syntax_error(tmp_path: Path) -> None:
    p = tmp_path / "bad.toml"
    p.write_text("[daemon\nx=1")
    with pytest.raises(ConfigError) as e:
        load_config(p)
    assert str(e.value).startswith(f"{p}: not valid TOML")


def test_check_config_exit_status_2_with_key_path(tmp_path: Path) -> None:
    """`serialmuxd check-config` exits 2 and names the key on stderr."""
    p = tmp_path / "c.toml"
    p.write_text('[[console]]\nname = "vm1"\nuart = "nope"\n')
    r = subprocess.run(
        [sys.executable, "-m", "serialmuxd", "check-config", "-c", str(p)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 2
    assert "console[0] (vm1).uart" in r.stderr
    p.write_text('[[console]]\nname = "vm1"\nuart = "demo:"\n')
    r = subprocess.run(
        [sys.executable, "-m", "serialmuxd", "check-config", "-c", str(p)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 0, r.stderr


toml_scalars = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(), st.text(max_size=20))
toml_values = st.recursive(
    toml_scalars.filter(lambda v: v is not None),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
    max_leaves=8,
)


@settings(max_examples=300, deadline=None)
@given(
    st.dictionaries(
        st.sampled_from(["daemon", "http", "defaults", "console", "user", "junk"]),
        toml_values,
        max_size=5,
    )
)
def test_fuzzed_configs_fail_only_with_config_error(data: dict[str, Any]) -> None:
    """Whatever the document, the loader answers with a config or a ConfigError, never a crash."""
    try:
        parse_config(data, source="fuzz.toml")
    except ConfigError as e:
        assert str(e).startswith("fuzz.toml: ")
