"""Stage an original: prove the open file complete and valid, store its bytes.

This is the part of an import that costs CPU and I/O and needs no database.
The file stays open (under its lease, where one was granted) until the caller
has committed the row and disposed of the source: only then is it known whether
the version removed is the version stored (watcher/dispose.py). When the
archive shares the source's inode (watcher/archive.py), the source is
captured (out of sight under a private name) before it is linked, and the
caller removes the capture after the commit or gives it back its name.
"""

from dataclasses import dataclass
from pathlib import Path

from . import archive
from .source import Source
from .validate import DicomInfo, validate


@dataclass(frozen=True)
class Staged:
    info: DicomInfo
    stored: archive.Stored | None  # a DICOMDIR too: it is kept like an original (watcher/discs.py)
    changed: bool  # written to while we read it: the caller must not trust this stage


def prepare(source: Source, archive_dir: Path, capture=None) -> Staged:
    """``capture()``: see archive.store_original; without it the bytes are always copied."""
    info = validate(source)
    if capture is not None and source.changed():  # (the capture itself checks again, after)
        return Staged(info, None, True)
    stored = archive.store_original(source, archive_dir, capture=capture)
    source.drop_buffer()
    return Staged(info, stored, stored.captured is None and source.changed())
