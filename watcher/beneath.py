"""Reach a path below one of our folders without ever following a link.

A person who can write the drop folder can replace a sub-folder with a
symbolic link at any moment (``mv drop/sub away; ln -s /etc drop/sub``). So no
operation of ours on the drop, rejected or done folder lets the kernel follow a
link on the way: the folder is opened from the top folder's descriptor with
openat2(RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS), in one system call (Linux 5.6
and later), or else walked one folder at a time, each step opened with
O_NOFOLLOW | O_DIRECTORY; the last step (a file) is then acted on by (folder
descriptor, name). A link anywhere on the way is an error (``Outside``), never
a way out.

``rename_noreplace`` is renameat2(RENAME_NOREPLACE): a name is taken only if
it is free, atomically, so a file never silently replaces another.
"""

import contextlib
import ctypes
import errno
import functools
import os
from pathlib import Path

DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long


class Outside(OSError):
    """The path leads through a link or a non-folder: it is not (or no longer) below the folder."""


def parts(rel: str) -> list[str]:
    names = [p for p in rel.split("/") if p not in ("", ".")]
    if not names or ".." in names:
        raise Outside(errno.EXDEV, f"not a path below the folder: {rel!r}")
    return names


def _step(fd: int, name: str, create: bool) -> int:
    try:
        return os.open(name, DIR_FLAGS, dir_fd=fd)
    except FileNotFoundError:
        if not create:
            raise
        try:
            os.mkdir(name, 0o755, dir_fd=fd)
            os.fsync(fd)  # the new folder's entry is durable before anything is put in it
        except FileExistsError:
            pass
        return _step(fd, name, False)
    except OSError as exc:
        if exc.errno in (errno.ELOOP, errno.ENOTDIR):
            raise Outside(exc.errno, f"{name!r} is a link or not a folder") from None
        raise


@contextlib.contextmanager
def folder(root: Path, rel: str = "", create: bool = False):
    """The descriptor of the folder ``root/rel``, reached without following links.

    ``create``: make the folders on the way (``root`` itself included) that do not exist.
    """
    fd = open_folder(root, rel, create)
    try:
        yield fd
    finally:
        os.close(fd)


def open_folder(root: Path, rel: str = "", create: bool = False) -> int:
    """``folder`` for a caller that keeps the descriptor (and closes it)."""
    if create:
        Path(root).mkdir(parents=True, exist_ok=True)
    fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        names = parts(rel) if rel not in ("", ".") else []
        if names and not create and OPENAT2:
            inner = _open_beneath(fd, "/".join(names))
            os.close(fd)
            return inner
        for name in names:
            inner = _step(fd, name, create)
            os.close(fd)
            fd = inner
        return fd
    except BaseException:
        os.close(fd)
        raise


def path_of(fd: int) -> str | None:
    """Where the kernel says an open folder is now (None when it cannot say)."""
    try:
        return os.readlink(f"/proc/self/fd/{fd}")
    except OSError:
        return None


@functools.lru_cache(maxsize=64)
def real(root) -> str:
    """``root`` with its links resolved, as ``path_of`` names folders below it."""
    return os.path.realpath(root)


class _OpenHow(ctypes.Structure):
    _fields_ = [("flags", ctypes.c_uint64), ("mode", ctypes.c_uint64), ("resolve", ctypes.c_uint64)]


SYS_OPENAT2 = 437  # the same number on every architecture (a syscall added after the unification)
RESOLVE_NO_MAGICLINKS, RESOLVE_NO_SYMLINKS, RESOLVE_BENEATH = 0x02, 0x04, 0x08


def _open_beneath(fd: int, rel: str) -> int:
    how = _OpenHow(DIR_FLAGS, 0, RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS | RESOLVE_NO_MAGICLINKS)
    inner = _libc.syscall(ctypes.c_long(SYS_OPENAT2), ctypes.c_int(fd), os.fsencode(rel), ctypes.byref(how),
                          ctypes.c_size_t(ctypes.sizeof(how)))
    if inner >= 0:
        return inner
    code = ctypes.get_errno()
    if code in (errno.ELOOP, errno.ENOTDIR, errno.EXDEV):
        raise Outside(code, f"{rel!r} leads through a link or a non-folder")
    raise OSError(code, os.strerror(code), rel)


def _has_openat2() -> bool:
    """openat2 works here (Linux 5.6+, and no seccomp filter refusing it)."""
    fd = os.open("/", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.close(_open_beneath(fd, "."))
        return True
    except OSError:
        return False
    finally:
        os.close(fd)


@contextlib.contextmanager
def parent(root: Path, rel: str, create: bool = False):
    """(folder descriptor, name) of the last component of ``rel`` below ``root``."""
    *folders, name = parts(rel)
    with folder(root, "/".join(folders), create) as fd:
        yield fd, name


def lstat(root: Path, rel: str) -> os.stat_result:
    with parent(root, rel) as (fd, name):
        return os.stat(name, dir_fd=fd, follow_symlinks=False)


def lexists(root: Path, rel: str) -> bool:
    try:
        lstat(root, rel)
        return True
    except (FileNotFoundError, Outside):
        return False


RENAME_NOREPLACE = 1


def rename_noreplace(src_fd: int, src: str, dst_fd: int, dst: str) -> None:
    """Rename, failing with FileExistsError if ``dst`` exists (never replacing it)."""
    result = _libc.renameat2(src_fd, os.fsencode(src), dst_fd, os.fsencode(dst), RENAME_NOREPLACE)
    if result == 0:
        return
    code = ctypes.get_errno()
    if code in (errno.EINVAL, errno.ENOSYS):  # a file system without it: link, then unlink
        os.link(src, dst, src_dir_fd=src_fd, dst_dir_fd=dst_fd, follow_symlinks=False)
        os.unlink(src, dir_fd=src_fd)
        return
    raise OSError(code, os.strerror(code), dst)


OPENAT2 = _has_openat2()
