"""Answers for a person: what came in, what was rejected, what happened, is anyone alive."""

import datetime

from peewee import fn

from .models import Event, Heartbeat, Instance, Patient, Rejection, Series, Study, utcnow


def iso(t: datetime.datetime | None) -> str | None:
    return None if t is None else t.replace(tzinfo=datetime.timezone.utc).isoformat()


def status() -> dict:
    now = utcnow()
    return {
        "patients": Patient.select().count(),
        "studies": Study.select().count(),
        "series": Series.select().count(),
        "instances": Instance.select().count(),
        "bytes": int(Instance.select(fn.COALESCE(fn.SUM(Instance.size), 0)).scalar()),
        "rejected": Rejection.select().count(),
        "last_import": iso(Instance.select(fn.MAX(Instance.imported_at)).scalar()),
        "nodes": [{"node": h.node, "host": h.host, "pid": h.pid, "state": h.state,
                   "started_at": iso(h.started_at), "last_seen": iso(h.last_seen),
                   "seconds_since_seen": round((now - h.last_seen).total_seconds(), 1),
                   "last_rescan": iso(h.last_rescan), "queue_depth": h.queue_depth,
                   "in_flight": h.in_flight}
                  for h in Heartbeat.select().order_by(Heartbeat.node)],
    }


def instances(archive_dir, limit=None) -> list[dict]:
    query = (Instance.select(Instance, Series, Study, Patient)
             .join(Series).join(Study).join(Patient)
             .order_by(Patient.patient_id, Study.study_date, Study.study_instance_uid,
                       Series.series_number, Series.series_instance_uid,
                       Instance.instance_number, Instance.sop_instance_uid)
             .limit(limit))
    return [{
        "sop_instance_uid": i.sop_instance_uid, "sop_class_uid": i.sop_class_uid,
        "series_instance_uid": i.series.series_instance_uid,
        "study_instance_uid": i.series.study.study_instance_uid,
        "patient_id": i.series.study.patient.patient_id,
        "patient_name": i.series.study.patient.name,
        "study_date": i.series.study.study_date,
        "study_description": i.series.study.description,
        "modality": i.series.modality, "series_number": i.series.series_number,
        "series_description": i.series.description, "instance_number": i.instance_number,
        "sha256": i.sha256, "size": i.size, "creator": i.creator,
        "stored_path": str(archive_dir / i.stored_path), "source": i.source, "node": i.node,
        "imported_at": iso(i.imported_at),
    } for i in query]


def rejects() -> list[dict]:
    return [{"source": r.source, "reason": r.reason, "detail": r.detail, "path": r.path,
             "sha256": r.sha256, "size": r.size, "rejected_at": iso(r.rejected_at), "node": r.node}
            for r in Rejection.select().order_by(Rejection.rejected_at, Rejection.id)]


def history(limit=None) -> list[dict]:
    query = Event.select().order_by(Event.at.desc(), Event.id.desc()).limit(limit)
    return [{"at": iso(e.at), "outcome": e.outcome, "source": e.source,
             "sop_instance_uid": e.sop_instance_uid, "sha256": e.sha256, "reason": e.reason,
             "detail": e.detail, "node": e.node} for e in query]
