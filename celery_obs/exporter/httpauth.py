"""HTTP basic auth against bcrypt hashes that does not tell by its timing which users exist."""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import threading

import bcrypt

from .webconfig import bcrypt_cost


def _digest(name: bytes) -> bytes:
    return hashlib.sha256(name).digest()


def _basic_credentials(header: str | None) -> tuple[bytes, bytes] | None:
    scheme, _, token = (header or "").partition(" ")
    if scheme.lower() != "basic":
        return None
    try:
        user, colon, password = base64.b64decode(token.strip(), validate=True).partition(b":")
    except (binascii.Error, ValueError):
        return None
    return (user, password) if colon else None


class BasicAuth:
    """Check `Authorization: Basic` against bcrypt hashes without telling by time which users
    exist: names are compared in constant time, and an unknown user's password is checked
    against a decoy hash of the highest configured cost, as a wrong one would be. Successes are
    cached (bcrypt is slow on purpose). One check runs at a time in the process, so failed
    logins never take more than one core from the event consumer."""

    _checking = threading.Lock()

    def __init__(self, users: dict[str, bytes]) -> None:
        self._users = [(_digest(name.encode()), hashed) for name, hashed in users.items()]
        cost = max(bcrypt_cost(hashed) for hashed in users.values())
        # A well-formed hash of that cost that no password produces: checking one against it
        # costs exactly what checking a real user's costs, and never succeeds.
        self._decoy = b"$2b$%02d$" % cost + b"." * 53
        self._verified: set[bytes] = set()
        self._lock = threading.Lock()

    def allows(self, header: str | None) -> bool:
        credentials = _basic_credentials(header)
        if credentials is None:
            return False
        user, password = credentials
        wanted = _digest(user)
        found = None
        for name, hashed in self._users:  # every name, no early exit
            if hmac.compare_digest(name, wanted):
                found = hashed
        hashed = found if found is not None else self._decoy
        # Cache key binds user, hash and password; only its digest is kept in memory.
        key = _digest(b"\0".join((user, hashed, password)))
        with self._lock:
            if key in self._verified:
                return True
        with self._checking:
            try:
                matches = bcrypt.checkpw(password, hashed)
            except ValueError:  # bcrypt refuses passwords over 72 bytes: a failed login
                matches = False
        if not matches or found is None:
            return False
        with self._lock:
            if len(self._verified) > 1024:
                self._verified.clear()
            self._verified.add(key)
        return True
