"""Check the archive against the database: every row has its file with its hash, every file a row.

A row's file is checked against its sha256 and, where the row has one, its xxh3 (what a
download checks): a file that matches the one and not the other is mismatched too."""

import os
from dataclasses import dataclass, field
from pathlib import Path

from peewee import SQL

from . import archive, catalog
from .models import Disc, Instance



@dataclass
class Findings:
    checked: int = 0
    missing: list = field(default_factory=list)
    mismatched: list = field(default_factory=list)
    orphans: list = field(default_factory=list)
    temporary: list = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not (self.missing or self.mismatched)

    def as_dict(self) -> dict:
        return {"checked": self.checked, "missing": self.missing, "mismatched": self.mismatched,
                "orphans": self.orphans, "temporary": self.temporary, "ok": self.ok}


def verify(archive_dir: Path, rehash: bool = True) -> Findings:
    found = Findings()
    referenced = set()
    rows = (Instance.select(Instance.stored_path, Instance.sha256, Instance.xxh3)  # originals,
            .union_all(Disc.select(Disc.stored_path, Disc.sha256, SQL("NULL"))))  # and kept DICOMDIRs
    for stored_path, sha, xxh3 in rows.tuples().iterator():
        referenced.add(stored_path)
        found.checked += 1
        path = archive_dir / stored_path
        if not path.exists():
            found.missing.append(stored_path)
        elif rehash and _differs(archive.digests_of(path), sha, xxh3):
            found.mismatched.append(stored_path)
    for root, dirs, files in os.walk(archive_dir):
        rel_root = os.path.relpath(root, archive_dir)
        if rel_root == ".":
            files = [f for f in files if f not in archive.LOCKS and f != archive.OWNER_MARK]
            dirs[:] = [d for d in dirs if d != archive.INCOMING]  # objects being received, not ours yet
        for name in files:
            rel = name if rel_root == "." else f"{rel_root}/{name}"
            if rel_root.split("/")[0] == archive.TMP:
                found.temporary.append(rel)
            elif rel not in referenced:
                found.orphans.append(rel)
    return found


def _differs(digests: tuple[str, str], sha256: str, xxh3: str | None) -> bool:
    return digests[0] != sha256 or (xxh3 is not None and digests[1] != xxh3)


def repair(archive_dir: Path, findings: Findings) -> list[str]:
    """Remove orphans and leftover temporary files.

    Under ``archive.repairing``: no import is between storing an original and
    committing its row meanwhile, so a file that no row references then is left
    over from a crash, never one that an import in progress is about to reference.
    Each candidate is checked against the database again under the lock.
    """
    removed = []
    with archive.repairing(archive_dir):
        for rel in findings.orphans + findings.temporary:
            if catalog.is_referenced(rel):
                continue
            try:
                (archive_dir / rel).unlink()
                removed.append(rel)
            except FileNotFoundError:
                pass
    return removed
