"""Write what happened to a file into the Import database, one transaction per outcome.

An instance row, its patient/study/series and its history line commit
together or not at all. Patients, studies and series are inserted with
"on conflict do nothing" and then read back, so two nodes receiving the same
study at the same moment both end up pointing at one row.
"""

import logging

from peewee import IntegrityError

from .errors import Rejected
from .names import to_text
from .models import Event, Instance, Patient, Rejection, Series, Study, write_transaction

LOGGER = logging.getLogger(__name__)


def record_instance(info, stored, source: str, creator: str, node: str) -> str:
    """Commit an instance; returns ``imported`` or ``duplicate``, raises ``Rejected('conflict')``."""
    for attempt in range(3):
        try:
            with write_transaction():
                return _record_instance(info, stored, source, creator, node)
        except IntegrityError:
            if attempt == 2:
                raise
            LOGGER.debug("concurrent insert of %s; trying again", info.sop_instance_uid)
    raise AssertionError("unreachable")


def _record_instance(info, stored, source, creator, node) -> str:
    existing = Instance.get_or_none(Instance.sop_instance_uid == info.sop_instance_uid)
    if existing is not None:
        if existing.sha256 != stored.sha256:
            raise Rejected("conflict", f"SOP Instance UID {info.sop_instance_uid} is already imported "
                           f"with other bytes (sha256 {existing.sha256}, from {existing.source}); "
                           f"this file has sha256 {stored.sha256}. Decide which is right; "
                           "nothing was overwritten")
        record_event("duplicate", source, node, info.sop_instance_uid, stored.sha256,
                     detail=f"same bytes as the instance imported from {existing.source} "
                            f"at {existing.imported_at:%Y-%m-%d %H:%M:%S}")
        return "duplicate"
    a = info.attributes
    patient = _get_or_insert(Patient, {"patient_id": a.get("PatientID", ""),
                                       "issuer": a.get("IssuerOfPatientID", "")},
                             name=a.get("PatientName", ""), birth_date=a.get("PatientBirthDate", ""),
                             sex=a.get("PatientSex", ""))
    study = _get_or_insert(Study, {"study_instance_uid": info.study_instance_uid},
                           patient=patient, study_date=a.get("StudyDate", ""),
                           study_time=a.get("StudyTime", ""),
                           description=a.get("StudyDescription", ""),
                           accession_number=a.get("AccessionNumber", ""),
                           study_id=a.get("StudyID", ""))
    series = _get_or_insert(Series, {"series_instance_uid": info.series_instance_uid},
                            study=study, modality=a.get("Modality", ""),
                            series_number=_int(a.get("SeriesNumber")),
                            description=a.get("SeriesDescription", ""))
    Instance.insert(sop_instance_uid=info.sop_instance_uid, sop_class_uid=info.sop_class_uid,
                    series=series, instance_number=_int(a.get("InstanceNumber")),
                    transfer_syntax_uid=info.transfer_syntax_uid, sha256=stored.sha256,
                    size=stored.size, stored_path=stored.relpath, creator=creator,
                    source=to_text(source), node=node).execute()
    record_event("imported", source, node, info.sop_instance_uid, stored.sha256)
    return "imported"


def _get_or_insert(model, key: dict, **values):
    model.insert(**key, **values).on_conflict_ignore().execute()
    query = model.select()
    for name, value in key.items():
        query = query.where(getattr(model, name) == value)
    return query.get()


def _int(text):
    try:
        return int(str(text).strip())
    except (TypeError, ValueError):
        return None


def record_event(outcome, source, node, sop_instance_uid=None, sha256=None, reason=None, detail=""):
    Event.insert(outcome=outcome, source=to_text(source), node=node, sop_instance_uid=sop_instance_uid,
                 sha256=sha256, reason=reason, detail=detail).execute()


def record_rejection(source, reason, detail, path, sha256, size, node) -> None:
    """Say where a rejected file will lie, before it is moved there.

    Keyed by that path: if we crash before the move, the next attempt picks
    the same free path and overwrites this row instead of adding another.
    """
    with write_transaction():
        Rejection.delete().where(Rejection.path == to_text(path)).execute()
        Rejection.insert(source=to_text(source), reason=reason, detail=detail, path=to_text(path),
                         sha256=sha256, size=size, node=node).execute()
        record_event("rejected", source, node, sha256=sha256, reason=reason, detail=detail)


def forget_rejection(path) -> None:
    """The move to ``path`` failed: the file is still in the drop folder, so no rejection row."""
    Rejection.delete().where(Rejection.path == to_text(path)).execute()
