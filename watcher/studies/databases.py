"""Create, rename, delete and count the study databases."""

import re

from peewee import fn

from ..errors import Refused
from ..models import (IMPORT, IMPORT_ID, Grant, Instance, Patient, Route, Series, Study, StudyDatabase,
                      database, is_shared, utcnow, write_transaction)

NAME = re.compile(r"[a-z0-9][a-z0-9._-]{0,63}\Z")
ALL = "all"  # a name the read commands take for every database


def check_name(name: str) -> str:
    if not NAME.match(name or "") or name == ALL:
        raise Refused(f"{name!r} cannot name a database: use 1 to 64 lower-case letters, digits, "
                      f"'.', '_' or '-', starting with a letter or digit (and not {ALL!r})")
    return name


def get(name: str) -> StudyDatabase:
    row = StudyDatabase.get_or_none(StudyDatabase.name == name)
    if row is None:
        known = ", ".join(names())
        raise Refused(f"no database named {name!r}; there are: {known}")
    return row


def names() -> list[str]:
    return [d.name for d in StudyDatabase.select(StudyDatabase.name).order_by(StudyDatabase.id)]


def ids_of(name: str | None) -> list[int] | None:
    """The database ids a read command's ``--database`` names: None for ``all``."""
    if name == ALL:
        return None
    return [get(name or IMPORT).id]


def lock(row_id: int, exclusive: bool = False) -> None:
    """Inside a write transaction, on PostgreSQL: keep the database from being deleted (shared)
    or anything from moving into it (exclusive) until the transaction ends. (SQLite's write
    transactions already run one at a time.)"""
    if is_shared():
        mode = "UPDATE" if exclusive else "SHARE"
        found = database.execute_sql(f'SELECT "name" FROM "study_database" WHERE "id" = %s '
                                     f'FOR {mode}', (row_id,)).fetchone()
        if found is None:
            raise Refused("the database was deleted meanwhile; nothing was moved into it")


def create(name: str, description: str = "") -> dict:
    check_name(name)
    with write_transaction():
        if StudyDatabase.get_or_none(StudyDatabase.name == name) is not None:
            raise Refused(f"a database named {name!r} exists already")
        StudyDatabase.insert(name=name, description=description, created_at=utcnow()).execute()
    return {"name": name, "description": description}


def rename(old: str, new: str) -> dict:
    if old == IMPORT:
        raise Refused("the Import database cannot be renamed: every intake writes into it")
    check_name(new)
    with write_transaction():
        row = get(old)
        lock(row.id, exclusive=True)
        if StudyDatabase.get_or_none(StudyDatabase.name == new) is not None:
            raise Refused(f"a database named {new!r} exists already")
        StudyDatabase.update(name=new).where(StudyDatabase.id == row.id).execute()
    return {"name": new, "was": old}


def delete(name: str) -> dict:
    """Only an empty database goes (with the empty patient, study and series rows that moves
    left in it, the routes that pointed at it, and the rights people had on it)."""
    if name == IMPORT:
        raise Refused("the Import database cannot be deleted: every intake writes into it")
    with write_transaction():
        row = get(name)
        lock(row.id, exclusive=True)
        held = Instance.select().where(Instance.database_id == row.id).count()
        if held:
            raise Refused(f"the database {name!r} still holds {held} instances: distribute them "
                          f"elsewhere first (dicom-watcher distribute --from {name} ...)")
        for model in (Series, Study, Patient):
            model.delete().where(model.database_id == row.id).execute()
        Route.delete().where(Route.database_id == row.id).execute()
        Grant.delete().where(Grant.study_database == row.id).execute()  # (the schema cascades too)
        StudyDatabase.delete().where(StudyDatabase.id == row.id).execute()
    return {"name": name, "deleted": True}


def listing() -> list[dict]:
    """Every database with its counts (``id`` first: import). Only what holds instances counts: a study that was moved
    away leaves an empty row behind (ingest may still point at it), which is not shown."""
    per = {d: (n, b, s) for d, n, b, s in database.execute_sql(  # one pass over a covering index
        'SELECT "database_id", count(*), sum("size"), count(DISTINCT "series_id") FROM "instance" '
        'GROUP BY "database_id"').fetchall()}
    instances = {d: v[0] for d, v in per.items()}
    nbytes = {d: v[1] for d, v in per.items()}
    series = {d: v[2] for d, v in per.items()}
    held = Series.select(Series.id).where(Series.id.in_(Instance.select(Instance.series)))
    studies = dict(Series.select(Series.database_id, fn.COUNT(Series.study.distinct()))
                   .where(Series.id.in_(held)).group_by(Series.database_id).tuples())
    patients = dict(Study.select(Study.database_id, fn.COUNT(Study.patient.distinct()))
                    .where(Study.id.in_(Series.select(Series.study).where(Series.id.in_(held))))
                    .group_by(Study.database_id).tuples())
    return [{"id": d.id, "name": d.name, "description": d.description, "patients": patients.get(d.id, 0),
             "studies": studies.get(d.id, 0), "series": series.get(d.id, 0),
             "instances": instances.get(d.id, 0), "bytes": int(nbytes.get(d.id) or 0)}
            for d in StudyDatabase.select().order_by(StudyDatabase.id)]


__all__ = ["ALL", "IMPORT", "IMPORT_ID", "check_name", "create", "delete", "get", "ids_of",
           "listing", "lock", "names", "rename"]
