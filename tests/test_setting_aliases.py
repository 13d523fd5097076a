"""The earlier layers' setting names: read as ours with a warning naming both, ours winning when
both are set, the ones with no counterpart warned about as ignored, and a wrong value refused
naming the earlier name."""
from __future__ import annotations

import logging
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy.engine import make_url

from service.config import ALIASES, IGNORED_SETTINGS, Config, ConfigError, log_setting_warnings

NEXUS_DATA = Path(sys.executable).parent / "nexus-data"


def _url(config: Config) -> Any:
    return make_url(config.database_url)


# earlier name -> (other variables it needs, its value, what the Config makes of it)
ALIAS_CASES: dict[str, tuple[dict[str, str], str, Callable[[Config], Any]]] = {
    "DATABASE_HOST": ({}, "db.internal", lambda c: _url(c).host),
    "DATABASE_PORT": ({"DB_HOST": "db"}, "6543", lambda c: _url(c).port),
    "DATABASE_NAME": ({"DB_HOST": "db"}, "platform", lambda c: _url(c).database),
    "DATABASE_USER": ({"DB_HOST": "db"}, "app", lambda c: _url(c).username),
    "DATABASE_PASSWORD": ({"DB_HOST": "db"}, "s3cret", lambda c: _url(c).password),
    "POOL_SIZE": ({}, "7", lambda c: c.pool.size),
    "MAX_OVERFLOW": ({}, "3", lambda c: c.pool.max_overflow),
    "POOL_TIMEOUT": ({}, "2.5", lambda c: c.pool.timeout),
    "POOL_RECYCLE": ({}, "600", lambda c: c.pool.recycle),
    "SQL_ECHO": ({}, "true", lambda c: c.db_echo),
}
EXPECTED = {
    "DATABASE_HOST": "db.internal", "DATABASE_PORT": 6543, "DATABASE_NAME": "platform", "DATABASE_USER": "app",
    "DATABASE_PASSWORD": "s3cret", "POOL_SIZE": 7, "MAX_OVERFLOW": 3, "POOL_TIMEOUT": 2.5, "POOL_RECYCLE": 600, "SQL_ECHO": True,
}
# A value ours (our name's default) never has, to show which one was taken.
OURS_VALUE = {
    "DB_HOST": ("other.internal", "other.internal"), "DB_PORT": ("5433", 5433), "DB_NAME": ("ours", "ours"), "DB_USER": ("ours", "ours"),
    "DB_PASSWORD": ("ours", "ours"), "DB_POOL_SIZE": ("9", 9), "DB_MAX_OVERFLOW": ("8", 8), "DB_POOL_TIMEOUT": ("4", 4.0),
    "DB_POOL_RECYCLE": ("900", 900), "DB_ECHO": ("false", False),
}


def test_every_earlier_name_has_a_case() -> None:
    assert set(ALIAS_CASES) == set(ALIASES) == set(EXPECTED)
    assert set(OURS_VALUE) == set(ALIASES.values())


@pytest.mark.parametrize("alias", sorted(ALIASES))
def test_an_earlier_name_is_read_as_ours_with_a_warning(alias: str, caplog: pytest.LogCaptureFixture) -> None:
    needs, value, read = ALIAS_CASES[alias]
    config = Config.from_env({**needs, alias: value})
    assert read(config) == EXPECTED[alias]
    # The same as our name gives.
    assert read(Config.from_env({**needs, ALIASES[alias]: value})) == EXPECTED[alias]
    with caplog.at_level(logging.WARNING, logger="nexus.config"):
        log_setting_warnings(config)
    lines = [r.getMessage() for r in caplog.records if r.name == "nexus.config"]
    assert lines == [f"{alias} is the earlier name of {ALIASES[alias]}: its value is used as {ALIASES[alias]}; rename it to {ALIASES[alias]}"]
    assert all(r.levelno == logging.WARNING for r in caplog.records)


@pytest.mark.parametrize("alias", sorted(ALIASES))
def test_ours_wins_when_both_are_set(alias: str) -> None:
    needs, value, read = ALIAS_CASES[alias]
    ours = ALIASES[alias]
    raw, expected = OURS_VALUE[ours]
    config = Config.from_env({**needs, alias: value, ours: raw})
    assert read(config) == expected
    assert config.setting_warnings == (f"{alias} is ignored: {ours} is set too and wins ({alias} is the earlier name of {ours})",)


def test_database_url_wins_over_the_earlier_host_settings_as_over_ours() -> None:
    url = "postgresql+psycopg2://nexus@db:5432/nexus"
    config = Config.from_env({"DATABASE_URL": url, "DATABASE_HOST": "elsewhere", "DATABASE_PORT": "6543", "POOL_SIZE": "4"})
    assert config.database_url == url and config.pool.size == 4
    assert config.setting_warnings == (
        "DATABASE_HOST is ignored: DATABASE_URL is set and wins (DATABASE_HOST is the earlier name of DB_HOST)",
        "DATABASE_PORT is ignored: DATABASE_URL is set and wins (DATABASE_PORT is the earlier name of DB_PORT)",
        "POOL_SIZE is the earlier name of DB_POOL_SIZE: its value is used as DB_POOL_SIZE; rename it to DB_POOL_SIZE",
    )


@pytest.mark.parametrize("name", sorted(IGNORED_SETTINGS))
def test_a_setting_with_no_counterpart_is_warned_about_as_ignored(name: str, caplog: pytest.LogCaptureFixture) -> None:
    config = Config.from_env({name: "redis://localhost:6379"})
    assert config == Config.from_env({})
    with caplog.at_level(logging.WARNING, logger="nexus.config"):
        log_setting_warnings(config)
    assert [r.getMessage() for r in caplog.records] == [f"{name} is ignored: the service uses no Redis: it caches nothing outside its database"]


def test_no_warning_without_earlier_names() -> None:
    assert Config.from_env({"DB_POOL_SIZE": "3", "DB_HOST": "db"}).setting_warnings == ()


@pytest.mark.parametrize(
    "env, message",
    [
        ({"DATABASE_HOST": ""}, r"^DATABASE_HOST \(the earlier name of DB_HOST\) is set but empty"),
        ({"DATABASE_HOST": "db", "DATABASE_PORT": "99999"}, r"^DATABASE_PORT \(the earlier name of DB_PORT\) must be a port number"),
        ({"DATABASE_NAME": "nexus", "DATABASE_USER": "app"}, r"^DATABASE_NAME \(the earlier name of DB_NAME\), DATABASE_USER \(.*\) are set but DB_HOST is not"),
        ({"DATABASE_PASSWORD": "x"}, r"^DATABASE_PASSWORD \(the earlier name of DB_PASSWORD\) is set but DB_HOST is not"),
        ({"POOL_SIZE": "ten"}, r"^POOL_SIZE \(the earlier name of DB_POOL_SIZE\)='ten' is not a whole number"),
        ({"POOL_SIZE": "0"}, r"^POOL_SIZE \(the earlier name of DB_POOL_SIZE\) must be at least 1, not 0"),
        ({"MAX_OVERFLOW": "-1"}, r"^MAX_OVERFLOW \(the earlier name of DB_MAX_OVERFLOW\) must be at least 0"),
        ({"POOL_TIMEOUT": "soon"}, r"^POOL_TIMEOUT \(the earlier name of DB_POOL_TIMEOUT\)='soon' is not a number"),
        ({"POOL_TIMEOUT": "0"}, r"^POOL_TIMEOUT \(the earlier name of DB_POOL_TIMEOUT\) must be at least 0.001"),
        ({"POOL_RECYCLE": "0"}, r"^POOL_RECYCLE \(the earlier name of DB_POOL_RECYCLE\) must be at least 1"),
        ({"SQL_ECHO": "maybe"}, r"^SQL_ECHO \(the earlier name of DB_ECHO\)='maybe' is not true or false"),
    ],
)
def test_a_wrong_value_of_an_earlier_name_is_refused_naming_it(env: dict[str, str], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        Config.from_env(env)


def test_a_wrong_value_under_an_earlier_name_that_ours_overrides_is_not_read() -> None:
    assert Config.from_env({"POOL_SIZE": "ten", "DB_POOL_SIZE": "3"}).pool.size == 3


def test_a_command_logs_the_warnings(tmp_path: Path) -> None:
    env = {"PATH": "/usr/bin:/bin", "DB_PATH": str(tmp_path / "nexus.db"), "POOL_SIZE": "3", "REDIS_URL": "redis://cache:6379"}
    done = subprocess.run([str(NEXUS_DATA), "migrate"], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "POOL_SIZE is the earlier name of DB_POOL_SIZE: its value is used as DB_POOL_SIZE" in done.stderr
    assert "REDIS_URL is ignored: the service uses no Redis" in done.stderr


def test_serve_refuses_a_wrong_earlier_name_in_one_line(tmp_path: Path) -> None:
    env = {"PATH": "/usr/bin:/bin", "DB_PATH": str(tmp_path / "nexus.db"), "POOL_SIZE": "ten", "REDIS_URL": "redis://cache:6379"}
    done = subprocess.run([str(NEXUS_DATA), "serve", "--port", "0"], env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert lines == ["nexus-data: refusing to start: POOL_SIZE (the earlier name of DB_POOL_SIZE)='ten' is not a whole number"], done.stderr
    assert not (tmp_path / "nexus.db").exists()
