"""Uploads (STOW-RS): a person sends originals over HTTP, and is recorded as their creator.

The body (``multipart/related; type="application/dicom"``) is written part by part into files
in the archive's folder for incoming objects (memory stays flat; on the archive's file system
the archive takes each file's inode). Each part goes through the one ingest path
(``pipeline.ingest_object``: validate, store, record into the Import database) and then, for
an upload into a study database, those instances alone are moved there
(``distribute.move``, recorded as distributed by the uploader). The answer lists every part:
stored (imported, or already there with the same bytes), or failed with its status
(watcher/statuses.py) and reason; a failed part is kept in ``rejected_dir/upload/<user>/``.

A part is acknowledged only after its original is durable and its row committed, like a
C-STORE. A crash before the move leaves the instance in the Import database, where the data
manager sees it (and an upload sent again moves it on).
"""

import logging
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from . import archive, statuses
from .config import Config
from .errors import Rejected, Unavailable
from .models import IMPORT, Instance
from .multipart import Part
from .origin import from_upload
from .outcome import is_unavailable
from .pipeline import ingest_object

LOGGER = logging.getLogger(__name__)


@dataclass
class Result:
    """What happened to each part of one upload."""
    stored: list = field(default_factory=list)  # (sop class, sop instance, study uid, outcome)
    failed: list = field(default_factory=list)  # (sop class, sop instance, status, reason)
    moved_to: str = IMPORT


def incoming_folder(config: Config) -> Path:
    """Where this node's uploads are written while they arrive. Emptied when the web app
    starts: what is there was never acknowledged."""
    return config.archive.dir / archive.INCOMING / ("upload-" + config.import_.node.replace("/", "_"))


def clear_incoming(config: Config) -> Path:
    folder = incoming_folder(config)
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def store_parts(parts: list[Part], config: Config, user: str, remote_host: str,
                database: str = IMPORT, study_uid: str | None = None) -> Result:
    """Ingest each part (a file in ``incoming_folder``), then move what was stored into
    ``database``. ``study_uid``: the upload was sent to one study; an instance of another is
    refused (A900) and kept as rejected."""
    origin = from_upload(user, remote_host)
    result = Result(moved_to=database)
    for part in parts:
        try:
            _store_one(part, origin, config, study_uid, result)
        finally:
            part.path.unlink(missing_ok=True)  # (the archive holds its own link to a stored one)
    if database != IMPORT and result.stored:
        _move(result, database, user)
    _confirm(result, database)
    return result


def _store_one(part: Part, origin, config: Config, study_uid: str | None, result: Result) -> None:
    refused = None
    if part.content_type != "application/dicom":
        refused = Rejected("media-type", f"a part of type {part.content_type!r}: STOW-RS takes "
                                         "application/dicom parts; send it again as one")
    try:
        outcome = ingest_object(part.path, origin, config, study_uid=study_uid, refused=refused)
    except Exception as exc:
        if isinstance(exc, Unavailable) or is_unavailable(exc):
            LOGGER.warning("upload by %s refused: %s", origin.creator, exc)
            result.failed.append(("", "", statuses.OUT_OF_RESOURCES,
                                  "archive or database unavailable; send again later"))
            return
        LOGGER.exception("upload by %s failed", origin.creator)
        result.failed.append(("", "", statuses.OUT_OF_RESOURCES, f"{type(exc).__name__}: not stored"))
        return
    status = statuses.of(outcome)
    if status == statuses.SUCCESS:
        result.stored.append((outcome.sop_class_uid, outcome.sop_instance_uid, outcome.study_uid,
                              outcome.outcome))
    elif outcome.reason == "conflict":  # (its detail names the other database and file: not for the uploader)
        result.failed.append((outcome.sop_class_uid or "", outcome.sop_instance_uid or "", status,
                              "conflict: this SOP Instance UID is stored already, with other bytes; "
                              "kept as rejected for a data manager to decide"))
    else:
        result.failed.append((outcome.sop_class_uid or "", outcome.sop_instance_uid or "", status,
                              f"{outcome.reason}: kept as rejected; {outcome.detail}"))


def _confirm(result: Result, database: str) -> None:
    """Success only for what is now in ``database``: an instance the archive holds already in
    another database (a duplicate found there) is not, and is reported as failed, without
    naming where it is."""
    from .studies import databases
    if not result.stored:
        return
    target = databases.get(database).id
    here = set()
    sops = [sop for _, sop, _, _ in result.stored]
    for i in range(0, len(sops), 500):
        here.update(sop for sop, in Instance.select(Instance.sop_instance_uid).where(
            Instance.database_id == target, Instance.sop_instance_uid.in_(sops[i:i + 500])).tuples())
    for item in [s for s in result.stored if s[1] not in here]:
        result.stored.remove(item)
        result.failed.append((item[0], item[1], statuses.PROCESSING_FAILURE,
                              f"already in the archive, but in another database than {database!r}: "
                              "ask a data manager to distribute it"))


def _move(result: Result, database: str, user: str) -> None:
    """The stored instances, out of the Import database into ``database``: these alone, one
    study at a time (``distribute.move``; what is there already with the same bytes counts)."""
    from .studies import distribute
    by_study: dict[str, list[str]] = {}
    for _, sop, study, _ in result.stored:
        by_study.setdefault(study, []).append(sop)
    for study, sops in by_study.items():
        unit = distribute.Unit(study, only=tuple(sops))
        distribute.move(unit, IMPORT, database, actor=f"{user} (upload)")


__all__ = ["Result", "clear_incoming", "incoming_folder", "store_parts"]
