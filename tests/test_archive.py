"""Storing originals: linked when the file is ours and nobody can write to it, copied otherwise.

These tests run as root in CI, like a service that owns what is dropped; a file
is made someone else's with chown, and "someone writing" is a real process.
"""

import hashlib
import os
import subprocess
import sys
import time

import pytest

from dicomfiles import write
from watcher.commit import commit_now
from watcher.models import Instance
from watcher.pipeline import ingest
from watcher.source import Source

NOBODY = 65534
pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="chown to another user needs root")


def stored_file(config):
    return config.archive.dir / Instance.get().stored_path


def test_our_own_file_is_linked_into_the_archive_not_copied(config):
    src = write(config.watch.drop_dir / "a.dcm")
    original, inode = src.read_bytes(), src.stat().st_ino
    assert ingest(src, config).outcome == "imported"
    stored = stored_file(config)
    st = stored.stat()
    assert st.st_ino == inode  # the same inode: no byte was written a second time
    assert st.st_nlink == 1  # the drop folder's name is gone, nothing else can reach it
    assert st.st_mode & 0o777 == 0o444
    assert stored.read_bytes() == original
    assert Instance.get().sha256 == hashlib.sha256(original).hexdigest()


def test_another_users_file_is_copied(config):
    src = write(config.watch.drop_dir / "a.dcm")
    os.chown(src, NOBODY, NOBODY)
    original, inode = src.read_bytes(), src.stat().st_ino
    assert ingest(src, config).outcome == "imported"
    stored = stored_file(config)
    assert stored.stat().st_ino != inode and stored.stat().st_uid == os.geteuid()
    assert stored.read_bytes() == original


def test_file_someone_has_open_for_writing_is_copied(config):
    src = write(config.watch.drop_dir / "a.dcm")
    original, inode = src.read_bytes(), src.stat().st_ino
    with open(src, "r+b"):  # a writer that has not closed it: no lease is granted
        assert ingest(src, config).outcome == "imported"
    assert stored_file(config).stat().st_ino != inode
    assert stored_file(config).read_bytes() == original


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


def test_writer_arriving_during_the_import_cannot_touch_the_archive(config):
    """Someone opens the file for writing between the link and the end of the import: the
    kernel holds them back until we let go, and the archive gets its own copy first."""
    src = write(config.watch.drop_dir / "a.dcm")
    original, inode = src.read_bytes(), src.stat().st_ino
    writer = None

    def commit_while_a_writer_waits(record):
        nonlocal writer
        code = ("import sys; f = open(sys.argv[1], 'r+b'); print('opened', flush=True); "
                "f.write(b'X' * 4096); f.close()")
        writer = subprocess.Popen([sys.executable, "-c", code, str(src)], stdout=subprocess.PIPE)
        time.sleep(0.5)  # it is now blocked in open(), waiting for our lease
        assert writer.poll() is None
        return commit_now(record)

    assert ingest(src, config, commit=commit_while_a_writer_waits).outcome == "imported"
    assert writer.wait(timeout=30) == 0 and writer.stdout.read() == b"opened\n"
    stored = stored_file(config)
    assert stored.stat().st_ino != inode  # its own copy, made before the writer got in
    assert stored.read_bytes() == original


def test_leased_source_sees_a_waiting_writer_as_a_change(config):
    src = write(config.watch.drop_dir / "a.dcm")
    with Source(str(src), lease=True) as source:
        assert source.leased and not source.changed()
        writer = subprocess.Popen([sys.executable, "-c", "import sys; open(sys.argv[1], 'ab')", str(src)])
        time.sleep(0.3)
        assert source.changed()
    assert writer.wait(timeout=30) == 0


def test_crash_leftover_link_is_replaced_by_a_copy(config):
    """A crash between linking and removing the source leaves one inode with two names:
    the next import must not trust that archive file, since the drop name can still reach it."""
    from watcher import archive
    src = write(config.watch.drop_dir / "a.dcm")
    original = src.read_bytes()
    with Source(str(src), lease=True) as source:
        stored = archive.store_original(source, config.archive.dir)
    assert stored.linked and src.stat().st_nlink == 2
    assert ingest(src, config).outcome == "imported"
    assert stored_file(config).stat().st_nlink == 1
    assert stored_file(config).read_bytes() == original
