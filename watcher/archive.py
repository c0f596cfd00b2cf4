"""Store an original, byte for byte, durably, under the name of its content.

Layout: ``<archive>/<sha[0:2]>/<sha[2:4]>/<sha256>.dcm``. The same bytes always
land at the same path, so storing is idempotent: a crash after the rename and
before the database commit leaves a file the next attempt simply finds.

Order: write a temporary file in ``<archive>/.tmp``, fsync it, rename it to its
final name, fsync the folder. Only then may a database row point at it.
"""

import errno
import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

from .errors import Unavailable

TMP = ".tmp"
FULL_DISK = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EIO}


@dataclass(frozen=True)
class Stored:
    relpath: str  # relative to the archive folder
    sha256: str
    size: int
    created: bool  # False when these bytes were already in the archive


def content_path(sha256: str) -> str:
    return f"{sha256[:2]}/{sha256[2:4]}/{sha256}.dcm"


def store_original(source, archive_dir: Path) -> Stored:
    """Copy ``source`` (a ``watcher.source.Source``) into the archive, durably."""
    try:
        if source.whole is not None:
            sha = hashlib.sha256(source.whole).hexdigest()
            final = archive_dir / content_path(sha)
            if final.exists():
                return Stored(content_path(sha), sha, source.size, created=False)
            tmp, _ = _write_temp(archive_dir, [source.whole])
        else:
            tmp, sha = _write_temp(archive_dir, source.chunks())
            final = archive_dir / content_path(sha)
            if final.exists():
                os.unlink(tmp)
                return Stored(content_path(sha), sha, source.size, created=False)
        _ensure_dir(final.parent)
        try:
            os.rename(tmp, final)
        except FileNotFoundError:  # the folder was removed behind our back
            _known_dirs.discard(final.parent)
            _ensure_dir(final.parent)
            os.rename(tmp, final)
        fsync_dir(final.parent)
        return Stored(content_path(sha), sha, source.size, created=True)
    except OSError as exc:
        if exc.errno in FULL_DISK:
            raise Unavailable(f"archive {archive_dir}: {exc.strerror}") from exc
        raise


def remove(archive_dir: Path, stored: Stored) -> None:
    """Undo a store that no row will ever point at (a conflict found after storing)."""
    if stored.created:
        try:
            os.unlink(archive_dir / stored.relpath)
        except FileNotFoundError:
            pass


def _write_temp(archive_dir: Path, chunks):
    tmp_dir = archive_dir / TMP
    tmp_dir.mkdir(parents=True, exist_ok=True)
    tmp = tmp_dir / f"{os.getpid()}-{os.urandom(6).hex()}"
    digest = hashlib.sha256()
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o444)
    try:
        for chunk in chunks:
            digest.update(chunk)
            view = memoryview(chunk)
            while view:
                view = view[os.write(fd, view):]
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        os.unlink(tmp)
        raise
    os.close(fd)
    return tmp, digest.hexdigest()


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
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()
