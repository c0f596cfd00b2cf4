"""Read commands only look: they work for a user who may only read the database and the archive,
never create or migrate a database, and never wait behind a service's write transaction."""

import hashlib
import json
import os
import shutil
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
from click.testing import CliRunner
from playhouse.migrations import Runner

from conftest import write_config_file
from dicomfiles import write
from watcher import models
from watcher.cli import cli
from watcher.config import load
from watcher.sweep import sweep

IS_ROOT = os.geteuid() == 0
READ_COMMANDS = [["status"], ["status", "--json"], ["list", "--json"], ["rejects", "--json"],
                 ["history", "--json"], ["pending", "--json"], ["verify", "--json"], ["discs", "--json"]]


def cli_run(config_path, *args):
    result = CliRunner().invoke(cli, [args[0], "--config", str(config_path), *args[1:]])
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    return result


def imported(tmp_path, db_url):
    """A config file and a database the pipeline has put 2 instances and 1 rejection in."""
    path = write_config_file(tmp_path, db_url, watch={"settle_seconds": 1})
    cfg = load(path)
    write(cfg.watch.drop_dir / "a.dcm", study_uid="1.2.826.0.1.3680043.8.498.5001")
    write(cfg.watch.drop_dir / "b.dcm", study_uid="1.2.826.0.1.3680043.8.498.5001")
    (cfg.watch.drop_dir / "notes.txt").write_text("not DICOM")
    models.connect(cfg.database.url)
    assert sweep(cfg, final=True)["imported"] == 2
    models.database.close()
    return path


def test_read_commands_without_a_database_say_so_and_create_nothing(tmp_path):
    path = write_config_file(tmp_path, f"sqlite:///{tmp_path}/db/w.db")
    dest = tmp_path / "out"
    for args in READ_COMMANDS + [["export", "1.2.3", str(dest)]]:
        result = cli_run(path, *args)
        assert result.exit_code == 1, args
        assert f"no database at {tmp_path}/db/w.db: has the service run yet?" in result.output
    assert not (tmp_path / "db").exists()  # not the file, nor its folder
    assert not dest.exists()


def test_empty_postgresql_database_says_the_service_has_not_run(tmp_path, pg_database):
    import psycopg
    with psycopg.connect(pg_database, autocommit=True) as conn:
        conn.execute("DROP SCHEMA public CASCADE")
        conn.execute("CREATE SCHEMA public")
    path = write_config_file(tmp_path, pg_database)
    result = cli_run(path, "history")
    assert result.exit_code == 1 and "has the service run yet?" in result.output
    with psycopg.connect(pg_database) as conn:  # nothing created
        assert conn.execute("SELECT count(*) FROM pg_tables WHERE schemaname = 'public'").fetchone() == (0,)


def test_older_schema_is_reported_not_migrated(tmp_path, db_url):
    path = write_config_file(tmp_path, db_url)
    db = models.connect(db_url, migrate=False)
    Runner(db, str(models.MIGRATIONS)).up(target="0002_claims")
    db.close()
    for args in (["status"], ["history"], ["pending"]):
        result = cli_run(path, *args)
        assert result.exit_code == 1, result.output
        assert "schema is older than this dicom-watcher (0003_waiting" in result.output
        assert "start the service" in result.output
    db = models.connect(db_url, migrate=False)
    assert sorted(Runner(db, str(models.MIGRATIONS)).applied()) == ["0001_initial", "0002_claims"]
    db.close()


HOLDER = """
import sys, time
url = sys.argv[1]
if url.startswith("sqlite:///"):
    import sqlite3
    c = sqlite3.connect(url[len("sqlite:///"):], isolation_level=None)
    c.execute("BEGIN IMMEDIATE")
    commit = lambda: c.execute("COMMIT")
else:
    import psycopg
    c = psycopg.connect(url)
    c.execute("LOCK TABLE history IN EXCLUSIVE MODE")
    commit = c.commit
c.execute("INSERT INTO history (at, outcome, source, detail, node) "
          "VALUES ('2030-01-01 00:00:00', 'imported', 'uncommitted.dcm', '', 'stalled')")
print("holding", flush=True)
sys.stdin.readline()
commit()
print("committed", flush=True)
"""


def hold_write_transaction(db_url):
    """A stalled service: a write transaction, with an insert, left open until told to commit."""
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, db_url], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "holding"
    return proc


def release(proc):
    out, _ = proc.communicate("\n", timeout=30)
    assert out.strip() == "committed"  # the reads took no lock the writer had to wait for


def test_read_commands_do_not_wait_behind_a_write_transaction(tmp_path, db_url):
    path = imported(tmp_path, db_url)
    proc = hold_write_transaction(db_url)
    try:
        for args in READ_COMMANDS + [["export", "1.2.826.0.1.3680043.8.498.5001", str(tmp_path / "out")]]:
            started = time.monotonic()
            result = cli_run(path, *args)
            assert time.monotonic() - started < 5, args
            assert result.exit_code == 0, (args, result.output)
        sources = [r["source"] for r in json.loads(cli_run(path, "history", "--json").output)]
        assert sorted(sources) == ["a.dcm", "b.dcm", "notes.txt"]  # committed rows only
        assert len(list((tmp_path / "out").rglob("*.dcm"))) == 2
    finally:
        release(proc)


# -- as a user who may read but not write ----------------------------------------------------

def as_nobody(*args):
    return subprocess.run(["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups",
                           sys.executable, "-m", "watcher", *args],
                          capture_output=True, text=True, timeout=120)


@pytest.fixture
def readable(tmp_path):
    """A database folder owned by root that ``nobody`` may read and traverse, not write."""
    if not IS_ROOT or not shutil.which("setpriv"):
        pytest.skip("needs root to run commands as another user")
    import watcher
    # nobody must reach the test folders, the checkout and the venv: let others through
    for place in (tmp_path, Path(watcher.__file__).parent, Path(sys.prefix)):
        for parent in place.parents:
            if parent == Path("/"):
                break
            os.chmod(parent, os.stat(parent).st_mode | 0o011)
    os.chmod(tmp_path, 0o755)
    home = tmp_path / "svc"
    home.mkdir(mode=0o755)
    path = imported(home, f"sqlite:///{home}/w.db")
    out = tmp_path / "out"
    out.mkdir(mode=0o777)
    os.chmod(out, 0o777)
    return path


def open_up(folder: Path) -> dict:
    """Everything readable by others; what lies there and its hashes, to compare afterwards."""
    for p in [folder, *folder.rglob("*")]:
        os.chmod(p, os.stat(p).st_mode | (0o055 if p.is_dir() else 0o044))
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in folder.rglob("*") if p.is_file() and not p.name.endswith(("-shm", "-wal"))}


def check_read_commands_as_nobody(path: Path, out: Path):
    for args in READ_COMMANDS:
        proc = as_nobody(*args, "--config", str(path))
        assert proc.returncode == 0, (args, proc.stderr[-2000:])
        assert "Traceback" not in proc.stderr
    assert sorted(r["source"] for r in json.loads(as_nobody("list", "--json", "--config", str(path)).stdout)) \
        == ["a.dcm", "b.dcm"]
    assert json.loads(as_nobody("rejects", "--json", "--config", str(path)).stdout)[0]["source"] == "notes.txt"
    assert json.loads(as_nobody("verify", "--json", "--config", str(path)).stdout)["checked"] == 2
    proc = as_nobody("export", "--config", str(path), "1.2.826.0.1.3680043.8.498.5001", str(out))
    assert proc.returncode == 0 and "2 files copied" in proc.stdout, proc.stderr[-2000:]


def test_read_commands_work_for_a_user_who_may_only_read_a_stopped_service_database(readable, tmp_path):
    home = readable.parent
    assert not (home / "w.db-wal").exists()  # the service stopped cleanly: all in w.db
    before = open_up(home)
    check_read_commands_as_nobody(readable, tmp_path / "out")
    assert open_up(home) == before and not (home / "w.db-wal").exists()


def test_read_commands_work_for_a_user_who_may_only_read_while_a_service_writes(readable, tmp_path):
    home = readable.parent
    proc = hold_write_transaction(f"sqlite:///{home}/w.db")
    try:
        before = open_up(home)  # the -wal and -shm files too
        check_read_commands_as_nobody(readable, tmp_path / "out")
        started = time.monotonic()
        rows = json.loads(as_nobody("history", "--json", "--config", str(readable)).stdout)
        assert time.monotonic() - started < 10
        assert sorted(r["source"] for r in rows) == ["a.dcm", "b.dcm", "notes.txt"]
        assert open_up(home) == before
    finally:
        release(proc)
    rows = json.loads(as_nobody("history", "--json", "--config", str(readable)).stdout)
    assert "uncommitted.dcm" in [r["source"] for r in rows]  # committed now: seen through the WAL


def test_read_commands_that_cannot_read_the_wal_say_what_to_fix(readable):
    home = readable.parent
    proc = hold_write_transaction(f"sqlite:///{home}/w.db")
    try:
        open_up(home)
        os.chmod(home / "w.db-shm", 0o600)
        result = as_nobody("history", "--config", str(readable))
        assert result.returncode == 1 and "Traceback" not in result.stderr
        assert f"must be able to read {home}/w.db-wal and {home}/w.db-shm" in result.stderr
    finally:
        release(proc)


def test_writing_commands_still_create_and_migrate(tmp_path):
    path = write_config_file(tmp_path, f"sqlite:///{tmp_path}/w.db")
    assert cli_run(path, "scan", "--final").exit_code == 0
    assert cli_run(path, "history").output == "no events yet\n"
    with sqlite3.connect(tmp_path / "w.db") as db:
        assert db.execute("SELECT count(*) FROM schema_migration").fetchone()[0] >= 3
