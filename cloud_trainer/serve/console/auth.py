"""Console login: hashed tokens, roles, server-side sessions and CSRF tokens.

A token file line is ``ROLE NAME scrypt$n$r$p$SALT$HASH`` (hex): the file holds no token,
so reading it does not let anyone log in. Sessions live in memory only (a trainer restart
logs everyone out, which is the safe direction). Every session carries its own CSRF token,
which every POST must echo; the login form itself is protected by a double-submit cookie.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import secrets
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from cloud_trainer.errors import KnetTrainerError

log = logging.getLogger(__name__)

ROLES = ("read", "operator")
_N, _R, _P = 2**14, 8, 1  # scrypt cost: ~20 ms a check, 16 MiB
MAX_TOKEN_CHARS = 512


class TokenFileError(KnetTrainerError, ValueError):
    """A tokens file line that is not ``ROLE NAME scrypt$...``."""


def hash_token(token: str, *, salt: bytes | None = None) -> str:
    """The stored form of ``token`` (scrypt with a random salt)."""
    salt = salt or secrets.token_bytes(16)
    digest = hashlib.scrypt(token.encode(), salt=salt, n=_N, r=_R, p=_P, dklen=32)
    return f"scrypt${_N}${_R}${_P}${salt.hex()}${digest.hex()}"


def check_token(token: str, stored: str) -> bool:
    try:
        kind, n, r, p, salt, digest = stored.split("$")
        if kind != "scrypt":
            return False
        got = hashlib.scrypt(token.encode(), salt=bytes.fromhex(salt), n=int(n), r=int(r),
                             p=int(p), dklen=len(bytes.fromhex(digest)))
    except (ValueError, MemoryError):
        return False
    return hmac.compare_digest(got.hex(), digest)


@dataclass(frozen=True)
class Account:
    role: str
    name: str
    stored: str


def load_tokens(path: Path) -> list[Account]:
    """Parse the tokens file (``#`` comments and blank lines allowed)."""
    out = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        parts = line.split()
        if len(parts) != 3 or parts[0] not in ROLES or not parts[2].startswith("scrypt$"):
            raise TokenFileError(f"{path}:{n}: expected 'ROLE NAME scrypt$...' with ROLE one "
                                 f"of {', '.join(ROLES)}")
        out.append(Account(*parts))
    return out


def token_line(role: str, name: str, token: str) -> str:
    if role not in ROLES:
        raise TokenFileError(f"role must be one of {', '.join(ROLES)}")
    if not name or any(c.isspace() for c in name):
        raise TokenFileError("name must be one word")
    return f"{role} {name} {hash_token(token)}"


@dataclass
class Session:
    sid: str
    role: str
    name: str
    csrf: str
    expires: float


class Auth:
    """Checks tokens against the file and keeps the sessions they open."""

    def __init__(self, accounts: list[Account], ttl_s: float) -> None:
        self.accounts = accounts
        self.ttl_s = ttl_s
        self._sessions: dict[str, Session] = {}
        self._lock = threading.Lock()

    @classmethod
    def from_file(cls, path: Path | None, ttl_s: float) -> Auth:
        return cls(load_tokens(path) if path is not None else [], ttl_s)

    def account(self, token: str) -> Account | None:
        """The account ``token`` belongs to, or None (every line is tried: no early exit
        that would tell which names exist)."""
        if not token or len(token) > MAX_TOKEN_CHARS:
            return None
        found = None
        for acc in self.accounts:
            if check_token(token, acc.stored) and found is None:
                found = acc
        return found

    def login(self, token: str) -> Session | None:
        acc = self.account(token)
        if acc is None:
            log.warning("console: a login was refused")
            return None
        s = Session(sid=secrets.token_urlsafe(32), role=acc.role, name=acc.name,
                    csrf=secrets.token_urlsafe(32), expires=time.time() + self.ttl_s)
        with self._lock:
            now = time.time()
            for sid in [k for k, v in self._sessions.items() if v.expires < now]:
                del self._sessions[sid]
            self._sessions[s.sid] = s
        log.info("console: %s (%s) logged in", acc.name, acc.role)
        return s

    def session(self, sid: str | None) -> Session | None:
        if not sid:
            return None
        with self._lock:
            s = self._sessions.get(sid)
            if s is not None and s.expires < time.time():
                del self._sessions[sid]
                return None
            return s

    def logout(self, sid: str | None) -> None:
        with self._lock:
            self._sessions.pop(sid or "", None)


def same(a: str | None, b: str | None) -> bool:
    """Constant-time equality of two present strings (CSRF tokens)."""
    return bool(a) and bool(b) and hmac.compare_digest(str(a), str(b))
