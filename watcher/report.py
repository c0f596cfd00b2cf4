"""Answers for a person: what came in, what was rejected, what happened, is anyone alive."""

import datetime

from peewee import fn

import os
import re
import time

from . import detect, settle
from .models import (IMPORT_ID, Claim, Event, Heartbeat, Instance, Patient, Rejection, Series, Study,
                     StudyDatabase, Waiting, database, utcnow)
from .studies import databases
from .names import to_text

STALE_HEARTBEATS = 3  # a node silent for this many heartbeat intervals is not responding
HEARTBEAT_SECONDS = 5.0  # (watcher/service.py sends one this often)
PENDING_STATES = ("settling", "queued", "incomplete", "open-for-writing", "changing", "ignored",
                  "claimed", "retrying", "cannot-dispose")


def iso(t: datetime.datetime | None) -> str | None:
    return None if t is None else t.replace(tzinfo=datetime.timezone.utc).isoformat()


def node_state(h, now) -> str:
    """running, paused (an outage), stopped, or not responding (a heartbeat older than
    STALE_HEARTBEATS intervals)."""
    if h.state == "running" and (now - h.last_seen).total_seconds() > STALE_HEARTBEATS * HEARTBEAT_SECONDS:
        return "not responding"
    if h.state == "running" and h.outage:
        return "paused"
    return h.state


def status(database_ids=None, stable_seconds: float = 60.0, listing: list[dict] | None = None) -> dict:
    """Counts for the databases ``database_ids`` (None: all of them), per database, the nodes.
    ``listing``: ``databases.listing()`` as counted already (the dashboard's, counted in the
    background)."""
    now = utcnow()
    per_database = listing if listing is not None else databases.listing()
    chosen = [d for d in per_database if database_ids is None or d["id"] in database_ids]
    return {
        **{k: sum(d[k] for d in chosen) for k in ("patients", "studies", "series", "instances",
                                                   "bytes")},
        "databases": [{k: v for k, v in d.items() if k != "id"} for d in per_database],
        "stable_in_import": per_database[0]["studies"] - _recent_studies(now, stable_seconds),
        "rejected": Rejection.select().count(),
        "last_import": iso(Instance.select(fn.MAX(Instance.imported_at)).scalar()),
        "nodes": [{"node": h.node, "host": h.host, "pid": h.pid, "state": node_state(h, now),
                   "started_at": iso(h.started_at), "last_seen": iso(h.last_seen),
                   "seconds_since_seen": round((now - h.last_seen).total_seconds(), 1),
                   "last_rescan": iso(h.last_rescan), "queue_depth": h.queue_depth,
                   "in_flight": h.in_flight, "outage": h.outage or None,
                   "outage_since": iso(h.outage_since)}
                  for h in Heartbeat.select().order_by(Heartbeat.node)],
    }


def _recent_studies(now, stable_seconds: float) -> int:
    """Studies in import with an instance that arrived within ``stable_seconds``: not stable."""
    since = now - datetime.timedelta(seconds=stable_seconds)
    p = database.param  # ("+": by the time index, not the database one, whatever the statistics)
    return database.execute_sql(
        f'SELECT count(DISTINCT "study_id") FROM "series" WHERE "id" IN (SELECT "series_id" '
        f'FROM "instance" WHERE "imported_at" > {p} AND +"database_id" = {p})',
        (Instance.imported_at.db_value(since), IMPORT_ID)).fetchone()[0] or 0


def instances(archive_dir, limit=None, database_ids=None) -> list[dict]:
    names = {d.id: d.name for d in StudyDatabase.select()}
    query = (Instance.select(Instance, Series, Study, Patient)
             .join(Series).join(Study).join(Patient)
             .order_by(Patient.patient_id, Study.study_date, Study.study_instance_uid,
                       Series.series_number, Series.series_instance_uid,
                       Instance.instance_number, Instance.sop_instance_uid)
             .limit(limit))
    if database_ids is not None:
        query = query.where(Instance.database_id.in_(database_ids))
    return [{
        "database": names.get(i.database_id), "sop_instance_uid": i.sop_instance_uid, "sop_class_uid": i.sop_class_uid,
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
        "imported_at": iso(i.imported_at), "distributed_by": i.distributed_by,
        "distributed_at": iso(i.distributed_at), "distributed_from": i.distributed_from,
        "conflict": i.conflict or None, "origin": i.origin, "calling_ae": i.calling_ae,
        "called_ae": i.called_ae, "remote_host": i.remote_host,
    } for i in query]


def rejects() -> list[dict]:
    return [{"source": r.source, "reason": r.reason, "detail": r.detail, "path": r.path,
             "sha256": r.sha256, "size": r.size, "rejected_at": iso(r.rejected_at), "node": r.node}
            for r in Rejection.select().order_by(Rejection.rejected_at, Rejection.id)]


# what a history line can say happened to a file (why a file was rejected is its reason)
OUTCOMES = ("imported", "duplicate", "dicomdir", "rejected", "retried")
_AGE = re.compile(r"(\d+)\s*([smhdw])")
_UNITS = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days", "w": "weeks"}


def parse_since(text: str, now: datetime.datetime | None = None) -> datetime.datetime:
    """``2024-05-01``, ``2024-05-01T13:30`` (UTC unless it names a zone) or an age (``30m``,
    ``2h``, ``3d``, ``1w``), as the naive UTC time history rows are stored in."""
    age = _AGE.fullmatch(text.strip())
    if age:
        return (now or utcnow()) - datetime.timedelta(**{_UNITS[age[2]]: int(age[1])})
    try:
        t = datetime.datetime.fromisoformat(text.strip())
    except ValueError:
        raise ValueError(f"{text!r} is neither an ISO date or date-time (2024-05-01, "
                         "2024-05-01T13:30, UTC unless a zone is given) nor an age "
                         "(30m, 2h, 3d, 1w)") from None
    return t if t.tzinfo is None else t.astimezone(datetime.timezone.utc).replace(tzinfo=None)


def _events(since=None, outcomes=()):
    query = Event.select()
    if since is not None:
        query = query.where(Event.at >= since)
    if outcomes:
        query = query.where(Event.outcome.in_(list(outcomes)))
    return query


def history(limit=None, since=None, outcomes=()) -> list[dict]:
    """History lines, newest first: all of them, or the newest ``limit``."""
    query = _events(since, outcomes).order_by(Event.at.desc(), Event.id.desc()).limit(limit)
    return [{"at": iso(e.at), "outcome": e.outcome, "source": e.source,
             "sop_instance_uid": e.sop_instance_uid, "sha256": e.sha256, "reason": e.reason,
             "detail": e.detail, "node": e.node} for e in query]


def history_count(since=None, outcomes=()) -> int:
    return _events(since, outcomes).count()


def pending(config) -> list[dict]:
    """Every regular file (or link, FIFO…) in the drop folder without an outcome yet, and why.

    What the service holds back (incomplete, open for writing, retrying, cannot be
    removed) comes from the rows its nodes write with their heartbeats; what is
    ignored, claimed by another node, still settling or simply queued is seen here.
    """
    w = config.watch
    if w.drop_dir is None:
        return []  # no drop folder ([watch])
    held = {r.path: r for r in Waiting.select()}
    claimed = {c.path: c for c in Claim.select()}
    now, rows = time.time(), []
    for path, st in detect.scan(w.drop_dir, ()):
        rel = to_text(os.path.relpath(path, w.drop_dir))
        row = {"path": rel, "size": st.st_size, "state": "", "detail": "", "since": None,
               "next_attempt": None, "node": None}
        pattern = detect.ignored_by(rel, w.ignore)
        if pattern is not None:
            row.update(state="ignored", detail=f"matches the ignore pattern {pattern!r}; rename it to import it")
        elif rel in held:
            r = held[rel]
            row.update(state=r.state, detail=r.detail, since=iso(r.since), next_attempt=iso(r.next_attempt),
                       node=r.node)
        elif to_text(str(path)) in claimed:
            c = claimed[to_text(str(path))]
            row.update(state="claimed", detail=f"being imported by node {c.node}", node=c.node,
                       next_attempt=iso(c.expires_at))
        elif settle.quiet_seconds(st, now) < w.settle_seconds:
            row.update(state="settling", detail=f"written to less than {w.settle_seconds:g} s ago")
        else:
            row.update(state="queued", detail="due: waiting for its turn (or for a service to run)")
        rows.append(row)
    return rows


def pending_counts(rows: list[dict]) -> dict:
    counts = dict.fromkeys(PENDING_STATES, 0)
    for r in rows:
        counts[r["state"]] = counts.get(r["state"], 0) + 1
    return counts


def health(config) -> tuple[bool, str]:
    """The check for monitors (``status --check``): a service on this database has reported
    lately, and its archive is there with room. (Reaching here, the database answered.)"""
    now = utcnow()
    nodes = list(Heartbeat.select())
    paused = [h for h in nodes if node_state(h, now) == "paused"]
    if paused:
        return False, f"node {paused[0].node} is paused since {iso(paused[0].outage_since)}: {paused[0].outage}"
    alive = [h for h in nodes if node_state(h, now) == "running"]
    if not alive:
        if not nodes:
            return False, "no watcher service has reported on this database yet"
        last = max(nodes, key=lambda h: h.last_seen)
        return False, (f"no watcher service is running: node {last.node} is {node_state(last, now)}, "
                       f"last seen {round((now - last.last_seen).total_seconds())} s ago")
    archive = config.archive.dir
    try:
        fs = os.statvfs(archive)
    except OSError as exc:
        return False, f"the archive {archive} is not usable: {exc.strerror}"
    if fs.f_bavail * fs.f_frsize < (16 << 20):
        return False, f"the archive {archive} is full ({fs.f_bavail * fs.f_frsize} bytes free)"
    names = ", ".join(h.node for h in alive)
    return True, f"ok: {len(alive)} importer(s) running ({names}); archive has {fs.f_bavail * fs.f_frsize >> 20} MiB free"
