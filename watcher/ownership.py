"""One archive, one catalog: which catalog an archive folder belongs to.

Two sites whose configs name different catalogs but the same ``archive.dir`` (a config copied
and only half edited) would each take the other's originals for orphans: ``verify --repair``
would delete them. So the archive keeps the id of its catalog in ``MARK``, the catalog keeps
the same id, and every command that may write (``run``, ``scan``, ``verify --repair``,
``replicate``, …) refuses to start when they differ. Read-only commands never write either.

First use (an installation from before the mark, or a new one) marks both. An archive folder
without a mark is marked for the catalog that is opened with it (a new, empty folder; or a
mark someone removed: the log says so when the folder holds originals).
"""

import logging
import os
import uuid
from pathlib import Path

from .archive import OWNER_MARK as MARK
from .errors import ConfigError
from .models import WebSetting, write_transaction

LOGGER = logging.getLogger(__name__)
KEY = "catalog_id"


class NotOurs(ConfigError):
    """The archive folder belongs to another catalog."""


def claim(archive_dir: Path, database_url: str) -> str | None:
    """The catalog's id, once the archive folder is known to be its own; ``NotOurs`` if the
    folder belongs to another catalog. The catalog must be open (read-write). An archive that
    cannot be read or written now (a disk away, a read-only mount) is not judged: the command
    meets that outage itself, and the next start asks again."""
    mark = archive_dir / MARK
    try:
        archive_dir.mkdir(parents=True, exist_ok=True)
        theirs = _read(mark)
    except OSError as exc:
        LOGGER.warning("cannot tell which catalog the archive %s belongs to: %s", archive_dir, exc)
        return None
    with write_transaction():
        row = WebSetting.get_or_none(WebSetting.key == KEY)
        first = row is None and theirs is None
        if first:
            WebSetting.insert(key=KEY, value=uuid.uuid4().hex).on_conflict_ignore().execute()
            row = WebSetting.get(WebSetting.key == KEY)
    if row is None or (theirs is not None and theirs != row.value):
        raise NotOurs(
            f"the archive {archive_dir} belongs to another catalog (its {MARK} says {theirs}; "
            f"the catalog {database_url} is {row.value if row else 'new, without an archive yet'}): "
            "two sites must not share one archive folder, or each would take the other's "
            "originals for orphans. Correct archive.dir or database.url; if this catalog really "
            f"is that archive's (restored from a backup, say), remove {mark} and start again")
    if theirs is None:
        LOGGER.log(logging.INFO if first else logging.WARNING,
                   "the archive %s is marked as the archive of catalog %s (%s)%s", archive_dir,
                   row.value, mark.name, "" if first else f": it had no {MARK}")
        try:
            _write(mark, row.value)
        except OSError as exc:
            LOGGER.warning("cannot mark the archive %s as this catalog's: %s", archive_dir, exc)
    return row.value


def _read(mark: Path) -> str | None:
    try:
        return mark.read_text().strip() or None
    except FileNotFoundError:
        return None


def _write(mark: Path, value: str) -> None:
    """Atomically and durably: a temporary file renamed over the mark, then the folder fsynced."""
    tmp = mark.with_name(f"{MARK}.{os.getpid()}.tmp")
    with open(tmp, "w") as f:
        f.write(value + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.rename(tmp, mark)
    folder = os.open(mark.parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(folder)
    finally:
        os.close(folder)


__all__ = ["MARK", "NotOurs", "claim"]
