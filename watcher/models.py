"""The Import database: patient -> study -> series -> instance, plus what happened to every file.

The database is chosen at run time from a URL (`sqlite:///path` or
`postgresql://...`) and bound to ``database``, a proxy the models share.
The schema is built by the numbered migrations in ``migrations/``.
"""

import datetime
import logging
from pathlib import Path

from peewee import (AutoField, BigIntegerField, CharField, DatabaseProxy, DateTimeField,
                    ForeignKeyField, IntegerField, Model, PostgresqlDatabase, SqliteDatabase,
                    TextField)
from playhouse import db_url
from playhouse.migrations import Runner

LOGGER = logging.getLogger(__name__)
MIGRATIONS = Path(__file__).with_name("migrations")
database = DatabaseProxy()


def utcnow() -> datetime.datetime:
    return datetime.datetime.now(datetime.timezone.utc).replace(tzinfo=None)


class BaseModel(Model):
    class Meta:
        database = database
        legacy_table_names = False


class Patient(BaseModel):
    id = AutoField()
    patient_id = CharField(max_length=64)
    issuer = CharField(max_length=64, default="")
    name = TextField(default="")
    birth_date = CharField(max_length=16, default="")
    sex = CharField(max_length=16, default="")

    class Meta:
        indexes = ((("patient_id", "issuer"), True),)


class Study(BaseModel):
    id = AutoField()
    study_instance_uid = CharField(max_length=64, unique=True)
    patient = ForeignKeyField(Patient, backref="studies")
    study_date = CharField(max_length=16, default="")
    study_time = CharField(max_length=32, default="")
    description = TextField(default="")
    accession_number = CharField(max_length=64, default="")
    study_id = CharField(max_length=64, default="")


class Series(BaseModel):
    id = AutoField()
    series_instance_uid = CharField(max_length=64, unique=True)
    study = ForeignKeyField(Study, backref="series")
    modality = CharField(max_length=16, default="")
    series_number = IntegerField(null=True)
    description = TextField(default="")


class Instance(BaseModel):
    id = AutoField()
    sop_instance_uid = CharField(max_length=64, unique=True)
    sop_class_uid = CharField(max_length=64)
    series = ForeignKeyField(Series, backref="instances")
    instance_number = IntegerField(null=True)
    transfer_syntax_uid = CharField(max_length=64, default="")
    sha256 = CharField(max_length=64, index=True)
    size = BigIntegerField()
    stored_path = TextField()  # relative to archive.dir
    creator = CharField(max_length=64)
    source = TextField()  # relative to watch.drop_dir
    node = CharField(max_length=255)
    imported_at = DateTimeField(default=utcnow, index=True)


class Event(BaseModel):
    """One row for every outcome of every file: the history."""

    id = AutoField()
    at = DateTimeField(default=utcnow, index=True)
    outcome = CharField(max_length=16)  # imported, duplicate, dicomdir, rejected, retried
    source = TextField()
    sop_instance_uid = CharField(max_length=64, null=True)
    sha256 = CharField(max_length=64, null=True)
    reason = CharField(max_length=32, null=True)
    detail = TextField(default="")
    node = CharField(max_length=255)

    class Meta:
        table_name = "history"


class Rejection(BaseModel):
    """A rejected file, kept in the rejected folder until someone retries it."""

    id = AutoField()
    source = TextField()
    reason = CharField(max_length=32)
    detail = TextField()
    path = TextField(unique=True)  # absolute: where the file now lies
    sha256 = CharField(max_length=64, null=True)
    size = BigIntegerField(null=True)
    rejected_at = DateTimeField(default=utcnow)
    node = CharField(max_length=255)


class Heartbeat(BaseModel):
    node = CharField(max_length=255, primary_key=True)
    host = CharField(max_length=255)
    pid = IntegerField()
    started_at = DateTimeField()
    last_seen = DateTimeField()
    last_rescan = DateTimeField(null=True)
    queue_depth = IntegerField(default=0)
    in_flight = IntegerField(default=0)
    state = CharField(max_length=32, default="running")


class Claim(BaseModel):
    """A node's lease on one file of a shared drop folder (see watcher/claims.py)."""

    path = TextField(primary_key=True)
    node = CharField(max_length=255)
    token = CharField(max_length=64)
    expires_at = DateTimeField()


MODELS = [Patient, Study, Series, Instance, Event, Rejection, Heartbeat, Claim]


def is_shared() -> bool:
    """Several nodes may share this database (PostgreSQL); SQLite is one node's."""
    return not isinstance(database.obj, SqliteDatabase)


def reset_connection() -> None:
    """Drop this thread's connection (after the server went away); the next query reconnects."""
    try:
        database.close()
    except Exception:
        pass


def write_transaction():
    """A transaction that takes the write lock at once on SQLite.

    A deferred SQLite transaction that reads first and writes later fails with
    "database is locked" when another writer committed in between; taking
    the lock up front makes writers queue (busy_timeout) instead.
    """
    if isinstance(database.obj, SqliteDatabase):
        return database.atomic("IMMEDIATE")
    return database.atomic()


def connect(url: str, migrate: bool = True):
    """Open the database named by ``url``, bring its schema up to date, bind the models."""
    if url.startswith("postgres://") or url.startswith("postgresql://"):
        url = "psycopg3://" + url.split("://", 1)[1]
    if url.startswith("sqlite:///"):
        Path(url[len("sqlite:///"):]).parent.mkdir(parents=True, exist_ok=True)
        db = db_url.connect(url, pragmas={"journal_mode": "wal", "synchronous": "full",
                                          "foreign_keys": 1, "busy_timeout": 30000},
                            timeout=30)
    else:
        db = db_url.connect(url)
    database.initialize(db)
    if migrate:
        _migrate(db)
    return db


def _migrate(db) -> None:
    """Apply pending migrations; several nodes may start at once, so take a lock first."""
    runner = Runner(db, str(MIGRATIONS))
    if isinstance(db, PostgresqlDatabase):
        db.execute_sql("SELECT pg_advisory_lock(7347001)")
        try:
            applied = runner.up()
        finally:
            db.execute_sql("SELECT pg_advisory_unlock(7347001)")
    else:
        with db.atomic("IMMEDIATE") if isinstance(db, SqliteDatabase) else db.atomic():
            applied = runner.up()
    for name in applied:
        LOGGER.info("database migrated: %s", name)


__all__ = ["database", "connect", "utcnow"] + [m.__name__ for m in MODELS]
