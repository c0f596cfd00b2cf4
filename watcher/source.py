"""Open one file of the drop folder safely, and read it without reading it twice.

A symbolic link is never followed and a FIFO never blocks us: the file is
opened with O_NOFOLLOW | O_NONBLOCK and must be a regular file. Small files are
read whole, once; validation, hashing and storing all use those same bytes.
Large files are read in blocks, so memory stays flat whatever their size.

The file is reached below the drop folder without following any link
(watcher/beneath.py), and opened under a read lease (fcntl F_SETLEASE) where
the kernel allows one (our own files, or any file when we run as root): the
lease is granted only while nobody has the file open for writing, so a
refusal (EAGAIN) means a writer still holds the file (``Busy``: wait for it);
and while we hold it, anyone who opens the file for writing (or truncates it)
waits until we let go, and we can see that they asked (``lease_broken``).
Where no lease can be had (another user's file, a network share), changes are
seen by the file's signature (size, mtime, ctime, inode).
"""

import errno
import fcntl
import hashlib
import os
import signal
import stat
from dataclasses import dataclass

from . import beneath
from .errors import Busy, Rejected

WHOLE_FILE_LIMIT = 4 << 20  # read files up to this size in one go
BLOCK = 1 << 16


@dataclass(frozen=True)
class Signature:
    """What tells us a file changed: any write moves ctime, and utime cannot fake it.

    A new or removed name moves ctime too; that alone (same size, mtime and inode,
    another link count) is not a change of the contents: the archive linking the
    file, or a crash leaving such a link behind, must not look like a writer.
    """

    size: int
    mtime_ns: int
    ctime_ns: int
    inode: int
    nlink: int

    @classmethod
    def of(cls, st: os.stat_result) -> "Signature":
        return cls(st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino, st.st_nlink)

    def differs_from(self, other: "Signature") -> bool:
        if (self.size, self.mtime_ns, self.inode) != (other.size, other.mtime_ns, other.inode):
            return True
        return self.ctime_ns != other.ctime_ns and self.nlink == other.nlink


def _special() -> Rejected:
    return Rejected("special-file", "not a regular file (FIFO, socket or device); "
                    "only regular files can be imported")


F_SETSIG = getattr(fcntl, "F_SETSIG", 10)
F_SETLEASE = getattr(fcntl, "F_SETLEASE", 1024)
F_GETLEASE = getattr(fcntl, "F_GETLEASE", 1025)
# The kernel signals a lease holder when someone wants the file for writing. We do not
# need the signal (we ask F_GETLEASE at the moments that matter), and SIGIO, the default,
# would kill the process: send one whose default action is to be ignored.
LEASE_BREAK_SIGNAL = signal.SIGURG


class Source:
    """An open regular file from the drop folder. Use as a context manager."""

    def __init__(self, root, rel: str, lease: bool = True, private: bool = False,
                 read_whole: bool = True):
        """``private``: a file only we can reach, whose writer has finished (the receiver's
        incoming object): as good as leased, without asking the kernel for a lease (its
        writer still holds it open). ``read_whole``: a small file is read whole at once (it
        will be hashed); False: only what is asked for (its digests are known)."""
        self.root, self.rel, self.private = root, rel, private
        *folders, self.name = beneath.parts(rel)
        # The folder is reached once, and every later step (the checks, the capture, the
        # removal) acts through this descriptor: a folder swapped for a link meanwhile is
        # never followed, and no step walks the path again.
        self._folders = "/".join(folders)
        self.folder = beneath.open_folder(root, self._folders)
        try:
            self.fd = self._open_file()
        except BaseException:
            os.close(self.folder)
            raise
        try:
            st = os.fstat(self.fd)
            if not stat.S_ISREG(st.st_mode):
                raise _special()
            self.leased = private or (lease and take_read_lease(self.fd))
        except BaseException:
            self.close()
            raise
        self.signature = Signature.of(st)
        self.size = st.st_size
        self.mode = st.st_mode
        self.device = st.st_dev
        self.whole: bytes | None = None
        if read_whole and self.size <= WHOLE_FILE_LIMIT:
            self.whole = self._pread(self.size, 0)
            self._block, self._block_start = self.whole, 0
        else:
            self._block, self._block_start = b"", 0

    def _open_file(self) -> int:
        name, folder, rel = self.name, self.folder, self.rel
        try:
            mode = os.stat(name, dir_fd=folder, follow_symlinks=False).st_mode
            if stat.S_ISDIR(mode):  # a link or file replaced by a folder: its files come on their own
                raise IsADirectoryError(errno.EISDIR, "a folder now", rel)
            if stat.S_ISLNK(mode):
                raise Rejected("symlink", "a symbolic link; links are never followed, "
                               "copy the file itself into the drop folder")
            if not stat.S_ISREG(mode):
                raise _special()
            return os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, dir_fd=folder)
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                raise Rejected("symlink", "a symbolic link; links are never followed") from None
            if exc.errno in (errno.ENXIO, errno.ENODEV):
                raise _special() from None
            if exc.errno in (errno.EACCES, errno.EPERM):
                raise Rejected("unreadable", f"cannot open: {exc.strerror}; "
                               "give the watcher's user read permission") from None
            raise

    def folder_in_place(self) -> bool:
        """The folder we found the file in is still where we found it (not moved out of the
        drop folder meanwhile): a step that moves or removes acts only then. Asked of the
        kernel's name for our descriptor, else by walking the path again."""
        if beneath.path_of(self.folder) == os.path.join(beneath.real(self.root), self._folders).rstrip("/"):
            return True
        try:
            with beneath.folder(self.root, self._folders) as fd:
                there, here = os.fstat(fd), os.fstat(self.folder)
            return (there.st_dev, there.st_ino) == (here.st_dev, here.st_ino)
        except (FileNotFoundError, NotADirectoryError, beneath.Outside):
            return False

    def lstat_name(self) -> os.stat_result:
        """What the file's name holds now, in the folder it was found in."""
        return os.stat(self.name, dir_fd=self.folder, follow_symlinks=False)

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

    def drop_buffer(self) -> None:
        """Forget the bytes read (kept open, the file is read again if needed): a batch of
        files waiting for their commit must not hold their contents in memory."""
        self.whole, self._block, self._block_start = None, b"", 0

    def sha256(self) -> str:
        digest = hashlib.sha256()
        for chunk in self.chunks():
            digest.update(chunk)
        return digest.hexdigest()

    def changed(self) -> bool:
        """True when the file was written to (or its name given to another file) since we
        opened it. Under a lease nobody could write to it; a broken lease means someone is
        waiting to, which makes the file as untrustworthy as a write would."""
        try:
            now = Signature.of(self.lstat_name())
        except FileNotFoundError:
            return True
        if now.inode != self.signature.inode:
            return True
        if self.leased:
            return self.lease_broken()
        return now.differs_from(self.signature) or Signature.of(os.fstat(self.fd)).differs_from(self.signature)

    def still_as_read(self) -> bool:
        """The open file (whatever its name is now) is the version we read, and no writer waits."""
        if self.leased and self.lease_broken():
            return False
        now = Signature.of(os.fstat(self.fd))
        return (now.size, now.mtime_ns, now.ctime_ns) == (
            self.signature.size, self.signature.mtime_ns, self.signature.ctime_ns)

    def lease_broken(self) -> bool:
        """Someone has asked to open the file for writing since we took the lease."""
        if self.private:
            return False
        return fcntl.fcntl(self.fd, F_GETLEASE) != fcntl.F_RDLCK

    def close(self) -> None:
        if getattr(self, "fd", -1) >= 0:
            os.close(self.fd)  # (and with it the lease)
            self.fd = -1
        if self.folder >= 0:
            os.close(self.folder)
            self.folder = -1

    def __enter__(self) -> "Source":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def take_read_lease(fd: int) -> bool:
    """True when we hold a read lease on ``fd``; False when none can be had here (another
    user's file without CAP_LEASE, a file system without leases). Raises ``Busy`` when the
    kernel refuses because someone has the file open for writing."""
    try:
        fcntl.fcntl(fd, F_SETSIG, LEASE_BREAK_SIGNAL)
        fcntl.fcntl(fd, F_SETLEASE, fcntl.F_RDLCK)
        return True
    except OSError as exc:
        if exc.errno == errno.EAGAIN:
            raise Busy("open for writing by another program: waiting until it closes the file") from None
        return False  # EACCES, EPERM, EINVAL: not possible here
