"""Who is asking and what they may do: tokens, roles, session cookies.

Pure code: no aiohttp here.  The web layer extracts the credentials and asks.
Tokens are compared by SHA-256 digest in constant time against every user, so
neither timing nor early exit tells which user's token was close.
"""

from __future__ import annotations

import base64
import fnmatch
import hashlib
import hmac
import secrets
import time
from dataclasses import dataclass, field

from serialmuxd.config import Role, UserConfig

TOKEN_PREFIX = "smx_"


def new_token() -> str:
    """``smx_`` + 43 URL-safe base64 characters, never starting with ``-``."""
    while True:
        body = base64.urlsafe_b64encode(secrets.token_bytes(32)).decode().rstrip("=")
        if not body.startswith("-"):
            return TOKEN_PREFIX + body


def token_sha256(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


@dataclass(frozen=True)
class Principal:
    name: str
    grants: tuple[tuple[str, Role], ...] = field(repr=False)
    via: str = "token"  # token | cookie | anonymous | local

    def role_for(self, console: str | None) -> Role | None:
        """Highest role granted on ``console``; None = service-wide (needs a ``*`` grant)."""
        best: Role | None = None
        for glob, role in self.grants:
            hit = glob == "*" if console is None else fnmatch.fnmatchcase(console, glob)
            if hit and (best is None or role > best):
                best = role
        return best

    def may(self, role: Role, console: str | None) -> bool:
        have = self.role_for(console)
        return have is not None and have >= role

    def may_see(self, console: str) -> bool:
        return self.role_for(console) is not None


ANONYMOUS_OWNER = Principal("anonymous", (("*", Role.OWNER),), via="anonymous")


def need_message(role: Role, console: str | None) -> str:
    where = f"on {console}" if console else 'on the whole service (a "*" grant)'
    return f"{role.label} {where} required: ask an owner to grant it in the config"


class Authenticator:
    """Maps bearer tokens and session cookies to principals."""

    def __init__(self, users: tuple[UserConfig, ...], cookie_key: bytes) -> None:
        self._users = users
        self._by_name = {u.name: u for u in users}
        self._cookie_key = cookie_key

    @property
    def open_access(self) -> bool:
        """No users configured: everyone on the (loopback) listener is owner."""
        return not self._users

    def from_token(self, token: str) -> Principal | None:
        digest = hashlib.sha256(token.encode("utf-8", "surrogateescape")).digest()
        found: UserConfig | None = None
        for u in self._users:
            if hmac.compare_digest(digest, u.token_sha256):
                found = u
        if found is None:
            return None
        return Principal(found.name, found.roles, via="token")

    # --- cookies: user|expiry|mac, the MAC also covers the user's token hash so
    # rotating a token logs out every browser that logged in with the old one.

    def make_cookie(self, principal: Principal, max_age_s: int, now: float | None = None) -> str:
        user = self._by_name[principal.name]
        expiry = int((now if now is not None else time.time()) + max_age_s)
        payload = f"{user.name}|{expiry}"
        mac = hmac.new(self._cookie_key, payload.encode() + user.token_sha256, hashlib.sha256).hexdigest()
        return base64.urlsafe_b64encode(f"{payload}|{mac}".encode()).decode().rstrip("=")

    def from_cookie(self, value: str, now: float | None = None) -> Principal | None:
        try:
            padded = value + "=" * (-len(value) % 4)
            name, expiry_s, mac = base64.urlsafe_b64decode(padded.encode()).decode().split("|")
            expiry = int(expiry_s)
        except (ValueError, UnicodeDecodeError):
            return None
        user = self._by_name.get(name)
        if user is None:
            return None
        want = hmac.new(
            self._cookie_key, f"{name}|{expiry}".encode() + user.token_sha256, hashlib.sha256
        ).hexdigest()
        # Bytes, not str: compare_digest raises on non-ASCII str, and the MAC part is
        # whatever the client sent.
        if not hmac.compare_digest(want.encode(), mac.encode()):
            return None
        if expiry < (now if now is not None else time.time()):
            return None
        return Principal(user.name, user.roles, via="cookie")


@dataclass
class FailureLimiter:
    """Slows down repeated auth failures per peer (token guessing).

    A peer gets ``burst`` free failures; after that each further failure must
    wait ``penalty_s`` seconds (doubling, capped) or it is answered 429.
    Bounded: the table holds at most ``max_peers`` peers, oldest evicted.
    """

    burst: int = 5
    penalty_s: float = 1.0
    cap_s: float = 60.0
    window_s: float = 300.0
    max_peers: int = 10_000
    _peers: dict[str, tuple[int, float]] = field(default_factory=dict)

    def retry_after(self, peer: str, now: float) -> float:
        """Seconds the peer must wait before trying again (0 = go ahead)."""
        entry = self._peers.get(peer)
        if entry is None:
            return 0.0
        count, last = entry
        if now - last > self.window_s:
            del self._peers[peer]
            return 0.0
        if count < self.burst:
            return 0.0
        wait = min(self.penalty_s * 2.0 ** (count - self.burst), self.cap_s)
        return max(0.0, last + wait - now)

    def failed(self, peer: str, now: float) -> None:
        count, last = self._peers.pop(peer, (0, now))
        if now - last > self.window_s:
            count = 0
        self._peers[peer] = (count + 1, now)
        while len(self._peers) > self.max_peers:
            self._peers.pop(next(iter(self._peers)))

    def succeeded(self, peer: str) -> None:
        """A good credential does not wipe the peer's record of failures.

        Otherwise anyone holding one valid (say, reader) token could interleave it
        with guesses and never be slowed down.  Failures expire ``window_s`` after
        the last one.
        """
