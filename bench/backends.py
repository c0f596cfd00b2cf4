"""The Import database as the benchmark sees it: made fresh for each run, read directly.

The service is a black box; these classes only create an empty database for it, ask
what it has recorded (plain SQL on the tables the migrations create) and drop it.
"""

from __future__ import annotations

import datetime
import os
import sqlite3
from pathlib import Path

# A file is accounted for once it has an instance row, a rejection row, or a history row
# saying it was a duplicate or a DICOMDIR (neither makes an instance).
ACCOUNTED_SQL = ("SELECT (SELECT count(*) FROM instance) + (SELECT count(*) FROM rejection)"
                 " + (SELECT count(*) FROM history WHERE outcome IN ('duplicate', 'dicomdir'))")
OUTCOME_SPAN_SQL = ("SELECT min(at), max(at) FROM history"
                    " WHERE outcome IN ('imported', 'duplicate', 'dicomdir', 'rejected')")
OUTCOMES_SQL = "SELECT outcome, count(*) FROM history GROUP BY outcome"
REASONS_SQL = "SELECT reason, count(*) FROM rejection GROUP BY reason"
IMPORTED_AT_SQL = "SELECT source, imported_at FROM instance"
POSTGRES_ADMIN = "postgresql://postgres@127.0.0.1:5432/postgres"


def to_epoch(value) -> float | None:
    """A stored UTC-naive timestamp (text in SQLite, datetime in PostgreSQL) as time.time()."""
    if value is None:
        return None
    if isinstance(value, str):
        value = datetime.datetime.fromisoformat(value)
    return value.replace(tzinfo=datetime.timezone.utc).timestamp()


class Backend:
    """One fresh database per service run: ``create()``, the queries, then ``drop()``."""

    name = "?"
    _conn = None  # the benchmark's own connection, opened by ``_query``

    def create(self, workdir: Path) -> str:
        """Make an empty database; return the URL for the service's config."""
        raise NotImplementedError

    def drop(self) -> None:
        raise NotImplementedError

    def _query(self, sql: str) -> list[tuple]:
        raise NotImplementedError

    def query(self, sql: str) -> list[tuple] | None:
        """Rows, or None while the service has not created the tables yet."""
        try:
            return self._query(sql)
        except Exception:  # no file, no table yet, the database is being migrated
            self.close()
            return None

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    def server_started(self):
        """When the database server last started (None for SQLite): a change means a restart."""
        return None

    def has_heartbeat(self) -> bool:
        rows = self.query("SELECT count(*) FROM heartbeat")
        return bool(rows and rows[0][0])

    def accounted(self) -> int:
        rows = self.query(ACCOUNTED_SQL)
        return rows[0][0] if rows else 0

    def outcome_span(self) -> tuple[float | None, float | None]:
        """When the first and the last file outcome were recorded (time.time() scale)."""
        rows = self.query(OUTCOME_SPAN_SQL)
        return (to_epoch(rows[0][0]), to_epoch(rows[0][1])) if rows else (None, None)

    def outcomes(self) -> dict[str, int]:
        return dict(self.query(OUTCOMES_SQL) or [])

    def rejection_reasons(self) -> dict[str, int]:
        return dict(self.query(REASONS_SQL) or [])

    def imported_at(self) -> dict[str, float]:
        """source (relative to the drop folder) -> when its instance row was written."""
        return {source: to_epoch(at) for source, at in self.query(IMPORTED_AT_SQL) or []}


class Sqlite(Backend):
    name = "sqlite"

    def __init__(self):
        self.path: Path | None = None
        self._conn = None

    def create(self, workdir: Path) -> str:
        self.path = workdir / "watcher.db"
        for suffix in ("", "-wal", "-shm"):
            Path(f"{self.path}{suffix}").unlink(missing_ok=True)
        return f"sqlite:///{self.path}"

    def _query(self, sql: str) -> list[tuple]:
        if self._conn is None:
            if not self.path.exists():  # never create the file before the service does
                raise FileNotFoundError(self.path)
            self._conn = sqlite3.connect(self.path, timeout=5, isolation_level=None)
        return self._conn.execute(sql).fetchall()

    def drop(self) -> None:
        self.close()


class Postgres(Backend):
    """A database ``bench_<pid>`` on the local server, dropped (and re-created) per run."""

    name = "postgres"

    def __init__(self, admin_url: str = POSTGRES_ADMIN):
        import psycopg  # only needed when PostgreSQL is measured

        self._psycopg = psycopg
        self.admin_url = admin_url
        self.dbname = f"bench_{os.getpid()}"
        self._conn = None

    @classmethod
    def unavailable(cls, admin_url: str = POSTGRES_ADMIN) -> str | None:
        """Why PostgreSQL cannot be measured, or None when it can."""
        try:
            import psycopg
        except ImportError:
            return "psycopg is not installed"
        try:
            with psycopg.connect(admin_url, connect_timeout=3) as conn:
                conn.execute("SELECT 1")
        except Exception as exc:
            return f"no PostgreSQL at {admin_url}: {str(exc).strip().splitlines()[0]}"
        return None

    def _admin(self, sql: str) -> None:
        with self._psycopg.connect(self.admin_url, autocommit=True) as conn:
            conn.execute(sql)

    def url(self) -> str:
        return self.admin_url.rsplit("/", 1)[0] + "/" + self.dbname

    def create(self, workdir: Path) -> str:
        self.drop()
        self._admin(f'CREATE DATABASE "{self.dbname}"')
        return self.url()

    def server_started(self):
        try:
            with self._psycopg.connect(self.admin_url, connect_timeout=3) as conn:
                return conn.execute("SELECT pg_postmaster_start_time()").fetchone()[0]
        except Exception:
            return "unreachable"

    def _query(self, sql: str) -> list[tuple]:
        if self._conn is None:
            self._conn = self._psycopg.connect(self.url(), autocommit=True)
        return self._conn.execute(sql).fetchall()

    def drop(self) -> None:
        self.close()
        self._admin(f'DROP DATABASE IF EXISTS "{self.dbname}" WITH (FORCE)')


def available_backends(names: tuple[str, ...]) -> tuple[list[Backend], dict[str, str]]:
    """The backends that can run, and a note for each one skipped."""
    backends, skipped = [], {}
    for name in names:
        if name == "sqlite":
            backends.append(Sqlite())
        elif name == "postgres":
            reason = Postgres.unavailable()
            if reason:
                skipped[name] = reason
            else:
                backends.append(Postgres())
        else:
            raise ValueError(f"unknown backend {name!r}; choose from sqlite, postgres")
    return backends, skipped
