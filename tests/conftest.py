"""Shared fixtures: a real drop folder, archive and database (SQLite and PostgreSQL) per test."""

import os
import threading
import time
import uuid
from pathlib import Path

import pytest

from watcher import config as config_module
from watcher import models

PG_SERVER = os.environ.get("WATCHER_TEST_PG", "postgresql://postgres@127.0.0.1:5432")
REQUIRE_PG = os.environ.get("WATCHER_REQUIRE_POSTGRES") == "1"


def _pg_admin():
    import psycopg
    return psycopg.connect(PG_SERVER + "/test", autocommit=True, connect_timeout=3)


@pytest.fixture(scope="session")
def pg_database():
    """A database of our own on the PostgreSQL server, dropped at the end."""
    try:
        admin = _pg_admin()
    except Exception as exc:
        if REQUIRE_PG:
            pytest.fail(f"PostgreSQL required (WATCHER_REQUIRE_POSTGRES=1) but not reachable: {exc}")
        pytest.skip(f"no PostgreSQL server at {PG_SERVER}: {exc}")
    name = f"dw_test_{os.getpid()}_{uuid.uuid4().hex[:6]}"
    with admin:
        admin.execute(f'CREATE DATABASE "{name}"')
    yield f"{PG_SERVER}/{name}"
    with _pg_admin() as admin:  # a new connection: a test may have restarted the server
        admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request, tmp_path):
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path}/watcher.db"
    url = request.getfixturevalue("pg_database")
    import psycopg
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("DROP SCHEMA public CASCADE")
        conn.execute("CREATE SCHEMA public")
    return url


def wait_for(predicate, timeout=30.0, step=0.02) -> bool:
    """Poll ``predicate`` until it holds or ``timeout`` seconds pass."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(step)
    return False


def make_config(tmp_path: Path, db_url: str, **overrides):
    """A Config on real folders below tmp_path; overrides as {"watch": {...}, ...}."""
    data = {
        "watch": {"drop_dir": "drop", "settle_seconds": 1, "incomplete_seconds": 60},
        "archive": {"dir": "archive", "rejected_dir": "rejected"},
        "database": {"url": db_url},
        "import": {"node": "test-node"},
    }
    for section, values in overrides.items():
        data.setdefault(section, {}).update(values)
    cfg = config_module.from_dict(data, base=tmp_path)
    cfg.watch.drop_dir.mkdir(parents=True, exist_ok=True)
    return cfg


def write_config_file(tmp_path: Path, db_url: str, **overrides) -> Path:
    """The same config as make_config, as a TOML file for the CLI and subprocesses."""
    cfg = make_config(tmp_path, db_url, **overrides)
    lines = []
    for section, obj in (("watch", cfg.watch), ("archive", cfg.archive),
                         ("database", cfg.database), ("import", cfg.import_)):
        lines.append(f"[{section}]")
        for key, value in vars(obj).items():
            if value is None:
                continue
            if isinstance(value, Path):
                value = str(value)
            if isinstance(value, tuple):
                value = list(value)
            lines.append(f"{key} = {_toml(value)}")
    path = tmp_path / "watcher.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


def _toml(value):
    import json
    if isinstance(value, bool):
        return "true" if value else "false"
    return json.dumps(value)


@pytest.fixture
def config(tmp_path, db_url):
    cfg = make_config(tmp_path, db_url)
    db = models.connect(cfg.database.url)
    yield cfg
    db.close()


@pytest.fixture(autouse=True)
def no_threads_left_behind():
    """No observer, scheduler or worker thread may outlive its test."""
    before = set(threading.enumerate())
    yield
    deadline = threading.Event()
    for _ in range(50):
        extra = [t for t in threading.enumerate() if t not in before and t.is_alive()]
        if not extra:
            return
        deadline.wait(0.1)
    pytest.fail(f"threads left running: {[t.name for t in extra]}")
