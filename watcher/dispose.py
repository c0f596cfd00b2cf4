"""Take a file out of the drop folder once its fate is recorded: delete it, or move it.

Rejected files are moved, never deleted, to the rejected folder under the
same relative path (a numbered suffix when that name is taken). A symbolic
link is moved as a link: its target is never touched.
"""

import errno
import os
import shutil
import stat
import time
from pathlib import Path

from .archive import fsync_dir


def free_path(folder: Path, rel: str) -> Path:
    """``folder/rel``, or ``folder/rel.1``, ``.2``... whichever does not exist yet."""
    dest = folder / rel
    n = 0
    while os.path.lexists(dest):
        n += 1
        dest = folder / f"{rel}.{n}"
    return dest


def move(src: Path, dest: Path) -> None:
    """Move a file (or a link, as a link) to ``dest``, durably, across filesystems too."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.rename(src, dest)
    except OSError as exc:
        if exc.errno != errno.EXDEV:
            raise
        _copy_across(src, dest)
        os.unlink(src)
    fsync_dir(dest.parent)


def _copy_across(src: Path, dest: Path) -> None:
    tmp = dest.with_name(dest.name + ".moving")
    if stat.S_ISLNK(os.lstat(src).st_mode):
        os.symlink(os.readlink(src), tmp)
    else:
        shutil.copyfile(src, tmp, follow_symlinks=False)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
    os.rename(tmp, dest)


def remove_source(path: Path, rel: str, on_success: str, done_dir: Path | None) -> None:
    if on_success == "move":
        move(path, free_path(done_dir, rel))
    else:
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass


def prune_empty_dirs(drop_dir: Path, quiet_seconds: float, now: float | None = None) -> int:
    """Remove empty sub-folders that nothing has touched for ``quiet_seconds``.

    A folder emptied a moment ago may be about to receive the next file of a
    copy in progress: removing it then would break the copy. Returns how many
    empty sub-folders are left because they are not quiet long enough yet.
    """
    now = time.time() if now is None else now
    young = 0
    for root, dirs, files in os.walk(drop_dir, topdown=False):
        if Path(root) == drop_dir or files or any(os.path.lexists(os.path.join(root, d)) for d in dirs):
            continue
        try:
            st = os.lstat(root)
            if now - max(st.st_mtime, st.st_ctime) >= quiet_seconds:
                os.rmdir(root)
            else:
                young += 1
        except OSError:
            pass
    return young
