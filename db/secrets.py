"""Slow hashes for passwords and API key secrets (argon2id, via argon2-cffi)."""
from __future__ import annotations

import secrets as _random

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError, VerifyMismatchError

_hasher = PasswordHasher()
# Verified against when the login does not exist, so a miss costs as much as a wrong password.
_DUMMY_HASH: str | None = None
KEY_PREFIX_LENGTH = 12


def configure(time_cost: int, memory_cost_kib: int, parallelism: int = 1) -> None:
    """Set the argon2id cost; the defaults (argon2-cffi's RFC 9106 low-memory profile) suit production."""
    global _hasher, _DUMMY_HASH
    _hasher = PasswordHasher(time_cost=time_cost, memory_cost=memory_cost_kib, parallelism=parallelism)
    _DUMMY_HASH = None


def hash_secret(plain: str) -> str:
    return _hasher.hash(plain)


def verify_secret(stored_hash: str | None, plain: str) -> bool:
    global _DUMMY_HASH
    if stored_hash is None:
        if _DUMMY_HASH is None:
            _DUMMY_HASH = _hasher.hash("nexus-dummy-password")
        stored_hash = _DUMMY_HASH
        plain = plain + "\x00never"
    try:
        return _hasher.verify(stored_hash, plain)
    except (VerifyMismatchError, VerificationError, InvalidHashError):
        return False


def needs_rehash(stored_hash: str) -> bool:
    return _hasher.check_needs_rehash(stored_hash)


def new_api_key() -> tuple[str, str]:
    """(prefix, full secret): the prefix identifies the key in lookups; only its hash is stored."""
    prefix = "nx_" + _random.token_hex(KEY_PREFIX_LENGTH // 2 - 1)[: KEY_PREFIX_LENGTH - 3]
    return prefix, f"{prefix}.{_random.token_urlsafe(32)}"
