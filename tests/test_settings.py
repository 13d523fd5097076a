"""Every setting with a wrong value stops the server before it starts, in one line naming it."""
from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import pytest

from db.database import Database
from service.config import BOOLEANS, NUMBERS, Config, ConfigError

NEXUS_DATA = Path(sys.executable).parent / "nexus-data"


def _wrong_values(kind: type, least: float, most: float | None) -> list[str]:
    wrong = ["lots", "nan" if kind is float else "1.5"]
    below = least - (1 if kind is int else max(abs(least) / 2, 0.001))
    wrong.append(str(int(below)) if kind is int else repr(below))
    if most is not None:
        wrong.append(str(int(most) + 1) if kind is int else repr(most * 2))
    return wrong


@pytest.mark.parametrize("variable, kind, least, most", [(v, k, lo, hi) for v, k, lo, hi in NUMBERS.values()], ids=[v for v, *_ in NUMBERS.values()])
def test_every_numeric_setting_refuses_what_is_not_a_number_in_range(variable: str, kind: type, least: float, most: float | None) -> None:
    for raw in _wrong_values(kind, least, most):
        with pytest.raises(ConfigError, match=variable):
            Config.from_env({variable: raw})
    # Its least and most are taken, as its type.
    for good in (least, most):
        if good is not None and not math.isinf(good):
            value = kind(good) if kind is int else good
            assert Config.from_env({variable: str(value)}) is not None


@pytest.mark.parametrize("variable", sorted(BOOLEANS.values()))
def test_every_boolean_setting_refuses_what_is_not_true_or_false(variable: str) -> None:
    with pytest.raises(ConfigError, match=variable):
        Config.from_env({variable: "maybe"})
    assert Config.from_env({variable: "off"}) is not None


@pytest.mark.parametrize(
    "env, variable",
    [
        ({"LOG_LEVEL": "chatty"}, "LOG_LEVEL"),
        ({"LOG_FORMAT": "xml"}, "LOG_FORMAT"),
        ({"NEXUS_ACCESS_LOG": "some"}, "NEXUS_ACCESS_LOG"),
        ({"NEXUS_JWT_ROLE_CLAIM": " "}, "NEXUS_JWT_ROLE_CLAIM"),
        ({"NEXUS_TLS_CERT": "cert.pem"}, "NEXUS_TLS_KEY"),
        ({"DB_HOST": "db", "DB_PORT": "99999"}, "DB_PORT"),
        ({"DB_NAME": "nexus", "DB_USER": "app"}, "DB_HOST"),  # without it: SQLite, silently
        ({"DATABASE_URL": "mysql://app@db/nexus"}, "DATABASE_URL"),  # no driver, no support
    ],
)
def test_other_settings_name_their_variable(env: dict[str, str], variable: str) -> None:
    with pytest.raises(ConfigError, match=variable):
        Config.from_env(env)


def test_a_flag_out_of_range_is_refused_too() -> None:
    with pytest.raises(ConfigError, match="NEXUS_PORT"):
        Config.from_env({}, port=70000)


@pytest.mark.parametrize("variable, value", [("NEXUS_STREAM_POLL_SECONDS", "0"), ("DB_POOL_SIZE", "ten"), ("NEXUS_MIGRATE_ON_START", "maybe")])
def test_serve_refuses_a_wrong_setting_in_one_line(tmp_path: Path, variable: str, value: str) -> None:
    env = {"PATH": "/usr/bin:/bin", "DB_PATH": str(tmp_path / "nexus.db"), variable: value}
    done = subprocess.run([str(NEXUS_DATA), "serve", "--port", "0"], env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and variable in lines[0] and lines[0].startswith("nexus-data: refusing to start:"), done.stderr
    assert not (tmp_path / "nexus.db").exists(), "nothing was created"


IN_MEMORY_URLS = [
    "sqlite://",
    "sqlite:///:memory:",
    "sqlite+pysqlite://",
    "sqlite:///file::memory:?cache=shared&uri=true",
    "sqlite:///file:nexus?mode=memory&uri=true",
]


@pytest.mark.parametrize("url", IN_MEMORY_URLS)
def test_an_in_memory_database_is_refused(url: str) -> None:
    """An in-memory SQLite database is lost with its connection, and each pool (reads, the write
    connection) and worker would get its own: the settings and Database refuse it, naming why."""
    with pytest.raises(ConfigError, match="DATABASE_URL names an in-memory SQLite database.*use a file path"):
        Config.from_env({"DATABASE_URL": url})
    with pytest.raises(ValueError, match="in-memory SQLite database.*use a file path"):
        Database(url)


def test_db_path_of_memory_is_refused_too() -> None:
    with pytest.raises(ConfigError, match="DB_PATH names an in-memory SQLite database"):
        Config.from_env({"DB_PATH": ":memory:"})


def test_a_database_file_is_still_taken(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'nexus.db'}"
    assert Config.from_env({"DATABASE_URL": url}).database_url == url
    database = Database(url)
    try:
        assert database.ping() and database.read_engine is not database.engine
    finally:
        database.dispose()


def test_serve_refuses_an_in_memory_database_in_one_line(tmp_path: Path) -> None:
    env = {"PATH": "/usr/bin:/bin", "DATABASE_URL": "sqlite://"}
    done = subprocess.run([str(NEXUS_DATA), "serve", "--port", "0"], env=env, capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("nexus-data: refusing to start: DATABASE_URL names an in-memory SQLite database"), done.stderr
    assert "use a file path" in lines[0]


@pytest.mark.parametrize(
    "url, shown",
    [
        ("postgresql+psycopg2://nexus:s3cret@db:5432/nexus", "postgresql+psycopg2://nexus:***@db:5432/nexus"),
        ("postgresql+psycopg2://nexus@db/nexus?password=s3cret&sslmode=require", "postgresql+psycopg2://nexus@db/nexus?password=***&sslmode=require"),
        ("postgresql+psycopg2://nexus@db/nexus?sslpassword=s3cret&PGPASSWORD=s3cret", "postgresql+psycopg2://nexus@db/nexus?sslpassword=***&PGPASSWORD=***"),
        ("postgresql+psycopg2://nexus@/nexus?host=/run/postgresql", "postgresql+psycopg2://nexus@/nexus?host=/run/postgresql"),
        ("sqlite:///data/nexus.db", "sqlite:///data/nexus.db"),
    ],
    ids=["userinfo", "query-password", "query-other-passwords", "no-password", "sqlite"],
)
def test_a_logged_database_url_has_no_password(url: str, shown: str) -> None:
    """The one redaction of every URL the service logs (Config.describe, the data places, the
    refusals): the user's password and the query's password keys."""
    from service.config import redacted_url

    assert redacted_url(url) == shown
    config = Config.from_env({"DATABASE_URL": url})
    assert config.describe()["database_url"] == shown
    assert "s3cret" not in repr(config.describe())
