"""Authentication: `authorization: Bearer <API key | JWT>` on every RPC but health and reflection.

API keys: the secret is `<prefix>.<random>`; the prefix finds the row, an argon2id hash check
proves the secret. A revoked or expired key, or one whose user is inactive, is refused before
any hash. The hash runs on a small pool of its own (never on a database thread), and failed
hashes are counted per key prefix and per peer address: past the limit within the window a call
that would need a hash is RESOURCE_EXHAUSTED with RetryInfo. A proven key is cached by a SHA-256
of the secret, and its row (revoked? expired? role? its user's role?) is re-read at most every
`recheck_seconds` without hashing again, so a revocation or a demotion through any replica takes
effect within that time (at once on the replica that made it). A key acts with the lower of its
own role and its user's current role. JWTs (PyJWT): HS256 with a shared secret or RS256 with
the issuer's public key, issuer and audience checked, `iat` and `exp` required and at most
`max_lifetime_seconds` apart (and `exp` at most that far ahead); `sub` is the user's
external_id, and the role claim (default "role") may lower the user's stored role, never raise it.
The permissions of the Roles assigned to the caller's user are read with its row, and re-read
with it: a change of a role or of an assignment is a change of credentials (at once on the
replica that made it, within `recheck_seconds` on the others).
"""
from __future__ import annotations

import asyncio
import datetime as dt
import functools
import hashlib
import logging
import time
import uuid
from collections import Counter, deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import jwt
from sqlalchemy import select, update
from sqlalchemy.orm import Session

from db import errors, secrets
from db.base import utcnow
from db.database import CREDENTIALS_CHANGED_KEY, Database
from db.domains import identity
from db.domains.identity import ApiKey, User
from db.engine.rules import ROLE_RANK
from db.unit import SESSION_READ
from service import policy

log = logging.getLogger("nexus.auth")


@dataclass(frozen=True)
class Principal:
    """Who is calling."""

    actor_type: str  # "api_key", "user" or "system"
    actor_id: uuid.UUID | None
    role: str
    user_id: uuid.UUID | None  # the user the caller acts as, if any
    # The permissions its user's assigned Roles hold together; None when none is assigned (its
    # role's level alone decides, service/policy.py).
    held: frozenset[str] | None = None
    # An API key's scopes (db/domains/identity.KEY_SCOPES): methods it may call beyond its role.
    scopes: frozenset[str] = frozenset()


INSECURE_PRINCIPAL = Principal("system", None, "admin", None)


@dataclass(frozen=True)
class JwtSettings:
    hs256_secret: str | None = None
    rs256_public_key: str | None = None  # PEM text
    issuer: str | None = None
    audience: str | None = None
    role_claim: str = "role"
    max_lifetime_seconds: float = 3600.0

    @property
    def enabled(self) -> bool:
        return bool(self.hs256_secret or self.rs256_public_key)


@dataclass(frozen=True)
class AuthSettings:
    """The cost bounds of API key checks (service/config.py: NEXUS_AUTH_*)."""

    hash_workers: int = 2
    key_failure_limit: int = 10
    peer_failure_limit: int = 50
    failure_window_seconds: float = 300.0
    recheck_seconds: float = 5.0


class RateLimited(errors.ResourceExhausted):
    """Too many failed secrets for a key prefix or from a peer: retry after retry_delay seconds."""

    def __init__(self, message: str, retry_delay: float, metadata: dict[str, str]) -> None:
        super().__init__(message, reason="AUTH_RATE_LIMITED", metadata=metadata)
        self.retry_delay = retry_delay


def peer_address(peer: str) -> str:
    """The caller's address without its port ("ipv4:10.0.0.1:5123" -> "ipv4:10.0.0.1")."""
    kind, _, rest = peer.partition(":")
    if kind in ("ipv4", "ipv6"):
        return f"{kind}:{rest.rpartition(':')[0]}"
    return peer


class FailureLimiter:
    """Failed secret checks per key prefix and per peer address, in a sliding window."""

    max_tracked = 100_000

    def __init__(self, settings: AuthSettings) -> None:
        self.limits = {"key_prefix": settings.key_failure_limit, "peer": settings.peer_failure_limit}
        self.window = settings.failure_window_seconds
        self._failures: dict[tuple[str, str], deque[float]] = {}

    def _recent(self, name: tuple[str, str], now: float) -> deque[float] | None:
        times = self._failures.get(name)
        while times and times[0] <= now - self.window:
            times.popleft()
        return times

    def check(self, **subjects: str) -> None:
        """RateLimited when any subject (key_prefix=..., peer=...) has used up its failures."""
        now = time.monotonic()
        for kind, value in subjects.items():
            times = self._recent((kind, value), now)
            if times and len(times) >= self.limits[kind]:
                delay = times[0] + self.window - now
                raise RateLimited(
                    f"too many failed credentials for this {kind.replace('_', ' ')}; retry in {delay:.0f} s",
                    delay,
                    {kind: value, "retry_after_seconds": str(max(1, round(delay)))},
                )

    def attempt(self, **subjects: str) -> float:
        """check(), then count this attempt as a failure until succeeded() takes it back: a burst
        of concurrent wrong secrets is limited before its hashes run, not after."""
        self.check(**subjects)
        now = time.monotonic()
        if len(self._failures) >= self.max_tracked:
            for name in list(self._failures):
                if not self._recent(name, now):
                    del self._failures[name]
        for kind, value in subjects.items():
            self._failures.setdefault((kind, value), deque(maxlen=self.limits[kind])).append(now)
        return now

    def succeeded(self, stamp: float, **subjects: str) -> None:
        for kind, value in subjects.items():
            times = self._failures.get((kind, value))
            if times is not None and stamp in times:
                times.remove(stamp)


def lower_role(*roles: str) -> str:
    return min(roles, key=ROLE_RANK.__getitem__)


_KEY_ROW = (
    select(
        ApiKey.id, ApiKey.role, ApiKey.user_id, ApiKey.secret_hash, ApiKey.expire_time, ApiKey.revoke_time, ApiKey.last_used_time,
        ApiKey.scopes,
        User.role.label("owner_role"), User.is_active.label("owner_active"), User.delete_time.label("owner_deleted"),
    )
    .outerjoin(User, User.id == ApiKey.user_id)
)


@dataclass
class _Known:
    """A checked credential: valid or not, and when its row was last read."""

    principal: Principal | None
    problem: str
    expire_time: dt.datetime | None
    checked_at: float
    last_used: dt.datetime | None = None
    reason: str = "INVALID_CREDENTIALS"


class UsageStamps:
    """API keys' last uses, written in the background: no call waits for them. At most one write
    is in flight, an UPDATE of every key noted since the one before, given STAMP_SECONDS (on
    SQLite its wait for the write lock, on PostgreSQL its statement time) and dropped past
    them: a stamp never holds the SQLite write thread, a pooled connection or a shutdown for
    longer, and a key whose stamp was dropped is stamped at its next check.

    A usage stamp, not a change of the key: update_time (its onupdate), the revision (the etag)
    and the audit trail stay as they are."""

    STAMP_SECONDS = 0.25

    def __init__(self, db: Database) -> None:
        self.db = db
        self._noted: dict[uuid.UUID, dt.datetime] = {}
        self._writing: asyncio.Future[None] | None = None  # held: the loop keeps weak references

    def note(self, key_id: uuid.UUID) -> None:
        self._noted[key_id] = utcnow()
        if self._writing is None or self._writing.done():
            self._writing = asyncio.ensure_future(self._write())

    async def _write(self) -> None:
        while self._noted:
            noted, self._noted = self._noted, {}
            used = max(noted.values())
            stamp = update(ApiKey).where(ApiKey.id.in_(list(noted))).values(last_used_time=used, update_time=ApiKey.update_time)
            try:
                await self.db.run(lambda s: s.execute(stamp), deadline=time.monotonic() + self.STAMP_SECONDS)  # noqa: B023 - run and awaited within this iteration
            except Exception as exc:  # noqa: BLE001 - a lost stamp costs nothing but its minute
                log.info("the last use of %d API key(s) was not recorded: %s", len(noted), exc)


class Authenticator:
    last_used_resolution = dt.timedelta(minutes=1)
    max_cached = 10_000

    def __init__(self, db: Database, jwt_settings: JwtSettings | None = None, settings: AuthSettings | None = None) -> None:
        self.db = db
        self.jwt = jwt_settings or JwtSettings()
        self.settings = settings or AuthSettings()
        self.recheck_seconds = self.settings.recheck_seconds
        self.limiter = FailureLimiter(self.settings)
        # The slow hashes of API key secrets: never on the database threads, at most this many at once.
        self._hashing = ThreadPoolExecutor(max_workers=self.settings.hash_workers, thread_name_prefix="nexus-auth-hash")
        self._known: dict[str, _Known] = {}
        self._checking: dict[str, asyncio.Future[_Known]] = {}
        self._stamps = UsageStamps(db)
        # Counted as they happen, read by service/metrics.py: calls answered from the cache of
        # checked credentials (hits) or that checked theirs (misses), refusals by reason.
        self.cache_hits = 0
        self.cache_misses = 0
        self.failures: Counter[str] = Counter()
        # A key or user changed through this replica: its cached checks go at once.
        db.add_commit_listener(self._on_commit)

    def close(self) -> None:
        """The hashing threads ended (a server that stops; another may start in the process)."""
        self._hashing.shutdown(wait=False, cancel_futures=True)

    def _on_commit(self, notes: dict[str, object]) -> None:
        if notes.get(CREDENTIALS_CHANGED_KEY):
            # Stale, not forgotten: the next call re-reads the row (a primary-key lookup) but a
            # key already proven by its hash is not hashed again.
            for known in list(self._known.values()):
                known.checked_at = float("-inf")

    async def authenticate(self, header: str | None, peer: Callable[[], str] = str) -> Principal:
        """The caller of `authorization: header`; peer() names its address (asked only when a
        secret must be hashed, to count failures per peer)."""
        try:
            return await self._authenticate(header, peer)
        except (errors.Unauthenticated, RateLimited) as exc:
            self.failures[exc.reason] += 1
            raise

    async def _authenticate(self, header: str | None, peer: Callable[[], str]) -> Principal:
        if not header:
            raise errors.Unauthenticated("missing credentials: send 'authorization: Bearer <API key or JWT>'", reason="MISSING_CREDENTIALS")
        scheme, _, token = header.partition(" ")
        token = token.strip()
        if scheme.lower() != "bearer" or not token:
            raise errors.Unauthenticated("the authorization header must be 'Bearer <API key or JWT>'", reason="MALFORMED_CREDENTIALS")
        digest = hashlib.sha256(token.encode()).hexdigest()
        known = self._known.get(digest)
        if known is None or time.monotonic() - known.checked_at > self.recheck_seconds:
            self.cache_misses += 1
            # Concurrent first calls with one credential share one check (one slow hash).
            pending = self._checking.get(digest)
            if pending is None:
                pending = asyncio.ensure_future(self._check(token, known, peer))
                self._checking[digest] = pending
                pending.add_done_callback(lambda _: self._checking.pop(digest, None))
            known = await asyncio.shield(pending)
            if len(self._known) >= self.max_cached:
                self._evict()
            self._known[digest] = known
        else:
            self.cache_hits += 1
        if known.principal is None:
            raise errors.Unauthenticated(known.problem, reason=known.reason)
        if known.expire_time is not None and known.expire_time <= utcnow():
            raise errors.Unauthenticated("the credentials have expired", reason="EXPIRED_CREDENTIALS")
        return known.principal

    def _evict(self) -> None:
        """Make room: refusals go first, so a flood of bad credentials (which cost no hash) cannot
        make every proven key pay its hash again; everything goes only when proven keys fill half."""
        proven = {digest: known for digest, known in self._known.items() if known.principal is not None}
        self._known = proven if len(proven) < self.max_cached // 2 else {}

    async def _check(self, token: str, earlier: _Known | None, peer: Callable[[], str]) -> _Known:
        if token.startswith("nx_") and "." in token:
            known = await self._check_key(token, earlier, peer)
            key_id = known.principal.actor_id if known.principal is not None else None
            if key_id is not None and (known.last_used is None or utcnow() - known.last_used > self.last_used_resolution):
                self._stamps.note(key_id)
            return known
        if self.jwt.enabled and token.count(".") == 2:
            return await self._check_jwt(token)
        return _Known(None, "the credentials are not a valid API key or JWT", None, time.monotonic())

    async def _check_key(self, token: str, earlier: _Known | None, peer: Callable[[], str]) -> _Known:
        prefix = token.split(".", 1)[0]

        def read(s: Session) -> tuple[Any, list[tuple[str, list[str] | None]]]:
            found = s.execute(_KEY_ROW.where(ApiKey.key_prefix == prefix)).one_or_none()
            return found, identity.assigned_roles(s, found.user_id if found is not None else None)

        row, assigned = await self.db.run(read, SESSION_READ)
        now = time.monotonic()
        # Whatever the secret, these are refused before any hash.
        if row is None:
            return _Known(None, "the API key is not valid", None, now)
        if row.revoke_time is not None:
            return _Known(None, "the API key was revoked", None, now)
        if row.expire_time is not None and row.expire_time <= utcnow():
            return _Known(None, "the credentials have expired", None, now, reason="EXPIRED_CREDENTIALS")
        if row.user_id is not None and (not row.owner_active or row.owner_deleted is not None):
            return _Known(None, "the API key acts for a user who is not active", None, now)
        # The slow hash runs once per key and process, and for every new wrong secret (limited).
        proven = earlier is not None and earlier.principal is not None and earlier.principal.actor_id == row.id
        if not proven:
            subjects = {"key_prefix": prefix, "peer": peer_address(peer())}
            stamp = self.limiter.attempt(**subjects)
            verify = functools.partial(secrets.verify_secret, row.secret_hash, token)
            if not await asyncio.get_running_loop().run_in_executor(self._hashing, verify):
                return _Known(None, "the API key is not valid", None, time.monotonic())
            self.limiter.succeeded(stamp, **subjects)
        # A key never does more than its user may do now.
        role = row.role if row.user_id is None else lower_role(row.role, row.owner_role)
        principal = Principal("api_key", row.id, role, row.user_id, policy.held_permissions(assigned), frozenset(row.scopes or ()))
        return _Known(principal, "", row.expire_time, time.monotonic(), row.last_used_time)

    async def _check_jwt(self, token: str) -> _Known:
        now = time.monotonic()
        if self.jwt.hs256_secret:
            key, algorithm = self.jwt.hs256_secret, "HS256"
        elif self.jwt.rs256_public_key:
            key, algorithm = self.jwt.rs256_public_key, "RS256"
        else:  # _check sends a token here only when one is set (JwtSettings.enabled)
            return _Known(None, "the credentials are not a valid API key or JWT", None, now)
        required = ["exp", "iat", "sub", *(["iss"] if self.jwt.issuer else []), *(["aud"] if self.jwt.audience else [])]
        try:
            claims = jwt.decode(
                token,
                key,
                algorithms=[algorithm],
                issuer=self.jwt.issuer,
                audience=self.jwt.audience,
                options={"require": required, "verify_aud": self.jwt.audience is not None},
            )
        except jwt.ExpiredSignatureError:
            return _Known(None, "the JWT has expired", None, now, reason="EXPIRED_CREDENTIALS")
        except jwt.PyJWTError as exc:
            return _Known(None, f"the JWT is not valid: {exc}", None, now)
        longest = self.jwt.max_lifetime_seconds
        issued, expires_at = int(claims["iat"]), int(claims["exp"])
        if expires_at - issued > longest or expires_at - time.time() > longest or issued > time.time() + 60:
            return _Known(None, f"the JWT's lifetime (iat to exp) must be at most {longest:g} s and start now", None, now)
        subject = str(claims["sub"])
        def read(s: Session) -> tuple[Any, list[tuple[str, list[str] | None]]]:
            user = s.execute(
                select(User.id, User.role, User.is_active).where(User.external_id == subject, User.delete_time.is_(None))
            ).one_or_none()
            return user, identity.assigned_roles(s, user.id if user is not None else None)

        found, assigned = await self.db.run(read, SESSION_READ)
        if found is None or not found.is_active:
            return _Known(None, "the JWT's subject is not an active user", None, now)
        # The claim may lower the user's role for this token, never raise it.
        # A claim the server does not know is refused, not ignored: a restriction must not fail open.
        claimed = claims.get(self.jwt.role_claim, found.role)
        if not (isinstance(claimed, str) and claimed in ROLE_RANK):
            known = ", ".join(ROLE_RANK)
            return _Known(None, f"the JWT's {self.jwt.role_claim} claim {claimed!r} is not one of {known}", None, now)
        role = lower_role(claimed, found.role)
        expires = dt.datetime.fromtimestamp(expires_at, dt.UTC)
        return _Known(Principal("user", found.id, role, found.id, policy.held_permissions(assigned)), "", expires, now)
