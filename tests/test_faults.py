"""Resource faults: a full archive disk, a locked database, a vanished drop folder, an unreadable
file. The service waits, keeps every source, says so, and resumes by itself."""

import logging
import os
import shutil
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import wait_for, make_config
from dicomfiles import write
from watcher import models, report
from watcher.models import Instance, Rejection
from watcher.service import Service

pytestmark = pytest.mark.slow
IS_ROOT = os.geteuid() == 0



@pytest.fixture
def small_disk(tmp_path):
    """A 1 MiB tmpfs for the archive (needs root to mount)."""
    if not IS_ROOT or not shutil.which("mount"):
        pytest.skip("mounting a small filesystem needs root")
    mnt = tmp_path / "small"
    mnt.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mnt)]).returncode:
        pytest.skip("cannot mount tmpfs here")
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)])


def test_full_archive_disk_pauses_keeps_sources_and_resumes(tmp_path, small_disk, caplog):
    cfg = make_config(tmp_path, f"sqlite:///{tmp_path}/w.db",
                      watch={"settle_seconds": 1, "rescan_seconds": 1},
                      archive={"dir": str(small_disk / "archive")})
    models.connect(cfg.database.url)
    files = [write(tmp_path / "stage" / f"{i}.dcm", rows=256, columns=256) for i in range(8)]  # 8 x 131 kB
    originals = {f.name: f.read_bytes() for f in files}
    caplog.set_level(logging.INFO)
    with Service(cfg):
        for f in files:
            f.rename(cfg.watch.drop_dir / f.name)
        assert wait_for(lambda: "No space left" in caplog.text or "cannot import now" in caplog.text)
        time.sleep(3)  # several workers meet the full disk, several times
        paused = [r for r in caplog.records if r.getMessage().startswith("paused:")]
        assert len(paused) == 1 and paused[0].levelname == "WARNING"  # once, when it starts
        node = report.status()["nodes"][0]
        assert node["state"] == "paused" and "No space left" in node["outage"] and node["outage_since"]
        left = {p.name for p in cfg.watch.drop_dir.iterdir()}
        assert left and Rejection.select().count() == 0  # waiting, not rejecting
        for name in left:
            assert (cfg.watch.drop_dir / name).read_bytes() == originals[name]
        subprocess.run(["mount", "-o", "remount,size=20m", str(small_disk)], check=True)
        assert wait_for(lambda: Instance.select().count() == 8, 60)
        assert wait_for(lambda: "resumed after" in caplog.text, 10)
        assert wait_for(lambda: report.status()["nodes"][0]["state"] == "running", 15)
    assert not list(cfg.watch.drop_dir.iterdir())
    for i in Instance.select():
        assert (cfg.archive.dir / i.stored_path).read_bytes() == originals[i.source]
    assert not list((cfg.archive.dir / ".tmp").iterdir())  # no half-written temporaries left
    models.database.close()


def test_full_rejected_folder_pauses_keeps_sources_and_records_each_rejection_once(tmp_path, small_disk,
                                                                                 caplog):
    """The rejected folder on a full file system (another one than the drop folder's, so each
    rejection is a copy): no partial copies, no history events for rejections that did not
    happen, the sources untouched; all rejected, once each, when there is room again."""
    from watcher.models import Event
    cfg = make_config(tmp_path, f"sqlite:///{tmp_path}/w.db",
                      watch={"settle_seconds": 1, "rescan_seconds": 1},
                      archive={"rejected_dir": str(small_disk / "rejected")})
    models.connect(cfg.database.url)
    junk = {f"junk{i}.txt": os.urandom(150_000) for i in range(12)}  # 1.8 MB for a 1 MiB disk
    stage = tmp_path / "stage"
    stage.mkdir()
    for name, data in junk.items():
        (stage / name).write_bytes(data)
    with Service(cfg):
        for name in junk:
            (stage / name).rename(cfg.watch.drop_dir / name)
        assert wait_for(lambda: "No space left" in caplog.text, 30)
        time.sleep(3)  # the workers meet the full disk again and again

        def settled() -> list | None:
            """The rejected files, at a moment when no worker is half-way through one (its row
            is written just before its copy, and taken back when the copy fails)."""
            found = [p for p in (small_disk / "rejected").rglob("*") if p.is_file()]
            rows = Rejection.select().count()
            events = Event.select().where(Event.outcome == "rejected").count()
            return found if rows == events == len(found) else None

        deadline, in_rejected = time.monotonic() + 20, None
        while in_rejected is None and time.monotonic() < deadline:
            in_rejected = settled()
            time.sleep(0.05 if in_rejected is None else 0)
        assert in_rejected is not None, "the rejection rows and the rejected files never agreed"
        assert not [p for p in in_rejected if p.name.endswith(".moving")]  # no partial copies
        assert 0 < len(in_rejected) < len(junk)
        for p in cfg.watch.drop_dir.iterdir():
            assert p.read_bytes() == junk[p.name]
        subprocess.run(["mount", "-o", "remount,size=20m", str(small_disk)], check=True)
        assert wait_for(lambda: Rejection.select().count() == len(junk), 60)
    assert not list(cfg.watch.drop_dir.iterdir())
    assert Event.select().where(Event.outcome == "rejected").count() == len(junk)
    for r in Rejection.select():
        assert Path(r.path).read_bytes() == junk[r.source]
    models.database.close()


def test_sqlite_locked_by_another_process_is_waited_out(tmp_path):
    cfg = make_config(tmp_path, f"sqlite:///{tmp_path}/w.db", watch={"settle_seconds": 1})
    models.connect(cfg.database.url)
    with Service(cfg):
        locker = subprocess.Popen([sys.executable, "-c", (
            "import sqlite3, sys, time\n"
            f"c = sqlite3.connect({str(tmp_path / 'w.db')!r}, isolation_level=None)\n"
            "c.execute('BEGIN EXCLUSIVE'); print('locked', flush=True); time.sleep(4)\n"
            "c.execute('COMMIT')\n")], stdout=subprocess.PIPE)
        assert locker.stdout.readline().strip() == b"locked"
        originals = {i: write(cfg.watch.drop_dir / f"{i}.dcm").read_bytes() for i in range(5)}
        time.sleep(1.5)
        assert locker.poll() is None, "the lock was held all along"
        assert len(list(cfg.watch.drop_dir.iterdir())) == 5  # nothing can commit yet: all wait
        locker.wait(timeout=10)
        assert wait_for(lambda: Instance.select().count() == 5, 40)
    for i in Instance.select():
        assert (cfg.archive.dir / i.stored_path).read_bytes() == originals[int(i.source[:-4])]
    models.database.close()


def test_drop_folder_removed_and_recreated_is_watched_again(tmp_path, caplog):
    """Deleted and made again (often with the same inode number on ext4): noticed within
    seconds (not at the next rescan), said once each way, and watched again."""
    cfg = make_config(tmp_path, f"sqlite:///{tmp_path}/w.db",
                      watch={"settle_seconds": 1, "rescan_seconds": 60})
    models.connect(cfg.database.url)
    caplog.set_level(logging.INFO)
    with Service(cfg):
        write(cfg.watch.drop_dir / "before.dcm")
        assert wait_for(lambda: Instance.select().count() == 1)
        shutil.rmtree(cfg.watch.drop_dir)
        assert wait_for(lambda: "is gone" in caplog.text, 10)
        cfg.watch.drop_dir.mkdir()
        assert wait_for(lambda: "resumed after" in caplog.text, 10)
        write(cfg.watch.drop_dir / "after.dcm")
        assert wait_for(lambda: Instance.select().count() == 2, 10)
    models.database.close()


def test_drop_folder_replaced_in_an_instant_is_watched_again(tmp_path, caplog):
    """rm -rf and mkdir at once (ext4 often gives the new folder the old inode number): the
    folder held open has no link left, so it is known to be another one and watched again."""
    cfg = make_config(tmp_path, f"sqlite:///{tmp_path}/w.db",
                      watch={"settle_seconds": 1, "rescan_seconds": 60})
    models.connect(cfg.database.url)
    caplog.set_level(logging.INFO)
    with Service(cfg):
        write(cfg.watch.drop_dir / "before.dcm")
        assert wait_for(lambda: Instance.select().count() == 1)
        shutil.rmtree(cfg.watch.drop_dir)
        cfg.watch.drop_dir.mkdir()
        assert wait_for(lambda: "replaced or remounted" in caplog.text, 10)
        write(cfg.watch.drop_dir / "sub" / "after.dcm")  # in a new sub-folder: events, not a rescan
        assert wait_for(lambda: Instance.select().count() == 2, 10)
    models.database.close()


def test_file_unreadable_to_the_service_user_is_rejected_not_lost(tmp_path):
    if not IS_ROOT or not shutil.which("setpriv"):
        pytest.skip("needs root to run the scan as another user")
    os.chmod(tmp_path, 0o777)
    import watcher
    # nobody must reach the test folders, the checkout and the venv (a clone in a mktemp -d
    # folder is 0700): let others through every folder above them
    for place in (tmp_path, Path(watcher.__file__).parent, Path(sys.prefix)):
        for parent in place.parents:
            if parent == Path("/"):
                break
            os.chmod(parent, os.stat(parent).st_mode | 0o011)
    cfg_dir = tmp_path / "svc"
    cfg_dir.mkdir(mode=0o777)
    os.chmod(cfg_dir, 0o777)
    from conftest import write_config_file
    cfg_path = write_config_file(cfg_dir, f"sqlite:///{cfg_dir}/w.db", watch={"settle_seconds": 1})
    drop = cfg_dir / "drop"
    secret = write(drop / "secret.dcm")
    data = secret.read_bytes()
    os.chmod(secret, 0o600)  # root's, unreadable to nobody
    os.chmod(drop, 0o777)
    proc = subprocess.run(["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups",
                           sys.executable, "-m", "watcher", "scan", "--final", "--config", str(cfg_path)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "rejected 1" in proc.stdout
    kept = cfg_dir / "rejected" / "secret.dcm"
    assert kept.read_bytes() == data
    db = sqlite3.connect(cfg_dir / "w.db")
    reason, detail = db.execute("select reason, detail from rejection").fetchone()
    assert reason == "unreadable" and "permission" in detail.lower()
