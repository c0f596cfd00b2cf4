"""Degraded is visible: a trouble is one WARNING when it starts and one INFO when it ends,
and ``status`` shows the node as paused, with why and since when, meanwhile."""

import glob
import logging
import os
from pathlib import Path

import pytest

from conftest import make_config, wait_for
from dicomfiles import write
from watcher import models, report
from watcher.models import Instance
from watcher.service import Service

MAX_WATCHES = Path("/proc/sys/fs/inotify/max_user_watches")


def inotify_instances_of_this_user() -> int:
    count = 0
    for fd in glob.glob("/proc/[0-9]*/fd/*"):
        try:
            if os.stat(os.path.dirname(os.path.dirname(fd))).st_uid == os.getuid() \
                    and os.readlink(fd) == "anon_inode:inotify":
                count += 1
        except OSError:
            continue
    return count


def watches_of_this_user() -> int:
    """inotify watches held by processes of our uid: what the kernel counts against the limit."""
    count = 0
    for fdinfo in glob.glob("/proc/[0-9]*/fdinfo/*"):
        try:
            if os.stat(os.path.dirname(os.path.dirname(fdinfo))).st_uid != os.getuid():
                continue
            with open(fdinfo) as f:
                count += sum(1 for line in f if line.startswith("inotify wd:"))
        except OSError:
            continue
    return count


@pytest.fixture
def few_watches():
    """Lower fs.inotify.max_user_watches so that only a few more can be had; put it back after."""
    if os.geteuid() != 0 or not os.access(MAX_WATCHES, os.W_OK):
        pytest.skip("needs root to lower fs.inotify.max_user_watches")
    saved = MAX_WATCHES.read_text()

    def lower(spare: int):
        MAX_WATCHES.write_text(str(watches_of_this_user() + spare))

    def restore():
        MAX_WATCHES.write_text(saved)

    lower.restore = restore
    yield lower
    restore()


def messages(caplog, level, start):
    return [r.getMessage() for r in caplog.records if r.levelno == level and r.getMessage().startswith(start)]


def test_watch_limit_is_reported_and_watches_come_back_when_it_is_raised(tmp_path, db_url, few_watches,
                                                                        caplog):
    cfg = make_config(tmp_path, db_url, watch={"rescan_seconds": 120})
    for k in range(40):
        (cfg.watch.drop_dir / f"disc{k:02d}" / "DICOM").mkdir(parents=True)
    models.connect(cfg.database.url)
    caplog.set_level(logging.INFO)
    few_watches(5)
    with Service(cfg) as service:
        try:
            assert wait_for(lambda: messages(caplog, logging.WARNING, "paused: cannot watch"), timeout=10)
            warning = messages(caplog, logging.WARNING, "paused: cannot watch")
            assert len(warning) == 1 and "max_user_watches" in warning[0], warning
            service.heartbeat()
            node = report.status()["nodes"][0]
            assert node["state"] == "paused" and "max_user_watches" in node["outage"]
        finally:
            few_watches.restore()
        assert wait_for(lambda: messages(caplog, logging.INFO, "resumed after"), timeout=20)
        assert len(messages(caplog, logging.WARNING, "paused: cannot watch")) == 1  # once, not per retry
        # events again: a file in the last folder is imported long before the 120 s rescan
        write(cfg.watch.drop_dir / "disc39" / "DICOM" / "IM1")
        assert wait_for(lambda: Instance.select().count() == 1, timeout=15)
        service.heartbeat()
        assert report.status()["nodes"][0]["state"] == "running"
    models.database.close()


def test_inotify_instance_limit_is_reported_and_watching_starts_when_it_is_raised(tmp_path, caplog):
    """No inotify instance to be had (fs.inotify.max_user_instances): the service starts
    anyway, says why it cannot watch, finds files by the rescan, and watches once it can."""
    limit = Path("/proc/sys/fs/inotify/max_user_instances")
    if os.geteuid() != 0 or not os.access(limit, os.W_OK):
        pytest.skip("needs root to lower fs.inotify.max_user_instances")
    cfg = make_config(tmp_path, f"sqlite:///{tmp_path}/watcher.db", watch={"rescan_seconds": 120})
    models.connect(cfg.database.url)
    caplog.set_level(logging.INFO)
    saved = limit.read_text()
    limit.write_text(str(inotify_instances_of_this_user()))
    try:
        with Service(cfg) as service:
            try:
                assert wait_for(lambda: messages(caplog, logging.WARNING, "paused: cannot watch"), timeout=10)
                warning = messages(caplog, logging.WARNING, "paused: cannot watch")
                assert len(warning) == 1 and "max_user_instances" in warning[0], warning
            finally:
                limit.write_text(saved)
            assert wait_for(lambda: messages(caplog, logging.INFO, "resumed after"), timeout=20)
            write(cfg.watch.drop_dir / "IM1")  # an event, long before the 120 s rescan
            assert wait_for(lambda: Instance.select().count() == 1, timeout=15)
            service.heartbeat()
            assert report.status()["nodes"][0]["state"] == "running"
    finally:
        limit.write_text(saved)
    models.database.close()


def test_stalled_commit_is_reported_once_and_its_end_too(tmp_path, caplog, monkeypatch):
    """SQLite held by another process's write transaction: the import waits (it must not fail),
    and the node says it is stalled while it does."""
    import subprocess
    import sys
    import textwrap
    from watcher import service as service_module

    monkeypatch.setattr(service_module, "STALLED_SECONDS", 1.0)
    db = tmp_path / "w.db"
    cfg = make_config(tmp_path, f"sqlite:///{db}", watch={"rescan_seconds": 120})
    models.connect(cfg.database.url)
    caplog.set_level(logging.INFO)
    with Service(cfg) as service:
        holder = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
            import sqlite3, sys
            c = sqlite3.connect({str(db)!r}, isolation_level=None)
            c.execute("BEGIN IMMEDIATE")
            c.execute("CREATE TABLE IF NOT EXISTS lock_holder (x)")
            print("locked", flush=True)
            sys.stdin.readline()  # (held until the test has seen the stall, however slow the machine)
            c.execute("COMMIT")
        """)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        assert holder.stdout.readline().strip() == "locked"
        write(cfg.watch.drop_dir / "a.dcm")
        try:
            assert wait_for(lambda: (service._check_stalled(), "stalled" in service.troubles)[1], timeout=30, step=0.2)
        finally:
            holder.stdin.write("go\n")
            holder.stdin.close()
        assert wait_for(lambda: Instance.select().count() == 1, timeout=40)
        # (the worker marks its import done just after the commit the count sees)
        assert wait_for(lambda: (service._check_stalled(), "stalled" not in service.troubles)[1],
                        timeout=10, step=0.1)
    holder.wait(timeout=30)
    stalled = messages(caplog, logging.WARNING, "paused: an import has waited")
    assert len(stalled) == 1, stalled
    assert any("resumed after" in m and "an import has waited" in m
               for m in messages(caplog, logging.INFO, "resumed after"))
    models.database.close()
