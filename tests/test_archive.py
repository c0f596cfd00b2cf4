"""Storing originals: the archive always holds its own copy, and nothing can change it.

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


def stored_file(config):
    return config.archive.dir / Instance.get().stored_path


def test_our_own_file_is_copied_into_the_archive_never_shared(config):
    src = write(config.watch.drop_dir / "a.dcm")
    original, inode = src.read_bytes(), src.stat().st_ino
    assert ingest(src, config).outcome == "imported"
    stored = stored_file(config)
    st = stored.stat()
    assert st.st_ino != inode and st.st_nlink == 1  # its own inode: no descriptor of anyone else's
    assert st.st_mode & 0o777 == 0o444
    assert stored.read_bytes() == original
    assert Instance.get().sha256 == hashlib.sha256(original).hexdigest()
    assert not src.exists()


def test_another_users_file_is_copied(config):
    src = write(config.watch.drop_dir / "a.dcm")
    os.chown(src, NOBODY, NOBODY)
    original, inode = src.read_bytes(), src.stat().st_ino
    assert ingest(src, config).outcome == "imported"
    stored = stored_file(config)
    assert stored.stat().st_ino != inode and stored.stat().st_uid == os.geteuid()
    assert stored.read_bytes() == original


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


def test_writer_arriving_during_the_import_keeps_its_version_and_the_archive_its_own(config):
    """Someone opens the file for writing while it is being imported: the kernel holds them
    back until we let go. The archive has the version we hashed; the drop folder keeps the
    file (a writer is waiting for it), so the writer's version is looked at next."""
    src = write(config.watch.drop_dir / "a.dcm")
    original = src.read_bytes()
    writer = None

    def commit_while_a_writer_waits(record):
        nonlocal writer
        writer = _writer_waiting_for(src)
        time.sleep(0.5)  # it is now blocked in open(), waiting for our lease
        assert writer.poll() is None
        return commit_now(record)

    outcome = ingest(src, config, commit=commit_while_a_writer_waits)
    assert outcome.outcome == "imported" and outcome.again
    assert writer.wait(timeout=60) == 0 and writer.stdout.read() == b"opened\n"
    assert stored_file(config).read_bytes() == original
    assert src.read_bytes()[:4096] == b"X" * 4096  # the writer's bytes, not lost


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


def test_commit_stalled_past_the_lease_break_time_changes_no_stored_byte(config, short_lease_break):
    """The commit waits longer than the kernel lets a lease holder keep a writer out
    (a table lock held for minutes, a SIGSTOP): the writer gets in and changes the drop
    folder's file, but the archive's copy is ours alone, so verify finds nothing wrong,
    and the changed file stays to be imported in its turn."""
    from watcher import verify
    src = write(config.watch.drop_dir / "a.dcm")
    original = src.read_bytes()
    writer = None

    def stalled_commit(record):
        nonlocal writer
        writer = _writer_waiting_for(src)
        assert writer.wait(timeout=30) == 0  # the lease was revoked: it wrote
        return commit_now(record)

    outcome = ingest(src, config, commit=stalled_commit)
    assert outcome.outcome == "imported"
    assert src.exists() and src.read_bytes() != original  # the newer version was not removed
    found = verify.verify(config.archive.dir)
    assert found.ok and found.checked == 1
    assert stored_file(config).read_bytes() == original


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
