"""Slow hashes for passwords and API key secrets (argon2id, via argon2-cffi).

Passwords moved in from the earlier layers may carry bcrypt hashes (`$2a$`, `$2b$`, `$2y$`):
verify_password checks them with the bcrypt library, and needs_rehash says they are to be
replaced by an argon2id hash once the password is known (at a successful login). API key
secrets are only ever argon2id (verify_secret)."""
from __future__ import annotations

import re
import secrets as _random

import bcrypt
from argon2 import PasswordHasher, Type, extract_parameters
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
    """Whether the hash is to be replaced with one of the current argon2id cost: any other
    algorithm (bcrypt) always is."""
    if not stored_hash.startswith("$argon2id$"):
        return True
    try:
        return _hasher.check_needs_rehash(stored_hash)
    except InvalidHashError:
        return True


# bcrypt's modular crypt form: $2a$ / $2b$ / $2y$, a two-digit cost, 22 characters of salt and
# 31 of hash in bcrypt's base64 alphabet.
_BCRYPT = re.compile(r"^\$2[aby]\$(\d\d)\$[./A-Za-z0-9]{53}$")
# Every password bcrypt ever hashed was cut to its first 72 bytes (bcrypt 5 refuses longer ones
# rather than cutting them): a login checks those bytes, as the hash was made from them.
_BCRYPT_MAX_BYTES = 72
# argon2id's PHC string form, as argon2-cffi writes it (salt and hash in unpadded base64).
_ARGON2ID = re.compile(r"^\$argon2id\$v=19\$m=\d{1,10},t=\d{1,10},p=\d{1,3}\$[A-Za-z0-9+/]{11,}\$[A-Za-z0-9+/]{16,}$")


def is_bcrypt(stored_hash: str) -> bool:
    return _BCRYPT.fullmatch(stored_hash) is not None


def verify_password(stored_hash: str | None, plain: str) -> bool:
    """A user's password against its stored hash: argon2id (verify_secret, which also spends a
    hash's time on a user without one), or bcrypt for a hash moved in."""
    if stored_hash is not None and is_bcrypt(stored_hash):
        try:
            return bcrypt.checkpw(plain.encode()[:_BCRYPT_MAX_BYTES], stored_hash.encode())
        except ValueError:
            return False
    return verify_secret(stored_hash, plain)


# The costs a hash moved in may ask of a login: a login pays its hash's cost on every attempt,
# so a cost past these (bcrypt 2**31 rounds, argon2id gigabytes or billions of passes) would
# make each attempt a denial of service. Wide enough for any hash made with a library's
# defaults or hardened settings (bcrypt's default is 12; argon2-cffi's 64 MiB, 3 passes, 4 lanes).
BCRYPT_MAX_COST = 16
ARGON2_MAX_MEMORY_KIB = 1024 * 1024  # 1 GiB
ARGON2_MAX_TIME_COST = 20
ARGON2_MAX_PARALLELISM = 16


def ready_hash_problem(value: str) -> str | None:
    """Why value is not a password hash the service accepts as it is, or None when it is: a
    bcrypt hash of cost 4 to BCRYPT_MAX_COST, or an argon2id hash argon2-cffi can read whose
    memory, passes and lanes are within the ARGON2_MAX_* bounds."""
    match = _BCRYPT.fullmatch(value)
    if match is not None:
        cost = int(match.group(1))
        return None if 4 <= cost <= BCRYPT_MAX_COST else f"a bcrypt hash's cost must be 4 to {BCRYPT_MAX_COST}, not {cost}"
    if value.startswith("$2"):
        return "is not a bcrypt hash ($2a$, $2b$ or $2y$, a two-digit cost, then 53 characters of salt and hash)"
    if value.startswith("$argon2"):
        if not value.startswith("$argon2id$"):
            return "must be an argon2id hash, not argon2i or argon2d"
        try:
            parameters = extract_parameters(value)
        except (InvalidHashError, ValueError):
            parameters = None
        if _ARGON2ID.fullmatch(value) is None or parameters is None or parameters.type is not Type.ID:
            return "is not an argon2id hash ($argon2id$v=19$m=...,t=...,p=...$<salt>$<hash>)"
        if parameters.memory_cost > ARGON2_MAX_MEMORY_KIB or parameters.time_cost > ARGON2_MAX_TIME_COST or parameters.parallelism > ARGON2_MAX_PARALLELISM:
            return (
                f"an argon2id hash's cost must be at most m={ARGON2_MAX_MEMORY_KIB} KiB, t={ARGON2_MAX_TIME_COST}, "
                f"p={ARGON2_MAX_PARALLELISM} (a login pays it on every attempt)"
            )
        return None
    return "must be a bcrypt ($2a$, $2b$, $2y$) or argon2id ($argon2id$) hash"


def new_api_key() -> tuple[str, str]:
    """(prefix, full secret): the prefix identifies the key in lookups; only its hash is stored."""
    prefix = "nx_" + _random.token_hex(KEY_PREFIX_LENGTH // 2 - 1)[: KEY_PREFIX_LENGTH - 3]
    return prefix, f"{prefix}.{_random.token_urlsafe(32)}"
