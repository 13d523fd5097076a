"""Configuration: one typed object from environment variables and command-line flags."""
from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy.engine import make_url

from db.database import PoolSettings

DEFAULT_DB_PATH = "data/nexus.db"


def _bool(value: str) -> bool:
    if value.strip().lower() in ("1", "true", "yes", "on"):
        return True
    if value.strip().lower() in ("0", "false", "no", "off", ""):
        return False
    raise ValueError(f"not a boolean: {value!r}")


def _number_at_least(env: Mapping[str, str], name: str, default: Any, minimum: Any) -> Any:
    """The setting `name`, of default's type (int or float); a ValueError naming it when it is
    not such a number, or is below minimum."""
    raw = env.get(name)
    if raw is None or raw.strip() == "":
        return default
    kind = type(default)
    try:
        value = kind(raw)
    except ValueError:
        raise ValueError(f"{name} must be {'an integer' if kind is int else 'a number'}, got {raw!r}") from None
    if not value >= minimum:  # NaN too
        raise ValueError(f"{name} must be at least {minimum}, got {raw}")
    return value


def normalize_url(url: str) -> str:
    """postgres:// and postgresql:// URLs use psycopg2 explicitly."""
    for prefix in ("postgres://", "postgresql://"):
        if url.startswith(prefix):
            return "postgresql+psycopg2://" + url[len(prefix):]
    return url


def database_url_from_env(env: Mapping[str, str]) -> str:
    """DATABASE_URL wins; then DB_HOST/DB_PORT/DB_NAME/DB_USER/DB_PASSWORD (PostgreSQL); else DB_PATH (SQLite)."""
    if env.get("DATABASE_URL"):
        return normalize_url(env["DATABASE_URL"])
    if env.get("DB_HOST"):
        from sqlalchemy.engine import URL

        return URL.create(
            "postgresql+psycopg2",
            username=env.get("DB_USER", "postgres"),
            password=env.get("DB_PASSWORD") or None,
            host=env["DB_HOST"],
            port=int(env.get("DB_PORT", "5432")),
            database=env.get("DB_NAME", "nexus"),
        ).render_as_string(hide_password=False)
    return f"sqlite:///{env.get('DB_PATH', DEFAULT_DB_PATH)}"


class ConfigError(ValueError):
    """A setting with an invalid value: the message names its variable."""


# Credential settings: field -> (variable, type, the least valid value).
CREDENTIAL_SETTINGS: dict[str, tuple[str, type, float]] = {
    "jwt_max_lifetime_seconds": ("NEXUS_JWT_MAX_LIFETIME_SECONDS", float, 1),
    "auth_hash_workers": ("NEXUS_AUTH_HASH_WORKERS", int, 1),
    "auth_key_failure_limit": ("NEXUS_AUTH_KEY_FAILURE_LIMIT", int, 1),
    "auth_peer_failure_limit": ("NEXUS_AUTH_PEER_FAILURE_LIMIT", int, 1),
    "auth_failure_window_seconds": ("NEXUS_AUTH_FAILURE_WINDOW_SECONDS", float, 1),
    "auth_recheck_seconds": ("NEXUS_AUTH_RECHECK_SECONDS", float, 0),
}
MIN_HS256_SECRET_BYTES = 32


def _credential_settings(env: Mapping[str, str]) -> dict[str, Any]:
    values: dict[str, Any] = {}
    for name, (variable, kind, _) in CREDENTIAL_SETTINGS.items():
        if env.get(variable, "").strip():
            try:
                values[name] = kind(env[variable])
            except ValueError:
                raise ConfigError(f"{variable}={env[variable]!r} is not {'an integer' if kind is int else 'a number'}") from None
    if "NEXUS_BOOTSTRAP_KEY_FILE" in env:
        values["bootstrap_key_file"] = env["NEXUS_BOOTSTRAP_KEY_FILE"]
    return values


def check_credential_settings(config: "Config") -> None:
    """The server refuses to start with credentials it could not check well."""
    for name, (variable, _, least) in CREDENTIAL_SETTINGS.items():
        if not getattr(config, name) >= least:
            raise ConfigError(f"{variable} must be at least {least:g}, not {getattr(config, name)!r}")
    if config.bootstrap_key_file is not None and not config.bootstrap_key_file.strip():
        raise ConfigError("NEXUS_BOOTSTRAP_KEY_FILE must be a file path (unset it for the default)")
    if not (config.jwt_hs256_secret or config.jwt_rs256_public_key_file):
        return
    if config.jwt_hs256_secret and len(config.jwt_hs256_secret.encode()) < MIN_HS256_SECRET_BYTES:
        raise ConfigError(f"NEXUS_JWT_HS256_SECRET must be at least {MIN_HS256_SECRET_BYTES} bytes (RFC 7518 3.2: a key as long as the hash)")
    for value, variable in ((config.jwt_issuer, "NEXUS_JWT_ISSUER"), (config.jwt_audience, "NEXUS_JWT_AUDIENCE")):
        if not value:
            raise ConfigError(f"{variable} is required when JWTs are accepted: tokens of any other issuer or audience must be refused")


@dataclass(frozen=True)
class Config:
    database_url: str = f"sqlite:///{DEFAULT_DB_PATH}"
    host: str = "[::]"
    port: int = 50051
    # Server processes sharing the port (SO_REUSEPORT); each has its own engine and event loop.
    workers: int = 1
    pool: PoolSettings = field(default_factory=PoolSettings)
    db_echo: bool = False
    # True: apply pending migrations at start. False: refuse to start unless the schema is at head.
    migrate_on_start: bool = True
    max_message_bytes: int = 16 * 1024 * 1024
    max_concurrent_rpcs: int = 1000
    drain_seconds: float = 1.0
    grace_seconds: float = 10.0
    health_interval_seconds: float = 2.0
    log_level: str = "INFO"
    # Change log: how long events stay resumable, how often old ones are purged.
    event_retention_seconds: float = 7 * 24 * 3600.0
    event_purge_interval_seconds: float = 300.0
    # Live streams: events buffered per subscriber before it is cut off; the lost-NOTIFY poll.
    stream_queue_size: int = 1000
    stream_poll_seconds: float = 1.0
    # Authentication. insecure_dev turns it off (never in production: every caller is an admin).
    insecure_dev: bool = False
    jwt_hs256_secret: str | None = field(default=None, repr=False)
    jwt_rs256_public_key_file: str | None = None
    jwt_issuer: str | None = None
    jwt_audience: str | None = None
    jwt_role_claim: str = "role"
    # TLS: certificate and key to serve TLS; a client CA to require client certificates (mTLS).
    tls_cert: str | None = None
    tls_key: str | None = None
    tls_client_ca: str | None = None
    # argon2id cost of password and key hashes (argon2-cffi defaults: 3 passes, 64 MiB).
    hash_time_cost: int = 3
    hash_memory_kib: int = 65536
    # Credentials (service/auth.py): JWT lifetimes, the hash pool, failure limits, the first key.
    jwt_max_lifetime_seconds: float = 3600.0
    auth_hash_workers: int = 2
    auth_key_failure_limit: int = 10
    auth_peer_failure_limit: int = 50
    auth_failure_window_seconds: float = 300.0
    auth_recheck_seconds: float = 5.0
    bootstrap_key_file: str | None = None
    # Live streams and the caller's rights: open streams per caller (API key, JWT subject, the
    # insecure-dev caller), and how often every open stream's rights are re-read at the latest.
    max_streams_per_caller: int = 100
    stream_recheck_seconds: float = 1.0
    # Response size: a List or Search page is cut short (with a next_page_token) before it
    # passes this many bytes, or max_message_bytes if that is smaller. 4 MiB: what gRPC clients
    # accept by default.
    max_page_bytes: int = 4 * 1024 * 1024
    # How often the resident size is looked at; grown by 32 MiB since the last look, freed heap
    # memory goes back to the system (service/memory.py). 0: never.
    memory_trim_seconds: float = 2.0

    def __post_init__(self) -> None:
        check_credential_settings(self)

    @property
    def page_bytes(self) -> int:
        """The size a List or Search response stays within."""
        return min(self.max_page_bytes, self.max_message_bytes)

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None, **overrides: Any) -> "Config":
        env = os.environ if env is None else env
        pool = PoolSettings(
            size=int(env.get("DB_POOL_SIZE", PoolSettings.size)),
            max_overflow=int(env.get("DB_MAX_OVERFLOW", PoolSettings.max_overflow)),
            timeout=float(env.get("DB_POOL_TIMEOUT", PoolSettings.timeout)),
            recycle=int(env.get("DB_POOL_RECYCLE", PoolSettings.recycle)),
            pre_ping=_bool(env.get("DB_POOL_PRE_PING", "true")),
            ping_after=float(env.get("DB_POOL_PING_AFTER", PoolSettings.ping_after)),
        )
        values: dict[str, Any] = {
            "database_url": database_url_from_env(env),
            "host": env.get("NEXUS_HOST", cls.host),
            "port": int(env.get("NEXUS_PORT", cls.port)),
            "workers": int(env.get("NEXUS_WORKERS", cls.workers)),
            "pool": pool,
            "db_echo": _bool(env.get("DB_ECHO", "false")),
            "migrate_on_start": _bool(env.get("NEXUS_MIGRATE_ON_START", "true")),
            "max_message_bytes": int(env.get("NEXUS_MAX_MESSAGE_BYTES", cls.max_message_bytes)),
            "max_concurrent_rpcs": int(env.get("NEXUS_MAX_CONCURRENT_RPCS", cls.max_concurrent_rpcs)),
            "grace_seconds": float(env.get("NEXUS_GRACE_SECONDS", cls.grace_seconds)),
            "drain_seconds": float(env.get("NEXUS_DRAIN_SECONDS", cls.drain_seconds)),
            "hash_time_cost": int(env.get("NEXUS_HASH_TIME_COST", cls.hash_time_cost)),
            "hash_memory_kib": int(env.get("NEXUS_HASH_MEMORY_KIB", cls.hash_memory_kib)),
            "log_level": env.get("LOG_LEVEL", cls.log_level).upper(),
            "event_retention_seconds": float(env.get("NEXUS_EVENT_RETENTION_SECONDS", cls.event_retention_seconds)),
            "stream_queue_size": int(env.get("NEXUS_STREAM_QUEUE_SIZE", cls.stream_queue_size)),
            "stream_poll_seconds": float(env.get("NEXUS_STREAM_POLL_SECONDS", cls.stream_poll_seconds)),
            "jwt_hs256_secret": env.get("NEXUS_JWT_HS256_SECRET") or None,
            "jwt_rs256_public_key_file": env.get("NEXUS_JWT_RS256_PUBLIC_KEY_FILE") or None,
            "jwt_issuer": env.get("NEXUS_JWT_ISSUER") or None,
            "jwt_audience": env.get("NEXUS_JWT_AUDIENCE") or None,
            "jwt_role_claim": env.get("NEXUS_JWT_ROLE_CLAIM", cls.jwt_role_claim),
            "tls_cert": env.get("NEXUS_TLS_CERT") or None,
            "tls_key": env.get("NEXUS_TLS_KEY") or None,
            "tls_client_ca": env.get("NEXUS_TLS_CLIENT_CA") or None,
            **_credential_settings(env),
            "max_page_bytes": _number_at_least(env, "NEXUS_MAX_PAGE_BYTES", cls.max_page_bytes, 4096),
            "memory_trim_seconds": _number_at_least(env, "NEXUS_MEMORY_TRIM_SECONDS", cls.memory_trim_seconds, 0.0),
        }
        values.update(_stream_limits(env))
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)

    def describe(self) -> dict[str, Any]:
        """Every setting, with the database password masked: safe to log."""
        out = dataclasses.asdict(self)
        out["database_url"] = make_url(self.database_url).render_as_string(hide_password=True)
        if self.jwt_hs256_secret:
            out["jwt_hs256_secret"] = "***"
        return out


def _stream_limits(env: Mapping[str, str]) -> dict[str, Any]:
    """NEXUS_MAX_STREAMS_PER_CALLER (a whole number >= 1) and NEXUS_STREAM_RECHECK_SECONDS
    (0 < s <= 1: a right that ended ends its streams within about twice that)."""
    out: dict[str, Any] = {}
    for name, key, parse, valid, meaning in (
        ("NEXUS_MAX_STREAMS_PER_CALLER", "max_streams_per_caller", int, lambda v: v >= 1, "a whole number of at least 1"),
        ("NEXUS_STREAM_RECHECK_SECONDS", "stream_recheck_seconds", float, lambda v: 0 < v <= 1, "a number of seconds above 0 and at most 1"),
    ):
        raw = env.get(name)
        if raw is None:
            continue
        try:
            value = parse(raw)
        except ValueError:
            value = None
        if value is None or not valid(value):
            raise ValueError(f"{name} must be {meaning}, not {raw!r}")
        out[key] = value
    return out
