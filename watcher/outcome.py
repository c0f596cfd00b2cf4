"""What became of one file or object (``Outcome``), and what an exception means for it.

Apart from ``watcher.pipeline``, which makes them, so that a process that only reads
outcomes (a replication's, given them by its ingest process) does not load the pipeline and
its validation (pydicom).
"""

import errno
from dataclasses import dataclass

import peewee

from .errors import Unavailable


@dataclass(frozen=True)
class Outcome:
    outcome: str  # imported, duplicate, dicomdir (a disc's index, kept), rejected, pending, retry,
    #               claimed, vanished
    source: str
    sop_instance_uid: str | None = None
    sha256: str | None = None
    reason: str | None = None
    detail: str = ""
    ms: float = 0.0
    undisposed: str = ""  # recorded, but the file could not be removed or moved: the error
    again: bool = False  # the name now holds another version (or a writer waits): look again
    waiting: str = ""  # why a pending file waits: incomplete, open-for-writing, changing, cannot-dispose
    sop_class_uid: str | None = None  # (ingest_object: what an intake answers its sender with)
    study_uid: str | None = None


def is_unavailable(exc: BaseException) -> bool:
    """Trouble that is not the file's fault: wait and try again, leave the file alone."""
    if isinstance(exc, Unavailable):
        return True
    if isinstance(exc, (peewee.OperationalError, peewee.InterfaceError)):
        return True
    return isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EROFS)


def is_timed(o: Outcome) -> bool:
    """An end of an import (not a file left for later), whose time ``IMPORTS`` counts."""
    return o.outcome not in ("pending", "claimed", "retry")
