"""Store an original, byte for byte, durably, under the name of its content.

Layout: ``<archive>/<YYYY>/<MM>/<DD>/<sha256>.dcm`` (the UTC day it was stored).
The same bytes on the same day land at the same path, so storing is
idempotent: a crash after the rename and before the database commit leaves a
file the next attempt simply finds. One folder a day also means one folder
fsync serves a whole batch of files (watcher/commit.py).

Order: write a temporary file in ``<archive>/.tmp``, fsync it, rename it to its
final name; the caller fsyncs the folder (``Stored.folder``) before any
database row may point at it. A batch may instead leave its originals under their
temporary names unsynced (``sync=False``) and make them all durable at once before its
commit (``make_durable``: one syncfs, then the renames): never is a final name given to
bytes that are not on disk, since a final name is trusted as "already stored".

Whatever stalls the commit (a lock held for minutes, SIGSTOP, a slow disk), an
original's bytes can never change after they were hashed. Two ways get there:

- Shared (no bytes copied): a source on the archive's file system, with no
  other name, read under a read lease (no one had it open for writing). The
  caller first *captures* it (watcher/dispose.py): renames it to a private name
  in its folder and checks, after the rename, that it is still the inode we
  read and that no writer is waiting for it. From then on no one can open it by
  its name, so no writer can ever reach it, however long the commit takes;
  only then is the inode linked into the archive. A writer that was already
  waiting makes the capture fail: the file goes back under its name.
- Copied: everything else. A temporary file of our own, read-only, that no
  other program has a descriptor on.

An archive file is trusted as "already stored" only when it has one name: a
shared inode whose capture is still in the drop folder (a crash between the
link and the commit) is replaced, never trusted.
"""

import contextlib
import ctypes
import datetime
import errno
import fcntl
import hashlib
import logging
import os
import platform
import re
import socket
from dataclasses import dataclass
from pathlib import Path

import xxhash

from .errors import Unavailable

LOGGER = logging.getLogger(__name__)

TMP = ".tmp"
INCOMING = ".incoming"  # the DICOM receiver's objects as they arrive (watcher/receive.py)
LOCK, TURNSTILE = ".lock", ".turnstile"  # see storing() and repairing()
LOCKS = (LOCK, TURNSTILE, ".rejecting")  # kernel locks' files (watcher/dispose.py has the last)
OWNER_MARK = ".catalog-id"  # the id of the catalog this archive belongs to (watcher/ownership.py)
FULL_DISK = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EIO}


@dataclass(frozen=True)
class Stored:
    relpath: str  # relative to the archive folder
    sha256: str
    size: int
    created: bool  # False when these bytes were already there
    folder: Path  # fsync this before a row points at the file
    captured: object = None  # shared: the source's dispose.Capture (removed after the commit)
    xxh3: str | None = None  # see quick_digest
    unsynced: Path | None = None  # stored with sync=False: its temporary name until make_durable


def quick_digest():
    """The checksum a download checks an original against as it sends it (watcher/web/download.py):
    xxh3-128, ~15 times faster than sha256, so that checking every byte does not slow a
    download. sha256 stays the original's identity (its name in the archive), and what
    ``verify`` and replication check."""
    return xxhash.xxh3_128()


def digests(chunks) -> tuple[str, str]:
    """(sha256, xxh3-128) of the bytes ``chunks`` yields."""
    sha, quick = hashlib.sha256(), quick_digest()
    for chunk in chunks:
        sha.update(chunk)
        quick.update(chunk)
    return sha.hexdigest(), quick.hexdigest()


def content_path(sha256: str, day: datetime.date) -> str:
    return f"{day:%Y/%m/%d}/{sha256}.dcm"


def store_original(source, archive_dir: Path, day: datetime.date | None = None, capture=None,
                   known: tuple[str, str] | None = None, sync: bool = True) -> Stored:
    """Store ``source`` (a ``watcher.source.Source``) in the archive; the file is fsynced.

    ``capture()``: takes the source out of sight (watcher/dispose.py); given, the
    source's own inode is shared when it can be, else its bytes are copied.
    ``known``: the (sha256, xxh3) of a file that is ours alone, hashed as we wrote it (a
    fetched original): shared, it is not read and hashed again.
    ``sync=False``: a shared original is left unsynced under a temporary name
    (``Stored.unsynced``) for ``make_durable``, which must come before its row is committed.
    """
    day = day or datetime.datetime.now(datetime.timezone.utc).date()
    try:
        if capture is not None and _can_share(source, archive_dir):
            stored = _store_shared(source, archive_dir, day, capture, known, sync)
            if stored is not None:
                return stored
        return _store_copy(source, archive_dir, day)
    except OSError as exc:
        if exc.errno in FULL_DISK:
            raise Unavailable(f"archive {archive_dir}: {exc.strerror}") from exc
        raise


def _store_copy(source, archive_dir: Path, day: datetime.date) -> Stored:
    if source.whole is not None:
        sha, quick = digests([source.whole])
        rel = content_path(sha, day)
        final = archive_dir / rel
        if _is_stored(final):
            return Stored(rel, sha, source.size, False, final.parent, xxh3=quick)
        tmp, _, _ = _write_temp(archive_dir, [source.whole], hashed=False)  # hashed just above
    else:
        tmp, sha, quick = _write_temp(archive_dir, source.chunks())
        rel = content_path(sha, day)
        final = archive_dir / rel
        if _is_stored(final):
            os.unlink(tmp)
            return Stored(rel, sha, source.size, False, final.parent, xxh3=quick)
    _place(tmp, final)
    return Stored(rel, sha, source.size, True, final.parent, xxh3=quick)


def _can_share(source, archive_dir: Path) -> bool:
    """Under a read lease (no writer had it open), on our file system, with no other name."""
    if not source.leased:
        return False
    try:
        return os.stat(archive_dir).st_dev == source.device and os.fstat(source.fd).st_nlink == 1
    except FileNotFoundError:
        return False


def _store_shared(source, archive_dir: Path, day: datetime.date, capture,
                  known: tuple[str, str] | None = None, sync: bool = True) -> Stored | None:
    sha, quick = known or digests(source.chunks())
    rel = content_path(sha, day)
    final = archive_dir / rel
    if _is_stored(final):
        return Stored(rel, sha, source.size, False, final.parent, xxh3=quick)
    captured = capture()
    if captured is None:  # it could not be taken (a folder we may not write): copy it instead
        return None
    tmp = _temp_name(archive_dir)
    try:
        if source.mode & 0o222:
            os.fchmod(source.fd, 0o444)  # like our own copies (put_back restores its mode)
        _link_inode(source.fd, tmp)
        if not sync:
            return Stored(rel, sha, source.size, True, final.parent, captured, xxh3=quick, unsynced=tmp)
        os.fsync(source.fd)  # its bytes (a writer may have left them in the page cache) and its links
        _place(tmp, final)
        if os.path.lexists(tmp):  # final was a link to this inode already (a crash): rename did nothing
            os.unlink(tmp)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        captured.put_back()
        raise
    return Stored(rel, sha, source.size, True, final.parent, captured, xxh3=quick)


def make_durable(stored: list[Stored]) -> None:
    """Before any row may point at them: the originals stored with ``sync=False`` are made
    durable all at once (one syncfs of the archive's file system serves them all, where an
    fsync each would cost a journal commit each; an fsync each where syncfs would not report
    an error) and only then take their final names; then every folder of ``stored`` is
    fsynced. Should the sync fail, they are removed."""
    waiting = [s for s in stored if s.unsynced is not None]
    placed = 0
    try:
        if waiting and SYNCFS_REPORTS_ERRORS:
            sync_file_system(waiting[0].unsynced.parent)
        else:
            for one in waiting:
                _fsync_path(one.unsynced)
        for one in waiting:
            _place(one.unsynced, one.folder / Path(one.relpath).name)
            if os.path.lexists(one.unsynced):  # the final name was this inode already (a crash)
                os.unlink(one.unsynced)
            placed += 1
    except BaseException as exc:
        for one in waiting[placed:]:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(one.unsynced)
        if isinstance(exc, OSError) and exc.errno in FULL_DISK:  # (as store_original's own fsync)
            raise Unavailable(f"archive {waiting[0].unsynced.parent.parent}: {exc.strerror}") from exc
        raise
    for folder in {s.folder for s in stored}:
        fsync_dir(folder)


_libc = ctypes.CDLL(None, use_errno=True)
# syncfs(2) reports write-back errors only from Linux 5.8 on; before, each file is fsynced.
SYNCFS_REPORTS_ERRORS = tuple(int(n) for n in re.findall(r"\d+", platform.release())[:2]) >= (5, 8)
_file_systems: dict[int, int] = {}  # st_dev -> a descriptor kept open for sync_file_system


def sync_file_system(path: Path) -> None:
    """syncfs(2): everything written to the file system that holds ``path`` is on disk.

    Through one descriptor a file system, kept for the process's life: the kernel reports a
    write-back error once to each open descriptor, and one opened afresh for each call would not
    be told of an error another process had been told of first."""
    device = os.stat(path).st_dev
    fd = _file_systems.get(device)
    if fd is None:
        fd = _file_systems[device] = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    if _libc.syncfs(fd) != 0:
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code), str(path))


SYNC_FILE_RANGE_WRITE = 2


def start_write_back(fd: int) -> None:
    """Have the kernel begin writing the file's dirty pages to disk now, without waiting for
    them (sync_file_range(2), SYNC_FILE_RANGE_WRITE): for a file that is to be made durable
    soon, so that its sync finds the bytes on their way. It promises nothing (the sync that
    follows does) and its failure is ignored."""
    _libc.sync_file_range(fd, ctypes.c_int64(0), ctypes.c_int64(0), SYNC_FILE_RANGE_WRITE)


def _link_inode(fd: int, dest: Path) -> None:
    """A new name for the inode we hold open. linkat(2) follows /proc/self/fd/N only with
    AT_SYMLINK_FOLLOW, which os.link passes only when given a folder descriptor."""
    folder = os.open(dest.parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.link(f"/proc/self/fd/{fd}", dest.name, dst_dir_fd=folder, follow_symlinks=True)
    finally:
        os.close(folder)


def unshare(source, archive_dir: Path, stored: Stored) -> None:
    """Give a shared original a copy of its own, read from the inode while the writer that
    wants it is still held back by our lease."""
    tmp, sha, _ = _write_temp(archive_dir, source.chunks())
    if sha != stored.sha256:  # only after a stall past the lease-break time: say so loudly
        os.unlink(tmp)
        LOGGER.error("the original %s changed after it was hashed (a writer got in while the "
                     "import was stalled); verify will report it", stored.relpath)
        return
    os.rename(tmp, archive_dir / stored.relpath)
    fsync_dir(stored.folder)


def _lock_file(archive_dir: Path, name: str) -> int:
    try:
        return os.open(archive_dir / name, os.O_RDONLY | os.O_CREAT | os.O_CLOEXEC, 0o444)
    except FileNotFoundError:
        archive_dir.mkdir(parents=True, exist_ok=True)
        return os.open(archive_dir / name, os.O_RDONLY | os.O_CREAT | os.O_CLOEXEC, 0o444)


@contextlib.contextmanager
def storing(archive_dir: Path):
    """Held (shared) by an import from before it stores until its rows are committed.

    Imports hold it together; ``repairing`` holds it alone, so a repair never sees
    a stored original whose row is still on its way (it would look like an orphan).
    Kernel locks (flock): a killed process holds nothing. The turnstile makes new
    imports wait while a repair waits, so the repair is not starved.
    """
    turnstile, lock = _lock_file(archive_dir, TURNSTILE), _lock_file(archive_dir, LOCK)
    try:
        fcntl.flock(turnstile, fcntl.LOCK_SH)
        fcntl.flock(lock, fcntl.LOCK_SH)
        os.close(turnstile)
        turnstile = -1
        yield
    finally:
        if turnstile >= 0:
            os.close(turnstile)
        os.close(lock)


@contextlib.contextmanager
def repairing(archive_dir: Path):
    """No import is between storing an original and committing its row while this is held."""
    turnstile, lock = _lock_file(archive_dir, TURNSTILE), _lock_file(archive_dir, LOCK)
    try:
        fcntl.flock(turnstile, fcntl.LOCK_EX)
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield
    finally:
        os.close(lock)
        os.close(turnstile)


def _is_stored(final: Path) -> bool:
    """These bytes are stored already, in a file nothing else can change (it has no other name:
    an earlier version of this program linked sources into the archive)."""
    try:
        return os.stat(final).st_nlink == 1
    except FileNotFoundError:
        return False


def _place(tmp: Path, final: Path) -> None:
    _ensure_dir(final.parent)
    try:
        os.rename(tmp, final)
    except FileNotFoundError:  # the folder was removed behind our back
        _known_dirs.discard(final.parent)
        _ensure_dir(final.parent)
        os.rename(tmp, final)


RESERVE_BYTES = 1 << 30  # what an object that arrives may never take of the archive's disk


def room(folder: Path) -> int:
    """The bytes an object arriving into ``folder`` (on the archive's disk) may take: all that
    is free but ``RESERVE_BYTES``, so that a sender without end never fills the disk."""
    fs = os.statvfs(folder)
    return max(0, fs.f_bavail * fs.f_frsize - RESERVE_BYTES)


def remove(archive_dir: Path, stored: Stored) -> None:
    """Undo a store that no row points at (a conflict or duplicate found after storing)."""
    try:
        os.unlink(archive_dir / stored.relpath)
    except FileNotFoundError:
        pass


def _temp_name(archive_dir: Path) -> Path:
    tmp_dir = archive_dir / TMP
    tmp_dir.mkdir(parents=True, exist_ok=True)
    return tmp_dir / f"{_TMP_PREFIX}{os.getpid()}-{os.urandom(6).hex()}"


def _write_temp(archive_dir: Path, chunks, hashed: bool = True):
    """A new temporary file of ``chunks``, its bytes durable: -> its path, and the sha256 and
    xxh3 of what was written (None, None unless ``hashed``)."""
    tmp = _temp_name(archive_dir)
    digest, quick = (hashlib.sha256(), quick_digest()) if hashed else (None, None)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o444)
    try:
        for chunk in chunks:
            if hashed:
                digest.update(chunk)
                quick.update(chunk)
            view = memoryview(chunk)
            while view:
                view = view[os.write(fd, view):]
        os.fdatasync(fd)  # the bytes and the size; the name is made durable by the folder fsync
    except BaseException:
        os.close(fd)
        os.unlink(tmp)
        raise
    os.close(fd)
    return (tmp, digest.hexdigest(), quick.hexdigest()) if hashed else (tmp, None, None)


_TMP_PREFIX = socket.gethostname().replace("/", "_") + "-"


def remove_stale_temporaries(archive_dir: Path) -> int:
    """At start-up: temporary files of this host's dead processes (a crash mid-store) go."""
    removed = 0
    try:
        names = os.listdir(archive_dir / TMP)
    except FileNotFoundError:
        return 0
    for name in names:
        if not name.startswith(_TMP_PREFIX):
            continue  # another host's: it may still be writing it
        try:
            pid = int(name[len(_TMP_PREFIX):].split("-")[0])
        except ValueError:
            continue
        if not is_alive(pid):
            try:
                os.unlink(archive_dir / TMP / name)
                removed += 1
            except FileNotFoundError:
                pass
    return removed


def is_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


_known_dirs: set = set()


def _ensure_dir(path: Path) -> None:
    """Create the folder and make its entry durable in its parent."""
    if path in _known_dirs:
        return
    missing = []
    p = path
    while not p.exists():
        missing.append(p)
        p = p.parent
    for d in reversed(missing):
        try:
            d.mkdir()
        except FileExistsError:
            pass
        fsync_dir(d.parent)
    _known_dirs.add(path)


def fsync_dir(path: Path) -> None:
    _fsync_path(path, os.O_DIRECTORY)


def _fsync_path(path: Path, flags: int = 0) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | flags)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def digests_of(path: Path) -> tuple[str, str]:
    """(sha256, xxh3-128) of the file at ``path``."""
    with open(path, "rb") as f:
        return digests(iter(lambda: f.read(1 << 20), b""))
