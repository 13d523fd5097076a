"""Configuration: one typed object from environment variables and command-line flags."""
from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy.engine import make_url

from db.blobs import DEFAULT_BLOB_DIR
from db.database import IN_MEMORY_REFUSED, PoolSettings, is_in_memory

# The data directory (NEXUS_DATA_DIR): where the SQLite file, the blob store and the first admin
# key's file go unless each is set on its own. Unset, it is the user's data directory,
# $XDG_DATA_HOME/nexus-data (by default ~/.local/share/nexus-data): the same from any working
# directory. A data/nexus.db under the working directory (where the service kept its data before
# the setting existed) is still used, with a warning at start, so an upgrade never starts on a
# new, empty database; the server logs the directory's absolute path.
LEGACY_DATA_DIR = "data"
DEFAULT_DATA_DIR_TEXT = "$XDG_DATA_HOME/nexus-data, by default ~/.local/share/nexus-data"
SQLITE_FILE_NAME = "nexus.db"


def legacy_data_dir() -> str | None:
    """data/ under the working directory when it holds a database (absolute), else None."""
    return os.path.abspath(LEGACY_DATA_DIR) if os.path.isfile(os.path.join(LEGACY_DATA_DIR, SQLITE_FILE_NAME)) else None


def default_data_dir(env: Mapping[str, str] | None = None) -> str:
    """The data directory when NEXUS_DATA_DIR is not set (absolute)."""
    env = os.environ if env is None else env
    legacy = legacy_data_dir()
    if legacy is not None:
        return legacy
    base = env.get("XDG_DATA_HOME", "")
    if not os.path.isabs(base):  # (the XDG rule: a relative value is ignored)
        base = os.path.join(env.get("HOME") or os.path.expanduser("~"), ".local", "share")
    return os.path.join(base, "nexus-data")


def default_database_url() -> str:
    return f"sqlite:///{os.path.join(default_data_dir(), SQLITE_FILE_NAME)}"
# The databases the service runs on: URL backend name -> what to call it.
SUPPORTED_BACKENDS = {"postgresql": "PostgreSQL (postgresql+psycopg2://...)", "sqlite": "SQLite (sqlite:///path)"}
# The one driver of each (the engine's SQL, its bulk paths and its error translation are theirs).
SUPPORTED_DRIVERS = {"postgresql": "psycopg2", "sqlite": "pysqlite"}


def normalize_url(url: str) -> str:
    """postgres:// and postgresql:// URLs use psycopg2 explicitly."""
    for prefix in ("postgres://", "postgresql://"):
        if url.startswith(prefix):
            return "postgresql+psycopg2://" + url[len(prefix):]
    return url


# The earlier layers' names of settings the service has under another name: earlier name ->
# ours. An earlier name is read as ours (with a warning that names both); ours wins when both
# are set; a wrong value is refused as ours would be, naming the earlier name.
ALIASES: dict[str, str] = {
    "DATABASE_HOST": "DB_HOST",
    "DATABASE_PORT": "DB_PORT",
    "DATABASE_NAME": "DB_NAME",
    "DATABASE_USER": "DB_USER",
    "DATABASE_PASSWORD": "DB_PASSWORD",
    "POOL_SIZE": "DB_POOL_SIZE",
    "MAX_OVERFLOW": "DB_MAX_OVERFLOW",
    "POOL_TIMEOUT": "DB_POOL_TIMEOUT",
    "POOL_RECYCLE": "DB_POOL_RECYCLE",
    "SQL_ECHO": "DB_ECHO",
}
# The earlier layers' settings with no counterpart here: name -> why it is ignored (warned
# about at start, never silently).
IGNORED_SETTINGS: dict[str, str] = {
    name: "the service uses no Redis: it caches nothing outside its database"
    for name in ("REDIS_URL", "REDIS_HOST", "REDIS_PORT", "REDIS_DB")
}
# The PostgreSQL settings DATABASE_URL wins over.
_DB_PARTS = ("DB_HOST", "DB_PORT", "DB_NAME", "DB_USER", "DB_PASSWORD")
_log = logging.getLogger("nexus.config")


def resolve_aliases(env: Mapping[str, str]) -> tuple[dict[str, str], dict[str, str], tuple[str, ...]]:
    """(the environment with each earlier name's value under our name, our name -> the earlier
    name it was read from, the warnings to log: one per earlier or ignored name that is set)."""
    resolved = dict(env)
    names: dict[str, str] = {}
    warnings: list[str] = []
    for alias, ours in ALIASES.items():
        if alias not in env:
            continue
        if env.get(ours, "").strip():
            warnings.append(f"{alias} is ignored: {ours} is set too and wins ({alias} is the earlier name of {ours})")
        elif ours in _DB_PARTS and env.get("DATABASE_URL", "").strip():
            warnings.append(f"{alias} is ignored: DATABASE_URL is set and wins ({alias} is the earlier name of {ours})")
        else:
            resolved[ours] = env[alias]
            names[ours] = alias
            warnings.append(f"{alias} is the earlier name of {ours}: its value is used as {ours}; rename it to {ours}")
    for name, why in IGNORED_SETTINGS.items():
        if name in env:
            warnings.append(f"{name} is ignored: {why}")
    return resolved, names, tuple(warnings)


def setting_name(variable: str, names: Mapping[str, str]) -> str:
    """How a message names the setting `variable`: by the earlier name it was read from, if so."""
    alias = names.get(variable)
    return f"{alias} (the earlier name of {variable})" if alias else variable


def log_setting_warnings(config: Config) -> None:
    """A WARNING line for each earlier name of a setting, and each ignored one, the environment set."""
    for line in config.setting_warnings:
        _log.warning("%s", line)


def _port(raw: str, names: Mapping[str, str] | None = None) -> int:
    if not raw.strip().isdigit() or not 0 < int(raw) < 65536:
        raise ConfigError(f"{setting_name('DB_PORT', names or {})} must be a port number (1 to 65535), not {raw!r}")
    return int(raw)


def _refuse_empty(env: Mapping[str, str], names: Mapping[str, str]) -> None:
    """A variable set to nothing (a Kubernetes secret's missing key, `export DATABASE_URL=`) is
    a mistake, never a request for the default: without this check an empty DATABASE_URL or
    DB_HOST would start on a new SQLite file."""
    for variable, instead in (
        ("DATABASE_URL", "unset it for SQLite in NEXUS_DATA_DIR"),
        ("DB_HOST", "unset it for SQLite in NEXUS_DATA_DIR"),
        ("DB_PATH", "unset it for nexus.db in NEXUS_DATA_DIR"),
        ("NEXUS_DATA_DIR", f"unset it for the default, {DEFAULT_DATA_DIR_TEXT}"),
    ):
        if variable in env and not env[variable].strip():
            raise ConfigError(f"{setting_name(variable, names)} is set but empty: give it a value, or {instead}")


def database_setting_from_env(env: Mapping[str, str], names: Mapping[str, str] | None = None) -> str:
    """The variables the database URL came from, for messages about it."""
    if env.get("DATABASE_URL"):
        return "DATABASE_URL"
    if env.get("DB_HOST"):
        if names and any(part in names for part in _DB_PARTS):
            return "/".join(names.get(part, part) for part in ("DB_HOST", "DB_PORT", "DB_NAME", "DB_USER"))
        return "DB_HOST/DB_PORT/DB_NAME/DB_USER"
    if env.get("DB_PATH"):
        return "DB_PATH"
    return "NEXUS_DATA_DIR" if env.get("NEXUS_DATA_DIR") else "DB_PATH/NEXUS_DATA_DIR"


def database_url_from_env(env: Mapping[str, str], names: Mapping[str, str] | None = None) -> str:
    """DATABASE_URL wins; then DB_HOST/DB_PORT/DB_NAME/DB_USER/DB_PASSWORD (PostgreSQL); else DB_PATH
    (SQLite), by default nexus.db in NEXUS_DATA_DIR. names: our name -> the earlier name it was
    read from (resolve_aliases), for the messages."""
    names = names or {}
    _refuse_empty(env, names)
    if env.get("DATABASE_URL"):
        return normalize_url(env["DATABASE_URL"].strip())
    stray = [setting_name(name, names) for name in ("DB_PORT", "DB_NAME", "DB_USER", "DB_PASSWORD") if env.get(name)]
    if stray and not env.get("DB_HOST"):
        raise ConfigError(
            f"{', '.join(stray)} {'is' if len(stray) == 1 else 'are'} set but DB_HOST is not: DB_HOST is what selects "
            "PostgreSQL (without it the service would use SQLite at DB_PATH); set DB_HOST, or unset them"
        )
    if env.get("DB_HOST"):
        from sqlalchemy.engine import URL

        return URL.create(
            "postgresql+psycopg2",
            username=env.get("DB_USER", "postgres"),
            password=env.get("DB_PASSWORD") or None,
            host=env["DB_HOST"],
            port=_port(env.get("DB_PORT", "5432"), names),
            database=env.get("DB_NAME", "nexus"),
        ).render_as_string(hide_password=False)
    return f"sqlite:///{env.get('DB_PATH') or os.path.join(env.get('NEXUS_DATA_DIR') or default_data_dir(env), SQLITE_FILE_NAME)}"


class ConfigError(ValueError):
    """A setting with an invalid value: the message names its variable."""


# Every numeric setting: field (pool.* in PoolSettings) -> (variable, type, least, most). Checked
# for every Config, however its values came (environment, flags, code): a wrong one stops the
# server before it starts, in one line naming the variable.
NUMBERS: dict[str, tuple[str, type, float, float | None]] = {
    "pool.size": ("DB_POOL_SIZE", int, 1, None),
    "pool.max_overflow": ("DB_MAX_OVERFLOW", int, 0, None),
    "pool.timeout": ("DB_POOL_TIMEOUT", float, 0.001, None),
    "pool.recycle": ("DB_POOL_RECYCLE", int, 1, None),
    "pool.ping_after": ("DB_POOL_PING_AFTER", float, 0, None),
    "db_wait_seconds": ("NEXUS_DB_WAIT_SECONDS", float, 0, None),
    "port": ("NEXUS_PORT", int, 0, 65535),
    "metrics_port": ("NEXUS_METRICS_PORT", int, 0, 65535),
    "workers": ("NEXUS_WORKERS", int, 1, 256),
    "max_message_bytes": ("NEXUS_MAX_MESSAGE_BYTES", int, 4096, 2**31 - 1),
    "max_concurrent_rpcs": ("NEXUS_MAX_CONCURRENT_RPCS", int, 1, None),
    "grace_seconds": ("NEXUS_GRACE_SECONDS", float, 0, None),
    "drain_seconds": ("NEXUS_DRAIN_SECONDS", float, 0, None),
    "hash_time_cost": ("NEXUS_HASH_TIME_COST", int, 1, None),
    "hash_memory_kib": ("NEXUS_HASH_MEMORY_KIB", int, 64, None),
    "event_retention_seconds": ("NEXUS_EVENT_RETENTION_SECONDS", float, 60, None),
    "stream_queue_size": ("NEXUS_STREAM_QUEUE_SIZE", int, 1, None),
    "stream_poll_seconds": ("NEXUS_STREAM_POLL_SECONDS", float, 0.05, None),
    "max_page_bytes": ("NEXUS_MAX_PAGE_BYTES", int, 4096, None),
    "exact_count_limit": ("NEXUS_EXACT_COUNT_LIMIT", int, 1, 2**31 - 2),
    "memory_trim_seconds": ("NEXUS_MEMORY_TRIM_SECONDS", float, 0, None),
    "usage_fold_seconds": ("NEXUS_USAGE_FOLD_SECONDS", float, 0, None),
    "malloc_arenas": ("NEXUS_MALLOC_ARENAS", int, 0, None),
    "max_streams_per_caller": ("NEXUS_MAX_STREAMS_PER_CALLER", int, 1, None),
    # A right that ended ends its streams within about twice this.
    "stream_recheck_seconds": ("NEXUS_STREAM_RECHECK_SECONDS", float, 0.01, 1),
    "jwt_max_lifetime_seconds": ("NEXUS_JWT_MAX_LIFETIME_SECONDS", float, 1, None),
    "auth_hash_workers": ("NEXUS_AUTH_HASH_WORKERS", int, 1, None),
    "auth_key_failure_limit": ("NEXUS_AUTH_KEY_FAILURE_LIMIT", int, 1, None),
    "auth_peer_failure_limit": ("NEXUS_AUTH_PEER_FAILURE_LIMIT", int, 1, None),
    "auth_failure_window_seconds": ("NEXUS_AUTH_FAILURE_WINDOW_SECONDS", float, 1, None),
    "auth_recheck_seconds": ("NEXUS_AUTH_RECHECK_SECONDS", float, 0, None),
    "max_file_bytes": ("NEXUS_MAX_FILE_BYTES", int, 1, None),
    "upload_idle_seconds": ("NEXUS_UPLOAD_IDLE_SECONDS", float, 0.1, None),
    "max_uploads_per_caller": ("NEXUS_MAX_UPLOADS_PER_CALLER", int, 1, None),
    "access_log_sample": ("NEXUS_ACCESS_LOG_SAMPLE", float, 0, 1),
}
BOOLEANS = {"pool.pre_ping": "DB_POOL_PRE_PING", "db_echo": "DB_ECHO", "migrate_on_start": "NEXUS_MIGRATE_ON_START"}
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
LOG_FORMATS = ("text", "json")
# Which calls get an access line (service/telemetry.py): every call, the failed ones, none.
ACCESS_LOG_MODES = ("all", "errors", "off")
MIN_HS256_SECRET_BYTES = 32


def _parsed(env: Mapping[str, str], names: Mapping[str, str] | None = None) -> dict[str, Any]:
    """The numeric and boolean settings the environment sets, by field; ConfigError naming the
    variable of one that is not a number (a boolean): the earlier name it was read from, if so."""
    names = names or {}
    values: dict[str, Any] = {}
    for name, (variable, kind, _, _) in NUMBERS.items():
        raw = env.get(variable, "").strip()
        if raw:
            try:
                values[name] = kind(raw)
            except ValueError:
                raise ConfigError(f"{setting_name(variable, names)}={raw!r} is not {'a whole number' if kind is int else 'a number'}") from None
    for name, variable in BOOLEANS.items():
        raw = env.get(variable, "").strip().lower()
        if raw in ("1", "true", "yes", "on"):
            values[name] = True
        elif raw in ("0", "false", "no", "off"):
            values[name] = False
        elif raw:
            raise ConfigError(f"{setting_name(variable, names)}={env[variable]!r} is not true or false")
    return values


def check_database_url(url: str, setting: str = "DATABASE_URL") -> None:
    """ConfigError naming `setting` unless url is a URL of a database the service runs on, with
    its driver (the URL, and its password, never repeated)."""
    if not url.strip():
        raise ConfigError(f"{setting} is empty: give a database URL (postgresql://user@host:5432/name or sqlite:///path)")
    try:
        parsed = make_url(url)
        port = parsed.port
    except Exception as exc:  # noqa: BLE001 - any parse failure
        detail = "its port is not a number" if isinstance(exc, ValueError) else "it cannot be parsed"
        raise ConfigError(f"{setting} is not a database URL: {detail} (postgresql://user@host:5432/name or sqlite:///path)") from None
    if port is not None and not 0 < port < 65536:
        raise ConfigError(f"{setting} names port {port}: a port is from 1 to 65535")
    backend = parsed.get_backend_name()
    if backend not in SUPPORTED_BACKENDS:
        raise ConfigError(f"{setting} names a {backend} database: the service runs on {' or '.join(SUPPORTED_BACKENDS.values())} only")
    driver = parsed.get_driver_name()
    if driver != SUPPORTED_DRIVERS[backend]:
        raise ConfigError(
            f"{setting} names the {backend} driver {driver}, which the service does not use: "
            f"write {backend}:// (or {backend}+{SUPPORTED_DRIVERS[backend]}://)"
        )
    if is_in_memory(url):
        raise ConfigError(f"{setting} {IN_MEMORY_REFUSED}")


def redacted_url(url: str) -> str:
    """The database URL as every log line and message shows it: the password of its user
    (user:***@) and the value of every query key naming a password (password, sslpassword, any
    *password*: libpq and psycopg2 take them from the query too) masked. A URL that cannot be
    parsed is not shown at all."""
    try:
        parsed = make_url(url)
    except Exception:  # noqa: BLE001 - any parse failure: nothing of it is shown
        return "(a URL that cannot be parsed)" if "://" in url or "@" in url else url
    shown = parsed.set(query={}).render_as_string(hide_password=True)
    query = [
        f"{key}={'***' if 'password' in key.lower() else value}"
        for key, values in parsed.query.items()
        for value in (values if isinstance(values, tuple) else (values,))
    ]
    return f"{shown}?{'&'.join(query)}" if query else shown


def check_settings(config: Config) -> None:
    """ConfigError naming the variable of the first setting out of its range."""
    check_database_url(config.database_url, config.database_setting)
    for name, (variable, _, least, most) in NUMBERS.items():
        owner, _, key = name.rpartition(".")
        value = getattr(getattr(config, owner) if owner else config, key)
        if not value >= least or (most is not None and value > most):  # NaN too
            allowed = f"from {least:g} to {most:g}" if most is not None else f"at least {least:g}"
            raise ConfigError(f"{setting_name(variable, config.setting_names)} must be {allowed}, not {value!r}")
    if config.metrics_port and config.metrics_port == config.port:
        raise ConfigError(f"NEXUS_METRICS_PORT must differ from NEXUS_PORT (both are {config.port}): the metrics are served over HTTP on a port of their own")
    if config.log_level not in LOG_LEVELS:
        raise ConfigError(f"LOG_LEVEL must be one of {', '.join(LOG_LEVELS)}, not {config.log_level!r}")
    if config.data_dir is not None and not config.data_dir.strip():
        raise ConfigError(f"NEXUS_DATA_DIR must be a directory path (unset it for the default, {DEFAULT_DATA_DIR_TEXT})")
    if config.log_format not in LOG_FORMATS:
        raise ConfigError(f"LOG_FORMAT must be one of {', '.join(LOG_FORMATS)}, not {config.log_format!r}")
    if config.access_log not in ACCESS_LOG_MODES:
        raise ConfigError(f"NEXUS_ACCESS_LOG must be one of {', '.join(ACCESS_LOG_MODES)}, not {config.access_log!r}")
    if config.blob_dir is not None and not config.blob_dir.strip():
        raise ConfigError("NEXUS_BLOB_DIR must be a directory path (unset it for the default, blobs beside the database)")
    if not config.jwt_role_claim.strip():
        raise ConfigError("NEXUS_JWT_ROLE_CLAIM must name a claim (unset it for the default, role)")
    if bool(config.tls_cert) != bool(config.tls_key):
        raise ConfigError("NEXUS_TLS_CERT and NEXUS_TLS_KEY (--tls-cert, --tls-key) are set together or not at all")
    check_credential_settings(config)


def check_credential_settings(config: Config) -> None:
    """The server refuses to start with credentials it could not check well."""
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
    database_url: str = field(default_factory=default_database_url)
    # The data directory when NEXUS_DATA_DIR is not set (default_data_dir of the environment the
    # configuration was read from).
    home_data_dir: str = field(default_factory=default_data_dir, compare=False)
    # Where database_url came from (a variable, or --database-url), for the messages about it.
    database_setting: str = field(default="DATABASE_URL", compare=False)
    # How long the first connection to PostgreSQL is retried at start (it may start after us).
    db_wait_seconds: float = 30.0
    # NEXUS_DATA_DIR; None: the SQLite file's directory, or data under the working directory.
    data_dir: str | None = None
    host: str = "[::]"
    port: int = 50051
    # The Prometheus endpoint (http://host:metrics_port/metrics, service/metrics.py); 0: none.
    metrics_port: int = 0
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
    # Log lines as text, or as one JSON object per line (service/telemetry.py).
    log_format: str = "text"
    # The access log: one line per call (all), per failed call (errors), or none (off); in "all",
    # this share of the successful calls (0 to 1; failed calls are always logged).
    access_log: str = "errors"
    access_log_sample: float = 1.0
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
    # A List's or Search's total_size is exact up to this many matches (its count stops there,
    # so its cost is bounded), an estimate above it (db/engine/reads.total_of); count_only
    # always counts exactly.
    exact_count_limit: int = 10_000
    # How often the resident size is looked at; 32 MiB above its lowest, freed heap
    # memory goes back to the system (service/memory.py). 0: never.
    memory_trim_seconds: float = 2.0
    # PostgreSQL: how often the rows the AI usage triggers appended are folded into one per day
    # and key (db/domains/ai_usage.fold_usage_days). 0: never (the sums stay right, the
    # summary reads more rows).
    usage_fold_seconds: float = 30.0
    # glibc heaps (arenas) of a server process, set as it starts (service/memory.py
    # limit_arenas); MALLOC_ARENA_MAX, when set, wins. 0: glibc's own limit, eight per core.
    malloc_arenas: int = 2
    # Files (FileService): the blob store's directory (None: `blobs` beside the SQLite file, or
    # data/blobs on PostgreSQL) and the largest file an upload may send.
    blob_dir: str | None = None
    max_file_bytes: int = 1024**3
    # An upload that sends nothing for this long is ended (DEADLINE_EXCEEDED, nothing kept), and a
    # caller has at most this many uploads open at once (more: RESOURCE_EXHAUSTED): so a caller's
    # stalled uploads hold neither slots of max_concurrent_rpcs nor temporary files for ever.
    upload_idle_seconds: float = 60.0
    max_uploads_per_caller: int = 4
    # Settings read from the earlier layers' names (our name -> that name), for the messages
    # about them; and the warnings about earlier or ignored names to log at start.
    setting_names: Mapping[str, str] = field(default_factory=dict, compare=False, repr=False)
    setting_warnings: tuple[str, ...] = field(default=(), compare=False, repr=False)

    def __post_init__(self) -> None:
        check_settings(self)

    @property
    def sqlite_path(self) -> str | None:
        """The SQLite file, absolute; None on PostgreSQL."""
        url = make_url(self.database_url)
        if url.get_backend_name() == "sqlite" and url.database:
            return os.path.abspath(url.database)
        return None

    @property
    def data_path(self) -> str:
        """The data directory, absolute: NEXUS_DATA_DIR, else the SQLite file's directory (by
        default the default data directory, where its nexus.db is), else the default data
        directory (PostgreSQL, whose data is elsewhere)."""
        if self.data_dir:
            return os.path.abspath(self.data_dir)
        sqlite = self.sqlite_path
        return os.path.dirname(sqlite) if sqlite else self.home_data_dir

    @property
    def blob_path(self) -> str:
        """The blob store's directory, absolute: NEXUS_BLOB_DIR, else blobs/ in the data
        directory (on PostgreSQL set NEXUS_DATA_DIR or NEXUS_BLOB_DIR to a shared volume, so
        every server and `blobs sweep` use the same store)."""
        if self.blob_dir:
            return os.path.abspath(self.blob_dir)
        return os.path.join(self.data_path, os.path.basename(DEFAULT_BLOB_DIR))

    @property
    def page_bytes(self) -> int:
        """The size a List or Search response stays within."""
        return min(self.max_page_bytes, self.max_message_bytes)

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None, **overrides: Any) -> Config:
        env, names, warnings = resolve_aliases(os.environ if env is None else env)
        parsed = _parsed(env, names)
        pool = PoolSettings(**{k.split(".", 1)[1]: v for k, v in parsed.items() if k.startswith("pool.")})
        values: dict[str, Any] = {k: v for k, v in parsed.items() if not k.startswith("pool.")}
        values.update(
            database_url=database_url_from_env(env, names),
            database_setting=database_setting_from_env(env, names),
            setting_names=names,
            setting_warnings=warnings,
            host=env.get("NEXUS_HOST", cls.host),
            pool=pool,
            log_level=env.get("LOG_LEVEL", cls.log_level).strip().upper(),
            log_format=(env.get("LOG_FORMAT", "").strip() or cls.log_format).lower(),
            access_log=(env.get("NEXUS_ACCESS_LOG", "").strip() or cls.access_log).lower(),
            jwt_hs256_secret=env.get("NEXUS_JWT_HS256_SECRET") or None,
            jwt_rs256_public_key_file=env.get("NEXUS_JWT_RS256_PUBLIC_KEY_FILE") or None,
            jwt_issuer=env.get("NEXUS_JWT_ISSUER") or None,
            jwt_audience=env.get("NEXUS_JWT_AUDIENCE") or None,
            jwt_role_claim=env.get("NEXUS_JWT_ROLE_CLAIM", cls.jwt_role_claim),
            tls_cert=env.get("NEXUS_TLS_CERT") or None,
            tls_key=env.get("NEXUS_TLS_KEY") or None,
            tls_client_ca=env.get("NEXUS_TLS_CLIENT_CA") or None,
        )
        values["home_data_dir"] = default_data_dir(env)
        if "NEXUS_DATA_DIR" in env:
            values["data_dir"] = env["NEXUS_DATA_DIR"]
        if "NEXUS_BLOB_DIR" in env:
            values["blob_dir"] = env["NEXUS_BLOB_DIR"]
        if "NEXUS_BOOTSTRAP_KEY_FILE" in env:
            values["bootstrap_key_file"] = env["NEXUS_BOOTSTRAP_KEY_FILE"]
        if overrides.get("database_url") is not None:
            values["database_setting"] = "--database-url"
            overrides = {**overrides, "database_url": normalize_url(overrides["database_url"].strip())}
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)

    def describe(self) -> dict[str, Any]:
        """Every setting, with the database password masked: safe to log."""
        out = dataclasses.asdict(self)
        del out["setting_names"], out["setting_warnings"]
        out["database_url"] = redacted_url(self.database_url)
        if self.jwt_hs256_secret:
            out["jwt_hs256_secret"] = "***"
        return out
