"""What the web app and the API show of one study database: its studies (searched, a page at a
time), one study with its series and where its instances came from, a series' instances, and the
originals to hand out. Read-only; who may ask is decided before (watcher/studies/rights.py).

Only what holds instances counts: a move leaves empty patient, study and series rows behind
(watcher/studies/distribute.py), which are never shown.
"""

import re

from peewee import SQL, fn

from .errors import Refused
from .models import Instance, Patient, Series, Study
from .report import iso

MAX_LIMIT = 500
_DATE = re.compile(r"(\d{8})?(-)?(\d{8})?\Z")


class NotFound(Refused):
    """No such study, series or instance in this database (the web app: 404)."""


def holds_instances(database_id: int):
    """The condition on ``Study`` that it holds an instance of the database, asked of each
    study: one of its series (by their study) has an instance of the database (by the index
    on database and series). Not an ``IN`` over every instance of the database (50–70 ms at
    1,000,000 instances on SQLite, against 6 ms), nor a join of instance to series inside one
    ``EXISTS``, which SQLite plans as a walk over the database's instances for each study."""
    instance = Instance.select(SQL("1")).where(Instance.database_id == database_id,
                                               Instance.series == Series.id)
    return fn.EXISTS(Series.select(SQL("1")).where(Series.study == Study.id, fn.EXISTS(instance)))


def _date_condition(text: str, column=Study.study_date):
    """A DICOM date or range: ``20240501``, ``20240501-20240531``, ``-20240531``, ``20240501-``."""
    m = _DATE.match(text.replace(" ", ""))
    if not m or not (m[1] or m[3]) or (m[3] and not m[2]):
        raise Refused(f"date {text!r}: use YYYYMMDD or a range YYYYMMDD-YYYYMMDD (either end open)")
    if not m[2]:
        return column == m[1]
    condition = True
    if m[1]:
        condition = column >= m[1]
    if m[3]:
        condition = (column <= m[3]) if condition is True else condition & (column <= m[3])
    return condition


def studies(database_id: int, patient: str = "", date: str = "", modality: str = "",
            description: str = "", limit: int = 50, offset: int = 0) -> dict:
    """The studies of the database that hold instances, newest first, searched: ``patient``
    (part of the Patient ID or name), ``date`` (a DICOM date or range), ``modality`` (of one of
    its series), ``description`` (part of it). ``total`` counts them all; ``studies`` is one page."""
    if not 1 <= limit <= MAX_LIMIT or offset < 0:
        raise Refused(f"limit must be 1 to {MAX_LIMIT} and offset not negative")
    query = (Study.select(Study, Patient).join(Patient)
             .where(Study.database_id == database_id, holds_instances(database_id)))
    if patient.strip():
        query = query.where(Patient.patient_id.contains(patient.strip())
                            | Patient.name.contains(patient.strip()))
    if date.strip():
        query = query.where(_date_condition(date.strip()))
    if modality.strip():
        query = query.where(Study.id.in_(Series.select(Series.study).where(
            Series.database_id == database_id, Series.modality == modality.strip().upper())))
    if description.strip():
        query = query.where(Study.description.contains(description.strip()))
    page = list(query.select_extend(fn.COUNT(Study.id).over().alias("matching"))  # (one pass for both)
                .order_by(Study.study_date.desc(), Study.study_time.desc(), Study.id.desc())
                .limit(limit).offset(offset))
    total = page[0].matching if page else query.count() if offset else 0
    counts = _counts([s.id for s in page], database_id)
    return {"total": total, "limit": limit, "offset": offset,
            "studies": [_study(s, counts.get(s.id, {})) for s in page]}


def held_series(study_ids: list[int], database_id: int):
    """(study id, modality, instances) of each series of these studies that holds instances of
    the database: the series found by their study, each counted by the index on database and
    series (a join from instance walks every instance of the database: 60–80 ms at 1,000,000)."""
    if not study_ids:
        return []
    held = (Instance.select(fn.COUNT(Instance.id))
            .where(Instance.database_id == database_id, Instance.series == Series.id))
    rows = Series.select(Series.study, Series.modality, held).where(Series.study.in_(study_ids)).tuples()
    return [(study_id, modality, n) for study_id, modality, n in rows if n]


def _counts(study_ids: list[int], database_id: int) -> dict:
    """Per study: its modalities, how many series and instances it holds in the database."""
    found: dict = {}
    for study_id, modality, n in held_series(study_ids, database_id):
        c = found.setdefault(study_id, {"modalities": set(), "series": 0, "instances": 0})
        c["modalities"].add(modality)
        c["series"] += 1
        c["instances"] += n
    return found


def _study(s: Study, counts: dict) -> dict:
    return {"study_instance_uid": s.study_instance_uid, "patient_id": s.patient.patient_id,
            "patient_name": s.patient.name, "birth_date": s.patient.birth_date,
            "sex": s.patient.sex, "study_date": s.study_date, "study_time": s.study_time,
            "description": s.description, "accession_number": s.accession_number,
            "study_id": s.study_id, "referring_physician": s.referring_physician,
            "modalities": sorted(m for m in counts.get("modalities", ()) if m),
            "series": counts.get("series", 0), "instances": counts.get("instances", 0)}


def _get_study(database_id: int, uid: str) -> Study:
    found = (Study.select(Study, Patient).join(Patient)
             .where(Study.database_id == database_id, Study.study_instance_uid == uid,
                    holds_instances(database_id)).first())
    if found is None:
        raise NotFound(f"no study {uid!r} in this database")
    return found


def study(database_id: int, uid: str) -> dict:
    """One study: its fields, its series, and the provenance of its instances (who created them,
    the way in, who distributed them from where and when)."""
    s = _get_study(database_id, uid)
    rows = (Series.select(Series, fn.COUNT(Instance.id).alias("n"), fn.SUM(Instance.size).alias("bytes"))
            .join(Instance, on=(Instance.series == Series.id))
            .where(Series.study == s.id, Instance.database_id == database_id)
            .group_by(Series.id).order_by(Series.series_number, Series.series_instance_uid))
    series = [{"series_instance_uid": r.series_instance_uid, "modality": r.modality,
               "series_number": r.series_number, "description": r.description,
               "institution_name": r.institution_name, "station_name": r.station_name,
               "instances": r.n, "bytes": int(r.bytes or 0)} for r in rows]
    prov = (Instance.select(Instance.creator, Instance.origin, Instance.calling_ae,
                            Instance.distributed_by, Instance.distributed_at, Instance.distributed_from,
                            fn.COUNT(Instance.id), fn.MIN(Instance.imported_at), fn.MAX(Instance.imported_at))
            .join(Series).where(Series.study == s.id, Instance.database_id == database_id)
            .group_by(Instance.creator, Instance.origin, Instance.calling_ae, Instance.distributed_by,
                      Instance.distributed_at, Instance.distributed_from)
            .order_by(fn.MIN(Instance.imported_at)).tuples())
    provenance = [{"creator": c, "origin": o, "calling_ae": ae, "distributed_by": by,
                   "distributed_at": iso(at), "distributed_from": src, "instances": n,
                   "first_imported_at": iso(first), "last_imported_at": iso(last)}
                  for c, o, ae, by, at, src, n, first, last in prov]
    counts = {"modalities": {x["modality"] for x in series}, "series": len(series),
              "instances": sum(x["instances"] for x in series)}
    return {**_study(s, counts), "bytes": sum(x["bytes"] for x in series), "series_list": series,
            "provenance": provenance}


def instances(database_id: int, study_uid: str, series_uid: str | None = None) -> list[dict]:
    """The instances of a study (or of one of its series) in the database; ``NotFound`` if none."""
    s = _get_study(database_id, study_uid)
    query = (Instance.select(Instance, Series).join(Series)
             .where(Series.study == s.id, Instance.database_id == database_id)
             .order_by(Series.series_number, Series.series_instance_uid, Instance.instance_number,
                       Instance.sop_instance_uid))
    if series_uid is not None:
        query = query.where(Series.series_instance_uid == series_uid)
    found = [{"sop_instance_uid": i.sop_instance_uid, "sop_class_uid": i.sop_class_uid,
              "series_instance_uid": i.series.series_instance_uid,
              "instance_number": i.instance_number, "transfer_syntax_uid": i.transfer_syntax_uid,
              "sha256": i.sha256, "size": i.size, "creator": i.creator, "origin": i.origin,
              "imported_at": iso(i.imported_at), "distributed_by": i.distributed_by,
              "distributed_at": iso(i.distributed_at), "distributed_from": i.distributed_from}
             for i in query]
    if series_uid is not None and not found:
        raise NotFound(f"no series {series_uid!r} in study {study_uid!r}")
    return found


def originals(database_id: int, study_uid: str) -> list[tuple[str, str, str, int, str | None]]:
    """What a download of the study hands out: (name in the download
    ``<series>/<sop>.dcm``, path relative to archive.dir, sha256, size, xxh3)."""
    s = _get_study(database_id, study_uid)
    query = (Instance.select(Series.series_instance_uid, Instance.sop_instance_uid,
                             Instance.stored_path, Instance.sha256, Instance.size, Instance.xxh3)
             .join(Series).where(Series.study == s.id, Instance.database_id == database_id)
             .order_by(Series.series_instance_uid, Instance.sop_instance_uid).tuples())
    return [(f"{series}/{sop}.dcm", stored, sha, size, xxh3)
            for series, sop, stored, sha, size, xxh3 in query]


def missing(kind: str, keys, database_id: int) -> list[str]:
    """The keys (Study or Series Instance UIDs, Patient IDs) that select no instance of the
    database."""
    column = {"study": Study.study_instance_uid, "series": Series.series_instance_uid,
              "patient": Patient.patient_id}.get(kind)
    if column is None:
        raise Refused(f"select by study, series or patient, not {kind!r}")
    keys = [k for k in keys if k]
    found = {k for k, in (Instance.select(column).join(Series).join(Study).join(Patient)
                          .where(Instance.database_id == database_id, column.in_(keys))
                          .distinct().tuples())}
    return [k for k in keys if k not in found]


__all__ = ["MAX_LIMIT", "NotFound", "instances", "missing", "originals", "studies", "study"]
