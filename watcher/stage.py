"""Stage an original: prove the open file complete and valid, store its bytes.

This is the part of an import that costs CPU and I/O and needs no database.
The file stays open (under its lease, where one was granted) until the caller
has committed the row and disposed of the source: only then is it known whether
the version removed is the version stored (watcher/dispose.py).
"""

from dataclasses import dataclass
from pathlib import Path

from . import archive
from .source import Source
from .validate import DicomInfo, validate


@dataclass(frozen=True)
class Staged:
    info: DicomInfo
    stored: archive.Stored  # a DICOMDIR too: it is kept like an original (watcher/discs.py)
    changed: bool  # written to while we read it: the caller must not trust this stage


def prepare(source: Source, archive_dir: Path) -> Staged:
    info = validate(source)
    stored = archive.store_original(source, archive_dir)
    source.drop_buffer()
    return Staged(info, stored, source.changed())
