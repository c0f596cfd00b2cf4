"""QIDO-RS: searches of one study database for studies, series and instances, answered in the
DICOM JSON model (PS3.18 F.2). Read-only; who may ask is decided before (studies/rights.py).

Matching keys (by keyword or by tag, ``PatientID`` or ``00100020``): a UID, or a list of
them separated by commas; ``*`` and ``?`` wildcards on text; a date or a date range
``YYYYMMDD-YYYYMMDD``. ``limit`` and ``offset`` page through the matches; an unknown key is
refused rather than ignored (a misspelt filter would otherwise answer everything).
"""

from dataclasses import dataclass

from peewee import SQL, NodeList, fn
from pydicom.datadict import dictionary_VR, keyword_for_tag, tag_for_keyword

from .browse import _date_condition, held_series, holds_instances
from .errors import Refused
from .models import Instance, Patient, Series, Study, is_shared

DEFAULT_LIMIT = 1000
MAX_LIMIT = 10_000


@dataclass(frozen=True)
class Field:
    keyword: str
    column: object  # a peewee column, or None: computed
    kind: str = "text"  # text, uid, date, number


STUDY_FIELDS = [Field("StudyInstanceUID", Study.study_instance_uid, "uid"),
                Field("StudyDate", Study.study_date, "date"), Field("StudyTime", Study.study_time),
                Field("AccessionNumber", Study.accession_number),
                Field("ReferringPhysicianName", Study.referring_physician),
                Field("StudyDescription", Study.description), Field("PatientName", Patient.name),
                Field("PatientID", Patient.patient_id), Field("PatientBirthDate", Patient.birth_date, "date"),
                Field("PatientSex", Patient.sex), Field("StudyID", Study.study_id),
                Field("ModalitiesInStudy", None)]
SERIES_FIELDS = [Field("SeriesInstanceUID", Series.series_instance_uid, "uid"),
                 Field("Modality", Series.modality), Field("SeriesNumber", Series.series_number, "number"),
                 Field("SeriesDescription", Series.description),
                 Field("InstitutionName", Series.institution_name),
                 Field("StationName", Series.station_name)]
INSTANCE_FIELDS = [Field("SOPInstanceUID", Instance.sop_instance_uid, "uid"),
                   Field("SOPClassUID", Instance.sop_class_uid, "uid"),
                   Field("InstanceNumber", Instance.instance_number, "number")]
CONTROL = {"limit", "offset", "includefield", "fuzzymatching"}


def _keyword(key: str) -> str:
    """``PatientID`` or ``00100020`` -> ``PatientID``."""
    if len(key) == 8 and all(c in "0123456789abcdefABCDEF" for c in key):
        return keyword_for_tag(int(key, 16)) or key
    return key


def _matching(params: dict, fields: list[Field]) -> list:
    """The conditions the query's matching keys ask for; ``Refused`` for an unknown key."""
    by_keyword = {f.keyword: f for f in fields}
    conditions = []
    for key, value in params.items():
        if key in CONTROL or value == "":
            continue
        f = by_keyword.get(_keyword(key))
        if f is None:
            raise Refused(f"cannot search by {key!r} here: use one of "
                          f"{', '.join(sorted(by_keyword))}, limit, offset")
        conditions.append(_condition(f, value))
    return conditions


def _condition(f: Field, value: str):
    if f.keyword == "ModalitiesInStudy":
        return Study.id.in_(Series.select(Series.study).where(
            Series.modality.in_([v.strip().upper() for v in value.split(",")])))
    if f.kind == "uid":
        return f.column.in_([v.strip() for v in value.split(",") if v.strip()])
    if f.kind == "date":
        return _date_condition(value, f.column)
    if f.kind == "number":
        return f.column == _number(f.keyword, value)
    if "*" in value or "?" in value:  # DICOM wildcards, matched without regard to case
        pattern = (value.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
                   .replace("*", "%").replace("?", "_"))  # (LIKE's own wildcards taken literally)
        like = "ILIKE" if is_shared() else "LIKE"  # (SQLite's LIKE ignores case already)
        return NodeList((f.column, SQL(like), pattern, SQL("ESCAPE '\\'")))
    if f.keyword == "PatientName":
        return fn.LOWER(f.column) == value.lower()
    return f.column == value


def _number(keyword: str, value: str) -> int:
    """A number a database column can hold (IS: a 32-bit integer)."""
    try:
        number = int(value)
    except ValueError:
        raise Refused(f"{keyword} must be a number, not {value!r}") from None
    if not -2**31 <= number < 2**31:
        raise Refused(f"{keyword} {value} is out of range")
    return number


def _page(params: dict) -> tuple[int, int]:
    limit = _number("limit", params.get("limit", str(DEFAULT_LIMIT)))
    offset = _number("offset", params.get("offset", "0"))
    if not 1 <= limit <= MAX_LIMIT or offset < 0:
        raise Refused(f"limit must be 1 to {MAX_LIMIT} and offset not negative")
    return limit, offset


def _element(keyword: str, value) -> dict:
    vr = dictionary_VR(tag_for_keyword(keyword))
    if value in (None, "", []):
        return {"vr": vr}
    values = value if isinstance(value, list) else [value]
    if vr == "PN":
        values = [{"Alphabetic": v} for v in values]
    elif vr == "IS":
        values = [int(v) for v in values]
    return {"vr": vr, "Value": values}


def _json(pairs: dict) -> dict:
    return {f"{tag_for_keyword(k):08X}": _element(k, v) for k, v in pairs.items()}


def studies(database_id: int, params: dict, root: str) -> tuple[list[dict], bool]:
    """The matching studies (newest first), and whether more match than this page shows."""
    limit, offset = _page(params)
    query = (Study.select(Study, Patient).join(Patient)
             .where(Study.database_id == database_id, holds_instances(database_id)))
    for condition in _matching(params, STUDY_FIELDS):
        query = query.where(condition)
    page = list(query.order_by(Study.study_date.desc(), Study.id.desc()).limit(limit + 1).offset(offset))
    counts = _study_counts([s.id for s in page[:limit]], database_id)
    found = [_study_json(s, counts.get(s.id, ({}, 0, 0)), root) for s in page[:limit]]
    return found, len(page) > limit


def _study_counts(ids: list[int], database_id: int) -> dict:
    found: dict = {}
    if not ids:
        return found
    for study_id, modality, n in held_series(ids, database_id):
        modalities, series, instances = found.get(study_id, (set(), 0, 0))
        found[study_id] = (modalities | {modality} - {""}, series + 1, instances + n)
    return found


def _study_json(s: Study, counts, root: str) -> dict:
    modalities, series, instances = counts or (set(), 0, 0)
    return _json({"StudyInstanceUID": s.study_instance_uid, "StudyDate": s.study_date,
                  "StudyTime": s.study_time, "AccessionNumber": s.accession_number,
                  "ReferringPhysicianName": s.referring_physician,
                  "StudyDescription": s.description, "PatientName": s.patient.name,
                  "PatientID": s.patient.patient_id, "PatientBirthDate": s.patient.birth_date,
                  "PatientSex": s.patient.sex, "StudyID": s.study_id,
                  "ModalitiesInStudy": sorted(modalities),
                  "NumberOfStudyRelatedSeries": series, "NumberOfStudyRelatedInstances": instances,
                  "RetrieveURL": f"{root}studies/{s.study_instance_uid}"})


def series(database_id: int, params: dict, root: str, study_uid: str | None = None):
    """The matching series (of one study, or of any), and whether more match."""
    limit, offset = _page(params)
    query = (Series.select(Series, Study, fn.COUNT(Instance.id).alias("n"))
             .join(Study).switch(Series).join(Instance, on=(Instance.series == Series.id))
             .where(Instance.database_id == database_id)
             .group_by(Series.id, Study.id))
    if study_uid is not None:
        query = query.where(Study.study_instance_uid == study_uid)
    for condition in _matching(params, SERIES_FIELDS + ([] if study_uid else STUDY_FIELDS[:1])):
        query = query.where(condition)
    page = list(query.order_by(Study.id, Series.series_number, Series.id).limit(limit + 1).offset(offset))
    found = [_json({"StudyInstanceUID": r.study.study_instance_uid,
                    "SeriesInstanceUID": r.series_instance_uid, "Modality": r.modality,
                    "SeriesNumber": r.series_number, "SeriesDescription": r.description,
                    "NumberOfSeriesRelatedInstances": r.n,
                    "RetrieveURL": f"{root}studies/{r.study.study_instance_uid}/series/"
                                   f"{r.series_instance_uid}"}) for r in page[:limit]]
    return found, len(page) > limit


def instances(database_id: int, params: dict, root: str, study_uid: str | None = None,
              series_uid: str | None = None):
    """The matching instances, and whether more match."""
    limit, offset = _page(params)
    query = (Instance.select(Instance, Series, Study).join(Series).join(Study)
             .where(Instance.database_id == database_id))
    if study_uid is not None:
        query = query.where(Study.study_instance_uid == study_uid)
    if series_uid is not None:
        query = query.where(Series.series_instance_uid == series_uid)
    keys = INSTANCE_FIELDS + ([] if series_uid else SERIES_FIELDS[:2]) + ([] if study_uid else STUDY_FIELDS[:1])
    for condition in _matching(params, keys):
        query = query.where(condition)
    page = list(query.order_by(Series.id, Instance.instance_number, Instance.id)
                .limit(limit + 1).offset(offset))
    found = []
    for i in page[:limit]:
        st, se = i.series.study.study_instance_uid, i.series.series_instance_uid
        found.append(_json({"StudyInstanceUID": st, "SeriesInstanceUID": se,
                            "SOPClassUID": i.sop_class_uid, "SOPInstanceUID": i.sop_instance_uid,
                            "InstanceNumber": i.instance_number,
                            "AvailableTransferSyntaxUID": i.transfer_syntax_uid,
                            "RetrieveURL": f"{root}studies/{st}/series/{se}/instances/{i.sop_instance_uid}"}))
    return found, len(page) > limit


def originals(database_id: int, study_uid: str, series_uid: str | None = None,
              sop_uid: str | None = None) -> list[tuple[str, str, str | None, int, str]]:
    """What a WADO-RS retrieval hands out: (path relative to archive.dir, sha256, xxh3, size,
    transfer syntax) of each original, in order; empty when nothing matches."""
    query = (Instance.select(Instance.stored_path, Instance.sha256, Instance.xxh3, Instance.size,
                             Instance.transfer_syntax_uid)
             .join(Series).join(Study)
             .where(Instance.database_id == database_id, Study.study_instance_uid == study_uid))
    if series_uid is not None:
        query = query.where(Series.series_instance_uid == series_uid)
    if sop_uid is not None:
        query = query.where(Instance.sop_instance_uid == sop_uid)
    return list(query.order_by(Series.id, Instance.instance_number, Instance.id).tuples())


__all__ = ["instances", "originals", "series", "studies"]
