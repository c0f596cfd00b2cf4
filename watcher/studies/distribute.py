"""Move (or copy) studies from one study database into another.

A study database is a partition of the one catalog, so a move changes rows, never bytes:
each instance row is re-pointed at the target's patient, study and series rows (made when
missing) in one transaction per study. A crash leaves every study wholly moved or not at
all; running the same command again moves what is left and reports the rest as already
there. An instance whose SOP Instance UID the target already holds with the same bytes is
already there (a move drops the source's row); with other bytes it is a conflict: it stays
where it is, marked, and the rest of the study moves.

The rows a move empties stay behind, empty: an importer may hold their ids (watcher/catalog.py
caches them), and an instance it records there later is a late arrival, which ``follow``
moves on to where its study went (``route``). Every listing counts only rows with instances.
"""

import dataclasses
import datetime
import logging

from peewee import fn

from ..errors import Refused
from ..models import (IMPORT, IMPORT_ID, Event, Instance, Patient, Route, Series, Study, database,
                      is_shared, utcnow, write_transaction)
from . import databases

LOGGER = logging.getLogger(__name__)
KINDS = ("study", "series", "patient")
COPIED = ("sop_instance_uid", "sop_class_uid", "instance_number", "transfer_syntax_uid", "sha256",
          "xxh3", "size", "stored_path", "creator", "source", "node", "imported_at", "origin",
          "calling_ae", "called_ae", "remote_host")


@dataclasses.dataclass
class Unit:
    """What moves in one transaction: one study, whole or some of its series."""
    study_instance_uid: str
    series: tuple | None = None  # Series Instance UIDs; None: the whole study
    instances: int = 0  # in the source when planned
    only: tuple | None = None  # SOP Instance UIDs: these alone (an upload into a study database)


@dataclasses.dataclass
class Moved:
    study_instance_uid: str
    moved: int = 0  # instances that went (or were copied)
    present: int = 0  # already in the target with the same bytes
    conflicts: int = 0  # the target holds other bytes under their UID: left in the source

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


def plan(keys, kind: str, source: str, target: str) -> tuple[list[Unit], list[str]]:
    """The units to move, and the keys that are in the target already; ``Refused`` (nothing
    moves) for an unknown database, the same database twice, no keys, or a key found in
    neither database."""
    if kind not in KINDS:
        raise Refused(f"select by one of {', '.join(KINDS)}, not {kind!r}")
    keys = list(dict.fromkeys(k.strip() for k in keys if k and k.strip()))
    if not keys:
        raise Refused("nothing selected: give Study Instance UIDs (or --series UIDs, --patient IDs)")
    src, dst = databases.get(source), databases.get(target)
    if src.id == dst.id:
        raise Refused(f"the studies are in {source!r} already: name another database with --to")
    units: dict[str, Unit] = {}
    there, unknown = [], []
    for key in keys:
        found = _find(kind, key, src.id)
        if found:
            for study_uid, series_uid, count in found:
                unit = units.setdefault(study_uid, Unit(study_uid, None if kind != "series" else ()))
                if kind == "series":
                    unit.series = unit.series + (series_uid,)
                unit.instances += count
        elif _find(kind, key, dst.id):
            there.append(key)
        else:
            unknown.append(key)
    if unknown:
        elsewhere = _where(kind, unknown[0])
        raise Refused(f"not in {source!r} (nor in {target!r}): {', '.join(unknown[:10])}"
                      + (f" and {len(unknown) - 10} more" if len(unknown) > 10 else "")
                      + (f" ({unknown[0]} is in {', '.join(elsewhere)}: use --from)" if elsewhere else "")
                      + "; nothing was moved")
    return list(units.values()), there


def _where(kind: str, key: str) -> list[str]:
    """The databases that hold what ``key`` selects."""
    return [d.name for d in databases.StudyDatabase.select().order_by(databases.StudyDatabase.id)
            if _find(kind, key, d.id)]


def _find(kind: str, key: str, database_id: int) -> list[tuple]:
    """(study uid, series uid, instances) of the series holding instances that ``key`` selects."""
    query = (Instance.select(Study.study_instance_uid, Series.series_instance_uid,
                             fn.COUNT(Instance.id))
             .join(Series).join(Study).join(Patient)
             .where(Instance.database_id == database_id)
             .group_by(Study.study_instance_uid, Series.series_instance_uid))
    column = {"study": Study.study_instance_uid, "series": Series.series_instance_uid,
              "patient": Patient.patient_id}[kind]
    return list(query.where(column == key).tuples())


def distribute(keys, to: str, source: str = IMPORT, kind: str = "study", copy: bool = False,
               dry_run: bool = False, actor: str = "") -> dict:
    """Move (``copy``: copy) what ``keys`` select from ``source`` to ``to``; a summary."""
    units, there = plan(keys, kind, source, to)
    summary = {"from": source, "to": to, "copy": copy, "dry_run": dry_run, "by": actor,
               "already_there": there, "studies": []}
    for unit in units:
        if dry_run:
            summary["studies"].append({"study_instance_uid": unit.study_instance_uid,
                                       "series": list(unit.series or []) or None,
                                       "instances": unit.instances})
            continue
        done = move(unit, source, to, copy=copy, actor=actor)
        summary["studies"].append(done.as_dict())
    for key in ("moved", "present", "conflicts"):
        summary[key] = sum(s.get(key, 0) for s in summary["studies"])
    return summary


def move(unit: Unit, source: str, target: str, copy: bool = False, actor: str = "",
         late: bool = False) -> Moved:
    """One study (or some of its series), in one transaction."""
    with write_transaction():
        src, dst = databases.get(source), databases.get(target)
        databases.lock(src.id)
        databases.lock(dst.id)
        done = _move(unit, src, dst, copy, actor, utcnow())
        if done.moved or done.present or done.conflicts:
            _record(done, unit, src.name, dst.name, copy, actor, late)
        if not copy and unit.series is None and unit.only is None and (done.moved or done.present):
            _route(unit.study_instance_uid, dst.id, actor)
    if done.moved or done.present or done.conflicts:
        LOGGER.info("distributed study %s from %s to %s by %s: %d %s, %d already there, "
                    "%d conflicts%s", unit.study_instance_uid, source, target, actor, done.moved,
                    "copied" if copy else "moved", done.present, done.conflicts,
                    " (late arrivals)" if late else "")
    return done


def _move(unit: Unit, src, dst, copy: bool, actor: str, now: datetime.datetime) -> Moved:
    done = Moved(unit.study_instance_uid)
    study = Study.get_or_none((Study.database_id == src.id)
                              & (Study.study_instance_uid == unit.study_instance_uid))
    if study is None:
        return done
    if is_shared():  # one distribution of a study at a time, whichever node or command runs it
        database.execute_sql('SELECT 1 FROM "study" WHERE "id" = %s FOR UPDATE', (study.id,))
    series = Series.select().where(Series.study == study.id)
    if unit.series is not None:
        series = series.where(Series.series_instance_uid.in_(list(unit.series)))
    target_study = None
    for s in series:
        held = Instance.select().where(Instance.series == s.id)
        if unit.only:
            held = held.where(Instance.sop_instance_uid.in_(list(unit.only)))
        if not held.exists():
            continue
        if target_study is None:
            target_study = _twin(Study, study, dst.id, patient=_twin(Patient, study.patient, dst.id))
        target_series = _twin(Series, s, dst.id, study=target_study)
        _move_series(s.id, target_series, src, dst, copy, actor, now, done, unit.only)
    return done


def _twin(model, row, database_id: int, **parents) -> int:
    """The id of ``row``'s counterpart in another database (same UID), made when missing."""
    key = {Patient: ("patient_id", "issuer"), Study: ("study_instance_uid",),
           Series: ("series_instance_uid",)}[model]
    values = {f.name: getattr(row, f.name) for f in model._meta.sorted_fields
              if f.name not in ("id", "database_id") and f.name not in parents}
    values = {k: (v.id if hasattr(v, "id") else v) for k, v in values.items()}
    model.insert(database_id=database_id, **values, **parents).on_conflict_ignore().execute()
    query = model.select(model.id).where(model.database_id == database_id)
    for name in key:
        query = query.where(getattr(model, name) == getattr(row, name))
    return query.scalar()


def _move_series(series_id: int, target_series: int, src, dst, copy: bool, actor: str,
                 now: datetime.datetime, done: Moved, only: tuple | None = None) -> None:
    p = database.param
    same_uid = (f'SELECT 1 FROM "instance" "t" WHERE "t"."database_id" = {p} '
                f'AND "t"."sop_instance_uid" = "instance"."sop_instance_uid"')
    these = f' AND "sop_instance_uid" IN ({", ".join([p] * len(only))})' if only else ""
    those = tuple(only or ())
    present = (f'SELECT count(*) FROM "instance" WHERE "series_id" = {p}{these} AND EXISTS '
               f'({same_uid} AND "t"."sha256" = "instance"."sha256")')
    done.present += database.execute_sql(present, (series_id, *those, dst.id)).fetchone()[0]
    if not copy:
        database.execute_sql(f'DELETE FROM "instance" WHERE "series_id" = {p}{these} AND EXISTS '
                             f'({same_uid} AND "t"."sha256" = "instance"."sha256")',
                             (series_id, *those, dst.id))
    note = (f"{dst.name} holds other bytes under this SOP Instance UID (distribution by {actor} "
            f"at {str(now)[:19]}): left here; decide which is right")
    done.conflicts += database.execute_sql(
        f'UPDATE "instance" SET "conflict" = {p} WHERE "series_id" = {p}{these} AND EXISTS '
        f'({same_uid} AND "t"."sha256" <> "instance"."sha256")',
        (note, series_id, *those, dst.id)).rowcount
    stamp = (actor, now, src.name)
    if copy:
        columns = ", ".join(f'"{c}"' for c in COPIED)
        cursor = database.execute_sql(
            f'INSERT INTO "instance" ({columns}, "database_id", "series_id", "distributed_by", '
            f'"distributed_at", "distributed_from", "conflict") '
            f'SELECT {columns}, {p}, {p}, {p}, {p}, {p}, {p} FROM "instance" '
            f'WHERE "series_id" = {p}{these} AND NOT EXISTS ({same_uid})',
            (dst.id, target_series, *stamp, "", series_id, *those, dst.id))
    else:
        cursor = database.execute_sql(
            f'UPDATE "instance" SET "database_id" = {p}, "series_id" = {p}, "distributed_by" = {p}, '
            f'"distributed_at" = {p}, "distributed_from" = {p}, "conflict" = {p} '
            f'WHERE "series_id" = {p}{these} AND NOT EXISTS ({same_uid})',
            (dst.id, target_series, *stamp, "", series_id, *those, dst.id))
    done.moved += cursor.rowcount


def _record(done: Moved, unit: Unit, source: str, target: str, copy: bool, actor: str,
            late: bool) -> None:
    what = "copied" if copy else "moved"
    part = f" (series {', '.join(unit.series)})" if unit.series else ""
    part += f" ({len(unit.only)} uploaded instances)" if unit.only else ""
    detail = (f"{done.moved} instances {what} from {source} to {target} by {actor}"
              f"{' as late arrivals following their study' if late else ''}{part}; "
              f"{done.present} already there; {done.conflicts} conflicts left in {source}")
    Event.insert(outcome="distributed", source=unit.study_instance_uid, node="", at=utcnow(),
                 detail=detail, database_name=target, actor=actor).execute()


def _route(study_uid: str, database_id: int, actor: str) -> None:
    """A whole study moved: its late arrivals follow it (none when it went back to import)."""
    Route.delete().where(Route.study_instance_uid == study_uid).execute()
    if database_id != IMPORT_ID:
        Route.insert(study_instance_uid=study_uid, database_id=database_id, by=actor,
                     at=utcnow()).execute()


def follow(study_uids) -> list[Moved]:
    """Move the instances of these studies that are in import but whose study went elsewhere."""
    done = []
    routes = Route.select().where(Route.study_instance_uid.in_(list(study_uids)))
    names = {d.id: d.name for d in databases.StudyDatabase.select()}
    for route in routes:
        target = names.get(route.database_id)
        if target is None:
            continue
        unit = Unit(route.study_instance_uid)
        moved = move(unit, IMPORT, target, actor=route.by, late=True)
        if moved.moved or moved.present:
            done.append(moved)
    return done
