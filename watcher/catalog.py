"""Write what happened to a file into the Import database (every intake writes there;
watcher/studies/ moves studies on into the research projects' databases).

An instance row, its patient/study/series and its history line commit
together or not at all; instances come in batches (watcher/commit.py), each
batch written with one query per table. Patients, studies and series are inserted with
"on conflict do nothing" and then read back, so two nodes receiving the same
study at the same moment both end up pointing at one row.
"""

import collections
import contextlib
import functools
import json
import logging
import threading
from dataclasses import dataclass

from peewee import IntegrityError
from peewee import __exception_wrapper__ as wrap_errors

from .errors import Rejected
from .names import to_text
from .models import (IMPORT_ID, Disc, Event, Instance, Patient, Rejection, Series, Study, database,
                     utcnow, write_transaction)

LOGGER = logging.getLogger(__name__)


@dataclass(frozen=True)
class InstanceRecord:
    """One stored original waiting for its row."""

    info: object  # watcher.validate.DicomInfo
    stored: object  # watcher.archive.Stored
    source: str
    creator: str
    node: str
    origin: object = None  # watcher.origin.Origin; None: the drop folder


@dataclass(frozen=True)
class DiscRecord:
    """One stored DICOMDIR waiting for its row: the manifest of a disc copy (watcher/discs.py)."""

    stored: object  # watcher.archive.Stored
    source: str
    referenced: tuple  # paths relative to the drop folder
    node: str
    sop_instance_uid: str | None = None  # its Media Storage SOP Instance UID


class _IdCache:
    """Patient, study and series row ids already committed, so a batch need not look them up.

    Ids learned inside a transaction are kept only once it has committed: a
    rolled-back id may be reused by another row.
    """

    def __init__(self):
        self._known: dict = {}
        self._learning: dict | None = None
        self._lock = threading.Lock()
        self._database = None  # the ids belong to this database

    def get(self, key):
        if self._database is not database.obj:
            self._known, self._database = {}, database.obj
        if self._learning is not None and key in self._learning:
            return self._learning[key]
        return self._known.get(key)

    def learn(self, key, value) -> None:
        if self._learning is not None:
            self._learning[key] = value

    @contextlib.contextmanager
    def savepoint(self):
        """Forget what was learned in the block if it fails (its savepoint is rolled back)."""
        before = dict(self._learning or {})
        try:
            yield
        except BaseException:
            if self._learning is not None:
                self._learning = before
            raise

    @contextlib.contextmanager
    def batch(self):
        with self._lock:
            self._learning = {}
            try:
                yield
                self._known.update(self._learning)
            finally:
                self._learning = None


ids = _IdCache()


def record(records: list) -> list:
    """Write instances and discs (inside the caller's transaction); each record's result, in order."""
    if not any(isinstance(r, DiscRecord) for r in records):
        return record_instances(records)
    instances = [r for r in records if not isinstance(r, DiscRecord)]
    of_instances = iter(record_instances(instances) if instances else [])
    of_discs = iter([_record_disc(r) for r in records if isinstance(r, DiscRecord)])
    return [next(of_discs) if isinstance(r, DiscRecord) else next(of_instances) for r in records]


def _record_disc(r: DiscRecord):
    """"dicomdir" (a new disc) or "duplicate" (these bytes came in before)."""
    sha = r.stored.sha256
    for attempt in range(2):  # another node may insert the same bytes at the same moment
        first = Disc.get_or_none(Disc.sha256 == sha)
        if first is not None:
            Event.insert(**_event("duplicate", r.source, r.node, r.sop_instance_uid, sha, intake="folder", detail=(
                f"same bytes as the DICOMDIR from {first.source} at {str(first.arrived_at)[:19]}"))).execute()
            return "duplicate"
        try:
            with database.atomic():
                now = utcnow()
                Disc.insert(source=to_text(r.source), sha256=sha, stored_path=r.stored.relpath,
                            size=r.stored.size, arrived_at=now, node=r.node,
                            referenced=json.dumps(list(r.referenced), ensure_ascii=False)).execute()
                Event.insert(**_event("dicomdir", r.source, r.node, r.sop_instance_uid, sha, at=now,
                                      intake="folder", detail=(
                    f"a DICOMDIR: the index of a disc of {len(r.referenced)} files, kept"))).execute()
            return "dicomdir"
        except IntegrityError:
            if attempt:
                raise


def record_instances(records: list) -> list:
    """Write instances (inside the caller's transaction, see watcher/commit.py).

    Returns, for each record, ``imported`` or ``duplicate`` or a ``Rejected('conflict')``.
    The batch takes one query per table; if another node inserted one of
    these UIDs meanwhile, it is done again one record at a time.
    """
    try:
        with database.atomic(), ids.savepoint():
            return _record_batch(records)
    except IntegrityError:
        LOGGER.debug("concurrent insert in a batch of %d; one at a time", len(records))
        return [_record_one(r) for r in records]


def _record_one(record):
    for attempt in range(3):
        try:
            with database.atomic(), ids.savepoint():
                return _record_batch([record])[0]
        except IntegrityError:
            if attempt == 2:
                raise


_Known = collections.namedtuple("_Known", "sha256 source imported_at")


def _record_batch(records: list) -> list:
    uids = [r.info.sop_instance_uid for r in records]
    known = {uid: _Known(sha, source, str(at)[:19]) for uid, sha, source, at in _select_known(uids)}
    now = utcnow()
    results, rows, events = [], [], []
    for r in records:
        uid, sha = r.info.sop_instance_uid, r.stored.sha256
        first = known.get(uid)
        if first is None:
            known[uid] = _Known(sha, to_text(r.source), str(now)[:19])
            rows.append(r)
            events.append(_event("imported", r.source, r.node, uid, sha, at=now, intake=_intake(r),
                                 detail=_came(r)))
            results.append("imported")
        elif first.sha256 != sha:
            results.append(Rejected(
                "conflict", f"SOP Instance UID {uid} is already imported with other bytes "
                f"(sha256 {first.sha256}, from {first.source}); this file has sha256 {sha}. "
                "Decide which is right; nothing was overwritten"))
        else:
            events.append(_event("duplicate", r.source, r.node, uid, sha, at=now, intake=_intake(r),
                                 detail=f"same bytes as the instance imported from {first.source} "
                                        f"at {first.imported_at}" + (f"; {_came(r)}" if _came(r) else "")))
            results.append("duplicate")
    if rows:
        # Rows are locked in one order by every importer, so two transactions that insert the
        # same patients, studies or UIDs wait for each other instead of deadlocking.
        for r in sorted(rows, key=_parent_order):
            _series_id(r.info)
        rows.sort(key=lambda r: r.info.sop_instance_uid)
        _insert_many(Instance, [_instance_row(r, _series_id(r.info), now) for r in rows])
    if events:
        _insert_many(Event, events)
    return results


# The hot statements are written once and run with executemany: building them
# with peewee's query builder for every batch cost more CPU than all else.

@functools.lru_cache(maxsize=None)
def _insert_sql(model, names: tuple, param: str) -> str:
    fields = [model._meta.fields[n] for n in names]
    return (f'INSERT INTO "{model._meta.table_name}" ('
            + ", ".join(f'"{f.column_name}"' for f in fields)
            + ") VALUES (" + ", ".join([param] * len(fields)) + ")")


def _insert_many(model, rows: list) -> None:
    names = tuple(rows[0])
    fields = [model._meta.fields[n] for n in names]
    values = [tuple(f.db_value(row[n]) for f, n in zip(fields, names)) for row in rows]
    with wrap_errors:  # the driver's errors as peewee's (an IntegrityError, say)
        database.cursor().executemany(_insert_sql(model, names, database.param), values)


def _select_known(uids: list):
    """(uid, sha256, source, imported_at) of the instances already imported among ``uids``."""
    marks = ", ".join([database.param] * len(uids))
    return database.execute_sql(
        f'SELECT "sop_instance_uid", "sha256", "source", "imported_at" FROM "instance" '
        f'WHERE "sop_instance_uid" IN ({marks})', uids).fetchall()


def _instance_row(r, series_id, now) -> dict:
    a = r.info.attributes
    return dict(database_id=IMPORT_ID, sop_instance_uid=r.info.sop_instance_uid,
                sop_class_uid=r.info.sop_class_uid,
                series=series_id, instance_number=_int(a.get("InstanceNumber")),
                transfer_syntax_uid=r.info.transfer_syntax_uid, sha256=r.stored.sha256,
                xxh3=r.stored.xxh3,
                size=r.stored.size, stored_path=r.stored.relpath, creator=r.creator,
                source=to_text(r.source), node=r.node, imported_at=now,
                **(r.origin.columns() if r.origin is not None else FOLDER_COLUMNS))


FOLDER_COLUMNS = {"origin": "folder", "calling_ae": None, "called_ae": None, "remote_host": None}


def _parent_order(record) -> tuple:
    a, info = record.info.attributes, record.info
    return (a.get("PatientID", ""), a.get("IssuerOfPatientID", ""), info.study_instance_uid,
            info.series_instance_uid)


def _series_id(info) -> int:
    key = ("series", info.series_instance_uid)
    found = ids.get(key)
    if found is None:
        a = info.attributes
        found = _get_or_insert(Series, {"database_id": IMPORT_ID,
                                        "series_instance_uid": info.series_instance_uid},
                               study=_study_id(info), modality=a.get("Modality", ""),
                               series_number=_int(a.get("SeriesNumber")),
                               description=a.get("SeriesDescription", ""),
                               institution_name=a.get("InstitutionName", ""),
                               station_name=a.get("StationName", ""))
        ids.learn(key, found)
    return found


def _study_id(info) -> int:
    key = ("study", info.study_instance_uid)
    found = ids.get(key)
    if found is None:
        a = info.attributes
        found = _get_or_insert(Study, {"database_id": IMPORT_ID,
                                       "study_instance_uid": info.study_instance_uid},
                               patient=_patient_id(info), study_date=a.get("StudyDate", ""),
                               referring_physician=a.get("ReferringPhysicianName", ""),
                               study_time=a.get("StudyTime", ""),
                               description=a.get("StudyDescription", ""),
                               accession_number=a.get("AccessionNumber", ""),
                               study_id=a.get("StudyID", ""))
        ids.learn(key, found)
    return found


def _patient_id(info) -> int:
    a = info.attributes
    pid, issuer = a.get("PatientID", ""), a.get("IssuerOfPatientID", "")
    key = ("patient", pid, issuer)
    found = ids.get(key)
    if found is None:
        found = _get_or_insert(Patient, {"database_id": IMPORT_ID, "patient_id": pid, "issuer": issuer},
                               name=a.get("PatientName", ""), birth_date=a.get("PatientBirthDate", ""),
                               sex=a.get("PatientSex", ""))
        ids.learn(key, found)
    return found


def _get_or_insert(model, key: dict, **values) -> int:
    model.insert(**key, **values).on_conflict_ignore().execute()
    query = model.select(model.id)
    for name, value in key.items():
        query = query.where(getattr(model, name) == value)
    return query.scalar()


def _int(text):
    try:
        return int(str(text).strip())
    except (TypeError, ValueError):
        return None


def _event(outcome, source, node, sop_instance_uid=None, sha256=None, reason=None, detail="",
           at=None, intake=None) -> dict:
    return dict(outcome=outcome, source=to_text(source), node=node, at=at or utcnow(),
                sop_instance_uid=sop_instance_uid, sha256=sha256, reason=reason, detail=detail,
                intake=intake)


def _intake(r) -> str:
    return r.origin.kind if getattr(r, "origin", None) is not None else "folder"


def _came(r) -> str:
    """Where an object of another intake than the drop folder came from, for its history line
    (a sender's AE titles and address, an uploader, a replication's source)."""
    origin = getattr(r, "origin", None)
    return f"from {origin.describe()}" if origin is not None and origin.kind != "folder" else ""


def record_event(outcome, source, node, sop_instance_uid=None, sha256=None, reason=None, detail=""):
    Event.insert(**_event(outcome, source, node, sop_instance_uid, sha256, reason, detail)).execute()


def record_rejection(source, reason, detail, path, sha256, size, node,
                     intake: str = "folder") -> tuple[int, int]:
    """Say where a rejected file will lie, before it is moved there; (row id, history id).

    Keyed by that path: if we crash before the move, the next attempt picks
    the same free path and overwrites this row instead of adding another.
    """
    with write_transaction():
        Rejection.delete().where(Rejection.path == to_text(path)).execute()
        row = Rejection.insert(source=to_text(source), reason=reason, detail=detail, path=to_text(path),
                               sha256=sha256, size=size, node=node).execute()
        event = Event.insert(**_event("rejected", source, node, sha256=sha256, reason=reason,
                                      detail=detail, intake=intake)).execute()
    return row, event


def move_rejection(row: int, path) -> None:
    """The name the row said was taken meanwhile: the file goes to ``path`` instead."""
    with write_transaction():
        Rejection.delete().where((Rejection.path == to_text(path)) & (Rejection.id != row)).execute()
        Rejection.update(path=to_text(path)).where(Rejection.id == row).execute()


def forget_rejection(row: int, event: int) -> None:
    """The move failed: the file is still in the drop folder, so no rejection, and no history line."""
    with write_transaction():
        Rejection.delete().where(Rejection.id == row).execute()
        Event.delete().where(Event.id == event).execute()


def is_referenced(stored_path: str) -> bool:
    return (Instance.select().where(Instance.stored_path == stored_path).exists()
            or Disc.select().where(Disc.stored_path == stored_path).exists())
