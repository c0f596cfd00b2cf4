"""Take a file out of the drop folder once its fate is recorded: remove it, or move it.

Removal is by identity, never by name. A person may rename a new file over
the one being imported, or ``cp`` over it in place, at any moment. So the
name is first *captured*: renamed, in its own folder, to a private name
(``.dw~…``) that nobody else uses; what was captured is then compared with
the version we imported (inode, size, mtime, and no writer waiting on our
lease). Only that version is unlinked; anything else is put back under its
name (or a free one, if yet another file took the name meanwhile) and is
imported in its turn. A crash between the two steps leaves a ``.dw~`` file,
which the next start puts back (``recover``).

Moves (rejected files, ``done_dir``) never replace a file: a free name is
taken atomically (renameat2 RENAME_NOREPLACE). Across file systems the
version we read is copied from our open descriptor, fsynced, given a free
name, and only then is the source removed, by identity as above.

Every path is reached below its folder without following links
(watcher/beneath.py): nothing here can touch a file outside the drop,
rejected and done folders, whatever is swapped in.
"""

import contextlib
import errno
import fcntl
import itertools
import os
import stat
import time
from pathlib import Path

from . import beneath
from .errors import Busy

PRIVATE = ".dw~"  # names of our own captures; the scanner never looks at them
LOCK = ".rejecting"  # in the archive folder; see one_at_a_time()
NAME_MAX = 255


def remove(source) -> bool:
    """Unlink the file ``source`` read if its name still holds that version; True if it went.

    False when the name now holds another version (or a writer waits for ours):
    that file stays, under its name or a free one.
    """
    if not source.folder_in_place():  # its folder was moved out of ours: not ours to touch
        raise FileNotFoundError(errno.ENOENT, "its folder was moved away", source.rel)
    return _remove_if_same(source.folder, source.name, source)


def _remove_if_same(fd: int, name: str, source) -> bool:
    if not source.still_as_read():
        return False
    private = _private_name(name)
    try:
        os.rename(name, private, src_dir_fd=fd, dst_dir_fd=fd)
    except FileNotFoundError:
        return True  # gone already: someone else removed or moved it
    st = os.stat(private, dir_fd=fd, follow_symlinks=False)
    if _same(st, source) and not (source.leased and source.lease_broken()):
        os.unlink(private, dir_fd=fd)
        return True
    _put_back(fd, private, name)
    return False


class Capture:
    """A source taken out of sight, under a private name in its own folder, while the archive
    shares its inode (watcher/archive.py): nobody can open it by its name any more. It is
    removed after the commit, or given back its name if the import does not complete; a
    crash leaves it to ``recover``. Both go by identity, in the folder the source was found
    in (through the source's descriptor: use a capture only while its source is open)."""

    def __init__(self, source, private: str, st: os.stat_result):
        self.folder, self.name, self.private = source.folder, source.name, private
        self.identity = (st.st_dev, st.st_ino)
        self.mode = stat.S_IMODE(st.st_mode)  # the archive makes it read-only; given back as it was

    def _is_ours(self) -> bool:
        st = os.stat(self.private, dir_fd=self.folder, follow_symlinks=False)
        return (st.st_dev, st.st_ino) == self.identity

    def remove(self) -> None:
        try:
            if self._is_ours():
                os.unlink(self.private, dir_fd=self.folder)
        except FileNotFoundError:
            pass  # removed or moved away by someone else: nothing of ours is left there

    def put_back(self) -> None:
        try:
            if self._is_ours():
                os.chmod(self.private, self.mode, dir_fd=self.folder)
                _put_back(self.folder, self.private, self.name)
        except FileNotFoundError:
            pass


def capture(source) -> Capture | None:
    """Take the file we read (``source``, under a read lease) out of sight: rename it to a
    private name, then check that the renamed file is the inode we read and that no writer
    waits for it. None when it cannot be renamed (the caller copies it instead); ``Busy``
    when the name held another version or a writer waits (it is given back its name)."""
    fd, name = source.folder, source.name
    if not source.folder_in_place():
        return None
    private = _private_name(name)
    try:
        os.rename(name, private, src_dir_fd=fd, dst_dir_fd=fd)
    except OSError:
        return None
    st = os.stat(private, dir_fd=fd, follow_symlinks=False)
    if not _same(st, source) or source.lease_broken():
        _put_back(fd, private, name)
        raise Busy("the file changed (or a writer waits for it) while it was being "
                   "imported: looking again when it is quiet", state="changing")
    return Capture(source, private, st)


def _same(st: os.stat_result, source) -> bool:
    sig = source.signature
    return (st.st_ino, st.st_dev, st.st_size, st.st_mtime_ns) == (
        sig.inode, source.device, sig.size, sig.mtime_ns)


def _private_name(name: str) -> str:
    token = os.urandom(4).hex()
    full = f"{PRIVATE}{token}~{name}"
    return full if len(os.fsencode(full)) <= NAME_MAX else f"{PRIVATE}{token}~"


def _put_back(fd: int, private: str, name: str) -> str:
    """Give a captured file back its name, or the first free ``name.N``; never replace."""
    for candidate in _numbered(name):
        try:
            beneath.rename_noreplace(fd, private, fd, candidate)
            return candidate
        except FileExistsError:
            continue


def _numbered(name: str):
    yield name
    for n in itertools.count(1):
        yield f"{name}.{n}"


def recover(root: Path) -> list[str]:
    """At start-up: captures that a crash left behind get their names back."""
    restored = []
    for folder, _, files in os.walk(root):
        for private in files:
            if not private.startswith(PRIVATE):
                continue
            rel_folder = os.path.relpath(folder, root)
            name = private[len(PRIVATE):].split("~", 1)[-1] or "recovered"
            try:
                with beneath.folder(root, rel_folder) as fd:
                    given = _put_back(fd, private, name)
            except (FileNotFoundError, beneath.Outside):
                continue
            restored.append(os.path.normpath(os.path.join(rel_folder, given)))
    return restored


def transfer(root: Path, rel: str, dest_root: Path, source=None, before=None,
             dest_rel: str | None = None) -> str:
    """Move ``root/rel`` to a free name below ``dest_root`` (``dest_rel`` or ``rel``, then
    with ``.1``, ``.2``, …); return the name it took.

    ``source``: the open file we judged (watcher/source.py), or None for what cannot
    be opened (a link, a FIFO, an unreadable file). ``before(dest_rel)`` is called
    before each name is tried (the rejection row is written there first).
    Raises FileNotFoundError when the file is gone (someone else moved it).
    """
    if source is not None:  # the folder it was found in, if that is still in its place
        if not source.folder_in_place():
            raise FileNotFoundError(errno.ENOENT, "its folder was moved away", rel)
        return _transfer(source.folder, source.name, rel, dest_root, source, before, dest_rel)
    with beneath.parent(root, rel) as (src_fd, name):
        return _transfer(src_fd, name, rel, dest_root, source, before, dest_rel)


def _transfer(src_fd: int, name: str, rel: str, dest_root: Path, source, before, dest_rel) -> str:
    st = os.stat(name, dir_fd=src_fd, follow_symlinks=False)
    if source is not None and not _same(st, source):
        raise FileNotFoundError(errno.ENOENT, "replaced by another file meanwhile", rel)
    for dest_rel in _free_names(dest_rel or rel):
        if beneath.lexists(dest_root, dest_rel):
            continue
        if before is not None:
            before(dest_rel)
        try:
            with beneath.parent(dest_root, dest_rel, create=True) as (dst_fd, dst_name):
                try:
                    beneath.rename_noreplace(src_fd, name, dst_fd, dst_name)
                except OSError as exc:
                    if exc.errno != errno.EXDEV:
                        raise
                    _copy_across(src_fd, name, st, source, dst_fd, dst_name)
                    _remove_after_copy(src_fd, name, st, source)
                os.fsync(dst_fd)
                return dest_rel
        except FileExistsError:
            continue
        except beneath.Outside:  # a file or a link where a folder should be: another name
            continue


@contextlib.contextmanager
def one_at_a_time(archive_dir: Path):
    """Held while a rejected file's free name is chosen, recorded and taken, so two importers
    (processes, or nodes sharing the archive) never record the same name. A kernel lock,
    kept in the archive folder, which every node shares."""
    archive_dir.mkdir(parents=True, exist_ok=True)
    fd = os.open(archive_dir / LOCK, os.O_RDONLY | os.O_CREAT | os.O_CLOEXEC, 0o444)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _free_names(rel: str):
    """``rel``, ``rel.1``, … whose folders can be made; if a folder on the way is taken
    by a file or a link, the top folder gets the number instead (``a.1/b/c``)."""
    first, _, rest = rel.partition("/")
    yield rel
    for n in itertools.count(1):
        yield f"{rel}.{n}"
        if rest:
            yield f"{first}.{n}/{rest}"


def _copy_across(src_fd: int, name: str, st, source, dst_fd: int, dst_name: str) -> None:
    """Copy the version we read to ``dst_name`` (never replacing a file there), fsynced."""
    tmp = f"{PRIVATE}{os.urandom(4).hex()}.moving"
    try:
        if stat.S_ISLNK(st.st_mode):
            os.symlink(os.readlink(name, dir_fd=src_fd), tmp, dir_fd=dst_fd)
        elif source is None:
            if not stat.S_ISREG(st.st_mode):
                os.mknod(tmp, st.st_mode, st.st_rdev, dir_fd=dst_fd)
            else:
                raise PermissionError(errno.EACCES, "cannot read it to copy it to another file system")
        else:
            out = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644, dir_fd=dst_fd)
            try:
                for chunk in source.chunks():
                    view = memoryview(chunk)
                    while view:
                        view = view[os.write(out, view):]
                os.fsync(out)
            finally:
                os.close(out)
        os.link(tmp, dst_name, src_dir_fd=dst_fd, dst_dir_fd=dst_fd, follow_symlinks=False)
    finally:
        try:
            os.unlink(tmp, dir_fd=dst_fd)
        except FileNotFoundError:
            pass


def _remove_after_copy(src_fd: int, name: str, st, source) -> None:
    """The copy is in place: remove the source if it is still what we copied."""
    if source is not None:
        _remove_if_same(src_fd, name, source)  # if not, the newer version stays and is looked at again
        return
    now = os.stat(name, dir_fd=src_fd, follow_symlinks=False)
    if (now.st_ino, now.st_mtime_ns, now.st_ctime_ns) == (st.st_ino, st.st_mtime_ns, st.st_ctime_ns):
        os.unlink(name, dir_fd=src_fd)


def prune_empty_dirs(drop_dir: Path, quiet_seconds: float, now: float | None = None) -> int:
    """Remove empty sub-folders that nothing has touched for ``quiet_seconds``.

    A folder emptied a moment ago may be about to receive the next file of a
    copy in progress: removing it then would break the copy. Each folder is
    removed through its parent's descriptor, reached without following links.
    Returns how many empty sub-folders are left because they are not quiet long enough yet.
    """
    now = time.time() if now is None else now
    young = 0
    for root, dirs, files in os.walk(drop_dir, topdown=False):
        if Path(root) == drop_dir or files or any(os.path.lexists(os.path.join(root, d)) for d in dirs):
            continue
        rel = os.path.relpath(root, drop_dir)
        try:
            with beneath.parent(drop_dir, rel) as (fd, name):
                st = os.stat(name, dir_fd=fd, follow_symlinks=False)
                if not stat.S_ISDIR(st.st_mode):
                    continue
                if quiet_seconds <= 0 or now - max(st.st_mtime, st.st_ctime) >= quiet_seconds:
                    os.rmdir(name, dir_fd=fd)
                else:
                    young += 1
        except OSError:
            pass
    return young
