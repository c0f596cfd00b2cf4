"""Stage an original: open the file, prove it complete and valid, store its bytes.

This is the part of an import that costs CPU and I/O and needs no database;
``prepare`` takes and returns only plain values. The database and the drop
folder are left to watcher/pipeline.py.
"""

from dataclasses import dataclass
from pathlib import Path

from . import archive
from .source import Source
from .validate import DicomInfo, validate


@dataclass(frozen=True)
class Staged:
    info: DicomInfo
    stored: archive.Stored | None  # None for a DICOMDIR: it is recorded, never stored
    changed: bool  # written to while we read it: the caller must not trust this stage


def prepare(path: str, archive_dir: Path) -> Staged:
    with Source(path) as source:
        info = validate(source)
        stored = None if info.is_dicomdir else archive.store_original(source, archive_dir)
        return Staged(info, stored, source.changed())

