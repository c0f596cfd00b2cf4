"""Open one file of the drop folder safely, and read it without reading it twice.

A symbolic link is never followed and a FIFO never blocks us: the file is
opened with O_NOFOLLOW | O_NONBLOCK and must be a regular file. Small files are
read whole, once; validation, hashing and storing all use those same bytes.
Large files are read in blocks, so memory stays flat whatever their size.
"""

import errno
import os
import stat
from dataclasses import dataclass

from .errors import Rejected

WHOLE_FILE_LIMIT = 4 << 20  # read files up to this size in one go
BLOCK = 1 << 16


@dataclass(frozen=True)
class Signature:
    """What tells us a file changed: any write moves ctime, and utime cannot fake it."""

    size: int
    mtime_ns: int
    ctime_ns: int
    inode: int

    @classmethod
    def of(cls, st: os.stat_result) -> "Signature":
        return cls(st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino)


def _special() -> Rejected:
    return Rejected("special-file", "not a regular file (FIFO, socket or device); "
                    "only regular files can be imported")


class Source:
    """An open regular file from the drop folder. Use as a context manager."""

    def __init__(self, path: str):
        self.path = path
        try:
            mode = os.lstat(path).st_mode
            if stat.S_ISLNK(mode):
                raise Rejected("symlink", "a symbolic link; links are never followed, "
                               "copy the file itself into the drop folder")
            if not stat.S_ISREG(mode):
                raise _special()
            self.fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                raise Rejected("symlink", "a symbolic link; links are never followed") from None
            if exc.errno in (errno.ENXIO, errno.ENODEV):
                raise _special() from None
            if exc.errno in (errno.EACCES, errno.EPERM):
                raise Rejected("unreadable", f"cannot open: {exc.strerror}; "
                               "give the watcher's user read permission") from None
            raise
        st = os.fstat(self.fd)
        if not stat.S_ISREG(st.st_mode):
            os.close(self.fd)
            raise _special()
        self.signature = Signature.of(st)
        self.size = st.st_size
        self.whole: bytes | None = None
        if self.size <= WHOLE_FILE_LIMIT:
            self.whole = self._pread(self.size, 0)
            self._block, self._block_start = self.whole, 0
        else:
            self._block, self._block_start = b"", 0

    def _pread(self, n: int, pos: int) -> bytes:
        try:
            return os.pread(self.fd, n, pos)
        except OSError as exc:
            if exc.errno == errno.EIO:
                raise Rejected("unreadable", f"I/O error while reading: {exc.strerror}") from None
            raise

    def read_at(self, pos: int, n: int) -> bytes:
        """Up to n bytes from pos (fewer at the end of the file)."""
        start = pos - self._block_start
        if 0 <= start and start + n <= len(self._block):
            return self._block[start:start + n]
        if self.whole is not None:
            return self.whole[pos:pos + n]
        self._block = self._pread(max(n, BLOCK), pos)
        self._block_start = pos
        return self._block[:n]

    def chunks(self, size: int = 1 << 20):
        """The whole file from the start, in chunks, for hashing and copying."""
        if self.whole is not None:
            yield self.whole
            return
        pos = 0
        while pos < self.size:
            chunk = self._pread(min(size, self.size - pos), pos)
            if not chunk:
                break
            yield chunk
            pos += len(chunk)

    def changed(self) -> bool:
        """True when the file was written to (or replaced) since we opened it."""
        try:
            now = Signature.of(os.stat(self.path, follow_symlinks=False))
        except FileNotFoundError:
            return True
        return now != self.signature or Signature.of(os.fstat(self.fd)) != self.signature

    def close(self) -> None:
        os.close(self.fd)

    def __enter__(self) -> "Source":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
