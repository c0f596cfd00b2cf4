"""Get files back out: rejected files back into the drop folder, stored originals to a folder."""

import errno
import hashlib
import os
from pathlib import Path

from . import beneath, catalog, dispose
from .config import Config
from .errors import Refused, Rejected
from .names import from_text, to_text
from .models import Instance, Patient, Rejection, Series, Study, write_transaction
from .source import Source


class ExportError(Exception):
    """An original cannot be exported as it should be; the message names it."""


def retry(config: Config, sources=()) -> list[str]:
    """Move rejected files (all, or those with these ``source`` paths) back into the drop folder.

    Each goes back at its relative path, or a free name beside it; nothing is replaced,
    and nothing outside the rejected and drop folders is read or written, whatever
    links have been put in either.
    """
    if not config.watches:
        raise Refused("this config has no drop folder ([watch] drop_dir) to put rejected files back "
                      "into; send them again (C-STORE, an upload) once the reason is fixed")
    query = Rejection.select().order_by(Rejection.id)
    if sources:
        query = query.where(Rejection.source.in_(list(sources)))
    rejected_dir, drop = config.archive.rejected_dir, config.watch.drop_dir
    moved = []
    for r in query:
        rel = os.path.relpath(from_text(r.path), rejected_dir)
        if rel.startswith(".."):
            continue  # not in the rejected folder (an older layout): left where it is
        try:
            source = Source(rejected_dir, rel, lease=False)
        except Rejected:
            source = None  # a link or a special file: moved as it is
        except (FileNotFoundError, beneath.Outside):
            continue
        try:
            given = dispose.transfer(rejected_dir, rel, drop, source, dest_rel=from_text(r.source))
        except (FileNotFoundError, beneath.Outside):
            continue
        finally:
            if source is not None:
                source.close()
        with write_transaction():
            r.delete_instance()
            catalog.record_event("retried", r.source, config.import_.node, sha256=r.sha256,
                                 reason=r.reason, detail=f"put back into the drop folder as {to_text(given)}")
        moved.append(r.source)
    return moved


def export(config: Config, uid: str, dest: Path, database_ids=None) -> list[Path]:
    """Copy the originals of an instance, series, study or patient (by UID or Patient ID).

    Never replaces a different file in ``dest`` (the same bytes already there count as
    exported). Each copy is hashed as it is written: an original whose bytes no longer
    match its recorded sha256 is not handed out (``ExportError``).
    """
    query = (Instance.select(Instance, Series, Study, Patient)
             .join(Series).join(Study).join(Patient)
             .where((Instance.sop_instance_uid == uid) | (Series.series_instance_uid == uid)
                    | (Study.study_instance_uid == uid) | (Patient.patient_id == uid)))
    if database_ids is not None:  # (None: every database; a copy in two is exported once)
        query = query.where(Instance.database_id.in_(database_ids))
    written, seen = [], set()
    for i in query:
        if i.sop_instance_uid in seen:
            continue
        seen.add(i.sop_instance_uid)
        target = dest / i.series.study.study_instance_uid / i.series.series_instance_uid
        try:
            target.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise ExportError(f"cannot write to {target}: {exc.strerror}") from None
        out = target / f"{i.sop_instance_uid}.dcm"
        _copy_checked(config.archive.dir / i.stored_path, i.sha256, out)
        written.append(out)
    return written


def _copy_checked(original: Path, sha256: str, out: Path) -> None:
    try:
        src = open(original, "rb")
    except FileNotFoundError:
        raise ExportError(f"the original {original} is missing (run verify)") from None
    except OSError as exc:
        raise ExportError(f"cannot read the original {original}: {exc.strerror}") from None
    tmp = out.with_name(f".{out.name}.{os.urandom(4).hex()}.part")
    digest = hashlib.sha256()
    try:
        with src, open(tmp, "xb") as copy:
            while chunk := src.read(1 << 20):
                digest.update(chunk)
                copy.write(chunk)
            copy.flush()
            os.fsync(copy.fileno())
        if digest.hexdigest() != sha256:
            raise ExportError(f"the original {original} no longer matches its sha256 {sha256} "
                              f"(it has {digest.hexdigest()}); not exported, run verify")
        try:
            os.link(tmp, out)
        except FileExistsError:
            if _sha256_of(out) != sha256:
                raise ExportError(f"{out} exists with other bytes; not replaced") from None
    except OSError as exc:
        if isinstance(exc, FileExistsError) or exc.errno == errno.EEXIST:
            raise ExportError(f"{out}: {exc.strerror}") from None
        raise ExportError(f"cannot write {out}: {exc.strerror}") from None
    finally:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass


def _sha256_of(path: Path) -> str | None:
    try:
        with open(path, "rb") as f:
            return hashlib.file_digest(f, "sha256").hexdigest()
    except OSError:
        return None
