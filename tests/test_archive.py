"""Storing originals: nothing can change an original once it is hashed.

A file with no other name, on the archive's file system, read under a lease, is
taken out of sight (captured) and its own inode becomes the archive's file: no
bytes copied, and no writer can reach it any more. Anything else is copied.
These tests run as root in CI, like a service that owns what is dropped; a file
is made someone else's with chown, and "someone writing" is a real process.
"""

import hashlib
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from dicomfiles import write
from watcher.commit import commit_now
from watcher.models import Instance
from watcher.pipeline import ingest
from watcher.source import Source

NOBODY = 65534
pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="chown to another user needs root")
LEASE_BREAK = Path("/proc/sys/fs/lease-break-time")


def needs_taking_whole(config):
    """Files are taken whole only with one node per database (SQLite): see watcher/pipeline.py."""
    if not config.database.url.startswith("sqlite"):
        pytest.skip("with several nodes (PostgreSQL) every original is copied")


def stored_file(config):
    return config.archive.dir / Instance.get().stored_path


def test_file_with_one_name_on_the_archive_disk_is_taken_whole_without_a_copy(config):
    needs_taking_whole(config)
    src = write(config.watch.drop_dir / "a.dcm")
    original, inode = src.read_bytes(), src.stat().st_ino
    assert ingest(src, config).outcome == "imported"
    stored = stored_file(config)
    st = stored.stat()
    assert st.st_ino == inode and st.st_nlink == 1  # the same inode, and no name left outside
    assert st.st_mode & 0o777 == 0o444
    assert stored.read_bytes() == original
    assert Instance.get().sha256 == hashlib.sha256(original).hexdigest()
    assert not src.exists() and not list(config.watch.drop_dir.iterdir())  # no capture left


def test_file_with_a_second_name_is_copied(config, tmp_path):
    """Someone else can write to it through its other name: the archive needs its own copy."""
    src = write(config.watch.drop_dir / "a.dcm")
    os.link(src, tmp_path / "elsewhere.dcm")
    original, inode = src.read_bytes(), src.stat().st_ino
    assert ingest(src, config).outcome == "imported"
    stored = stored_file(config)
    assert stored.stat().st_ino != inode and stored.stat().st_nlink == 1
    assert stored.read_bytes() == original
    assert (tmp_path / "elsewhere.dcm").stat().st_mode & 0o777 == 0o644  # its mode untouched


def test_another_users_file_is_taken_whole_by_a_root_service(config):
    src = write(config.watch.drop_dir / "a.dcm")
    os.chown(src, NOBODY, NOBODY)
    original = src.read_bytes()
    assert ingest(src, config).outcome == "imported"
    assert stored_file(config).read_bytes() == original


def test_file_someone_has_open_for_writing_waits_for_its_writer(config):
    """A complete file whose writer still holds it (it may append or patch a byte yet) is
    not imported: the kernel refuses the read lease, so we know. Once closed, it is."""
    src = write(config.watch.drop_dir / "a.dcm")
    patched = src.read_bytes().replace(b"^Anna", b"^Anne")  # a header byte fixed up
    assert patched != src.read_bytes()
    with open(src, "r+b") as writer:
        outcome = ingest(src, config)
        assert outcome.outcome == "pending" and "open for writing" in outcome.detail
        assert ingest(src, config, final=True).outcome == "pending"  # never rejected meanwhile
        writer.write(patched)
    final_bytes = src.read_bytes()
    assert final_bytes == patched
    assert ingest(src, config).outcome == "imported"
    assert stored_file(config).read_bytes() == final_bytes


def test_file_moved_on_success_is_copied(tmp_path, db_url):
    from conftest import make_config
    from watcher import models
    config = make_config(tmp_path, db_url, archive={"on_success": "move", "done_dir": "done"})
    models.connect(config.database.url)
    try:
        src = write(config.watch.drop_dir / "a.dcm")
        inode = src.stat().st_ino
        assert ingest(src, config).outcome == "imported"
        assert stored_file(config).stat().st_ino != inode  # the done folder keeps that inode
        assert (tmp_path / "done" / "a.dcm").stat().st_ino == inode
    finally:
        models.database.close()


def _writer_waiting_for(path: Path):
    """A real process that opens ``path`` for writing (blocked by our lease) and changes it."""
    code = ("import sys; f = open(sys.argv[1], 'r+b'); print('opened', flush=True); "
            "f.write(b'X' * 4096); f.close()")
    return subprocess.Popen([sys.executable, "-c", code, str(path)], stdout=subprocess.PIPE)


def test_writer_waiting_before_the_capture_keeps_its_file_and_the_archive_gets_nothing_of_it(
        config, monkeypatch):
    """Someone opens the file for writing after we read it and before we take it: the kernel
    holds them back on our lease, the capture sees them waiting, gives the file back its
    name and lets go. The writer's bytes land in the drop folder's file, which is imported
    in its turn; no archive file shares its inode."""
    needs_taking_whole(config)
    from watcher import dispose
    src = write(config.watch.drop_dir / "a.dcm")
    inode = src.stat().st_ino
    writer = None
    real_capture = dispose.capture

    def capture_with_a_writer_waiting(source):
        nonlocal writer
        writer = _writer_waiting_for(src)
        time.sleep(0.5)  # it is now blocked in open(), waiting for our lease
        assert writer.poll() is None
        return real_capture(source)

    monkeypatch.setattr(dispose, "capture", capture_with_a_writer_waiting)
    outcome = ingest(src, config)
    assert outcome.outcome == "pending" and outcome.waiting == "changing"
    assert writer.wait(timeout=60) == 0 and writer.stdout.read() == b"opened\n"
    assert src.read_bytes()[:4096] == b"X" * 4096  # the writer's bytes, not lost
    assert src.stat().st_ino == inode and src.stat().st_mode & 0o777 == 0o644  # given back as it was
    assert Instance.select().count() == 0
    assert not [p for p in config.archive.dir.rglob("*.dcm") if p.stat().st_ino == inode]


def test_writer_arriving_during_the_commit_cannot_reach_the_original(config):
    """Once taken, the file has no name anyone knows: ``cp`` onto its name makes a new file
    (imported in its turn), a program patching it in place finds nothing; the original is
    untouched, however long the commit takes."""
    needs_taking_whole(config)
    src = write(config.watch.drop_dir / "a.dcm")
    original = src.read_bytes()
    newer = write(config.watch.drop_dir.parent / "newer.dcm").read_bytes()
    results = {}

    def commit_while_people_write(record):
        patch = subprocess.run([sys.executable, "-c", "import sys; open(sys.argv[1], 'r+b')", str(src)],
                               capture_output=True, text=True)
        results["patch"] = patch.returncode
        src.write_bytes(newer)  # cp onto the name: O_CREAT | O_TRUNC
        return commit_now(record)

    outcome = ingest(src, config, commit=commit_while_people_write)
    assert outcome.outcome == "imported"
    assert results["patch"] != 0  # FileNotFoundError: nothing to patch under that name now
    assert stored_file(config).read_bytes() == original
    assert src.read_bytes() == newer  # the newer file is there, to be imported next
    assert ingest(src, config).outcome == "imported" and Instance.select().count() == 2


def _inode_of(path: str):
    try:
        return os.stat(path).st_ino
    except OSError:
        return None


def test_writer_reaching_the_taken_inode_through_proc_gets_it_back_and_the_archive_a_copy(config):
    """A root process opens the inode for writing through /proc/PID/fd during the commit
    (the one way left to it once the name is gone): the kernel holds it back on our lease;
    the archive takes a copy of its own first, the file goes back to its name, the writer
    writes, and both versions are kept."""
    needs_taking_whole(config)
    src = write(config.watch.drop_dir / "a.dcm")
    original, inode = src.read_bytes(), src.stat().st_ino
    writer = None

    def commit_while_a_writer_waits_through_proc(record):
        nonlocal writer
        fd = next(n for n in os.listdir("/proc/self/fd") if _inode_of(f"/proc/self/fd/{n}") == inode)
        writer = _writer_waiting_for(Path(f"/proc/{os.getpid()}/fd/{fd}"))
        time.sleep(0.5)  # blocked in open(), waiting for our lease
        assert writer.poll() is None
        return commit_now(record)

    outcome = ingest(src, config, commit=commit_while_a_writer_waits_through_proc)
    assert outcome.outcome == "imported" and outcome.again
    assert writer.wait(timeout=60) == 0
    stored = stored_file(config)
    assert stored.read_bytes() == original and stored.stat().st_ino != inode  # a copy of its own
    assert src.stat().st_ino == inode and src.read_bytes()[:4096] == b"X" * 4096  # the writer's


@pytest.fixture
def short_lease_break():
    """The kernel revokes a lease this long after a writer asks (45 s by default)."""
    before = LEASE_BREAK.read_text()
    try:
        LEASE_BREAK.write_text("1")
    except OSError as exc:
        pytest.skip(f"cannot shorten {LEASE_BREAK}: {exc}")
    yield 1
    LEASE_BREAK.write_text(before)


@pytest.mark.parametrize("shared", [True, False], ids=["taken-whole", "copied"])
def test_commit_stalled_past_the_lease_break_time_changes_no_stored_byte(config, short_lease_break,
                                                                         tmp_path, shared):
    """The commit waits longer than the kernel lets a lease holder keep a writer out (a table
    lock held for minutes, a SIGSTOP), while writers try every way in: through the name (gone
    once taken), and, for a file with a second name (copied), through that name, which the
    lease no longer holds back. verify finds nothing wrong either way."""
    from watcher import verify
    src = write(config.watch.drop_dir / "a.dcm")
    other = tmp_path / "second-name.dcm"
    if not shared:
        os.link(src, other)
    original = src.read_bytes()

    def stalled_commit(record):
        for path in (src, other):
            if path.exists():
                writer = _writer_waiting_for(path)
                assert writer.wait(timeout=30) == 0  # (the lease, if any, was revoked): it wrote
        time.sleep(1.5)  # past the lease-break time
        return commit_now(record)

    outcome = ingest(src, config, commit=stalled_commit)
    assert outcome.outcome == "imported"
    found = verify.verify(config.archive.dir)
    assert found.ok and found.checked == 1
    assert stored_file(config).read_bytes() == original
    if not shared:
        assert other.read_bytes()[:4096] == b"X" * 4096 and src.exists()  # the newer version stays


def test_leased_source_sees_a_waiting_writer_as_a_change(config):
    src = write(config.watch.drop_dir / "a.dcm")
    with Source(config.watch.drop_dir, "a.dcm") as source:
        assert source.leased and not source.changed()
        writer = subprocess.Popen([sys.executable, "-c", "import sys; open(sys.argv[1], 'ab')", str(src)])
        time.sleep(0.3)
        assert source.changed()
    assert writer.wait(timeout=30) == 0


def test_archive_file_with_a_second_name_is_not_trusted(config):
    """An earlier version linked sources into the archive; a crash could leave one inode
    with two names. Such an archive file is replaced by a copy, never trusted."""
    from watcher import archive
    src = write(config.watch.drop_dir / "a.dcm")
    original = src.read_bytes()
    with Source(config.watch.drop_dir, "a.dcm") as source:
        stored = archive.store_original(source, config.archive.dir)
    (config.archive.dir / stored.relpath).unlink()
    os.link(src, config.archive.dir / stored.relpath)
    assert ingest(src, config).outcome == "imported"
    assert stored_file(config).stat().st_nlink == 1
    assert stored_file(config).read_bytes() == original
