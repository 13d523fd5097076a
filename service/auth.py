"""Authentication: `authorization: Bearer <API key | JWT>` on every RPC but health and reflection.

API keys: the secret is `<prefix>.<random>`; the prefix finds the row, an argon2id hash check
proves the secret. A proven key is cached by a SHA-256 of the secret, and its row (revoked?
expired? role?) is re-read at most every `recheck_seconds`, so a revocation through any replica
takes effect within that time (at once on the replica that revoked it) and the slow hash runs
once per key, not once per call. JWTs (PyJWT): HS256 with a shared secret or RS256 with the
issuer's public key; `sub` is the user's external_id, the role claim (default "role") its role.
"""
from __future__ import annotations

import asyncio
import datetime as dt
import hashlib
import time
import uuid
from dataclasses import dataclass

import jwt
from sqlalchemy import select, update
from sqlalchemy.orm import Session

from db import errors, secrets
from db.base import utcnow
from db.database import CREDENTIALS_CHANGED_KEY, Database
from db.models import ApiKey, User
from db.policy import ROLE_RANK


@dataclass(frozen=True)
class Principal:
    """Who is calling."""

    actor_type: str  # "api_key", "user" or "system"
    actor_id: uuid.UUID | None
    role: str
    user_id: uuid.UUID | None  # the user the caller acts as, if any


INSECURE_PRINCIPAL = Principal("system", None, "admin", None)


@dataclass(frozen=True)
class JwtSettings:
    hs256_secret: str | None = None
    rs256_public_key: str | None = None  # PEM text
    issuer: str | None = None
    audience: str | None = None
    role_claim: str = "role"

    @property
    def enabled(self) -> bool:
        return bool(self.hs256_secret or self.rs256_public_key)


@dataclass
class _Known:
    """A checked credential: valid or not, and when its row was last read."""

    principal: Principal | None
    problem: str
    expire_time: dt.datetime | None
    checked_at: float
    last_used: dt.datetime | None = None
    reason: str = "INVALID_CREDENTIALS"


class Authenticator:
    recheck_seconds = 5.0
    last_used_resolution = dt.timedelta(minutes=1)
    max_cached = 10_000

    def __init__(self, db: Database, jwt_settings: JwtSettings | None = None) -> None:
        self.db = db
        self.jwt = jwt_settings or JwtSettings()
        self._known: dict[str, _Known] = {}
        self._checking: dict[str, asyncio.Future[_Known]] = {}
        # A key or user changed through this replica: its cached checks go at once.
        db.add_commit_listener(self._on_commit)

    def _on_commit(self, notes: dict[str, object]) -> None:
        if notes.get(CREDENTIALS_CHANGED_KEY):
            # Stale, not forgotten: the next call re-reads the row (a primary-key lookup) but a
            # key already proven by its hash is not hashed again.
            for known in list(self._known.values()):
                known.checked_at = float("-inf")

    async def authenticate(self, header: str | None) -> Principal:
        if not header:
            raise errors.Unauthenticated("missing credentials: send 'authorization: Bearer <API key or JWT>'", reason="MISSING_CREDENTIALS")
        scheme, _, token = header.partition(" ")
        token = token.strip()
        if scheme.lower() != "bearer" or not token:
            raise errors.Unauthenticated("the authorization header must be 'Bearer <API key or JWT>'", reason="MALFORMED_CREDENTIALS")
        digest = hashlib.sha256(token.encode()).hexdigest()
        known = self._known.get(digest)
        if known is None or time.monotonic() - known.checked_at > self.recheck_seconds:
            # Concurrent first calls with one credential share one check (one slow hash).
            pending = self._checking.get(digest)
            if pending is None:
                pending = asyncio.ensure_future(self._check(token, known))
                self._checking[digest] = pending
                pending.add_done_callback(lambda _: self._checking.pop(digest, None))
            known = await asyncio.shield(pending)
            if len(self._known) >= self.max_cached:
                self._known.clear()
            self._known[digest] = known
        if known.principal is None:
            raise errors.Unauthenticated(known.problem, reason=known.reason)
        if known.expire_time is not None and known.expire_time <= utcnow():
            raise errors.Unauthenticated("the credentials have expired", reason="EXPIRED_CREDENTIALS")
        return known.principal

    async def _check(self, token: str, earlier: _Known | None) -> _Known:
        if token.startswith("nx_") and "." in token:
            known = await self.db.run(lambda s: self._check_key(s, token, earlier), write=False)
            if known.principal is not None and (known.last_used is None or utcnow() - known.last_used > self.last_used_resolution):
                key_id = known.principal.actor_id
                await self.db.run(lambda s: s.execute(update(ApiKey).where(ApiKey.id == key_id).values(last_used_time=utcnow())))
            return known
        if self.jwt.enabled and token.count(".") == 2:
            return await self._check_jwt(token)
        return _Known(None, "the credentials are not a valid API key or JWT", None, time.monotonic())

    @staticmethod
    def _check_key(session: Session, token: str, earlier: _Known | None) -> _Known:
        now = time.monotonic()
        prefix = token.split(".", 1)[0]
        row = session.scalars(select(ApiKey).where(ApiKey.key_prefix == prefix)).one_or_none()
        proven = earlier is not None and earlier.principal is not None and row is not None and earlier.principal.actor_id == row.id
        # The slow hash runs once per key and process (and for every new wrong secret).
        if row is None or not (proven or secrets.verify_secret(row.secret_hash, token)):
            return _Known(None, "the API key is not valid", None, now)
        if row.revoke_time is not None:
            return _Known(None, "the API key was revoked", None, now)
        if row.user_id is not None:
            owner = session.execute(select(User.is_active, User.delete_time).where(User.id == row.user_id)).one_or_none()
            if owner is None or not owner.is_active or owner.delete_time is not None:
                return _Known(None, "the API key acts for a user who is not active", None, now)
        principal = Principal("api_key", row.id, row.role, row.user_id)
        return _Known(principal, "", row.expire_time, now, row.last_used_time)

    async def _check_jwt(self, token: str) -> _Known:
        now = time.monotonic()
        key = self.jwt.hs256_secret or self.jwt.rs256_public_key
        algorithm = "HS256" if self.jwt.hs256_secret else "RS256"
        try:
            claims = jwt.decode(
                token,
                key,
                algorithms=[algorithm],
                issuer=self.jwt.issuer,
                audience=self.jwt.audience,
                options={"require": ["exp", "sub"], "verify_aud": self.jwt.audience is not None},
            )
        except jwt.ExpiredSignatureError:
            return _Known(None, "the JWT has expired", None, now, reason="EXPIRED_CREDENTIALS")
        except jwt.PyJWTError as exc:
            return _Known(None, f"the JWT is not valid: {exc}", None, now)
        subject = str(claims["sub"])
        found = await self.db.run(
            lambda s: s.execute(
                select(User.id, User.role, User.is_active).where(User.external_id == subject, User.delete_time.is_(None))
            ).one_or_none(),
            write=False,
        )
        if found is None or not found.is_active:
            return _Known(None, "the JWT's subject is not an active user", None, now)
        role = claims.get(self.jwt.role_claim)
        role = role if isinstance(role, str) and role in ROLE_RANK else found.role
        expires = dt.datetime.fromtimestamp(int(claims["exp"]), dt.timezone.utc)
        return _Known(Principal("user", found.id, role, found.id), "", expires, now)
