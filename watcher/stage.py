"""Stage an original: open the file, prove it complete and valid, store its bytes.

This is the part of an import that costs CPU and I/O and needs no database.
The file stays open (and, when the archive took its inode, under its lease)
until the caller has committed the row and disposed of the source: only then
can we tell whether a writer asked for the file meanwhile, and if one did, the
archive gets its own copy before the file is let go.
"""

import contextlib
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


@contextlib.contextmanager
def prepare(path: str, archive_dir: Path, link: bool = False):
    """Yield the ``Staged`` file; ``link``: the archive may take the file's own inode."""
    with Source(path, lease=link) as source:
        info = validate(source)
        stored = None if info.is_dicomdir else archive.store_original(source, archive_dir)
        source.drop_buffer()
        yield Staged(info, stored, source.changed())
        if stored is not None and stored.linked and source.lease_broken():
            archive.unshare(source, archive_dir, stored)
