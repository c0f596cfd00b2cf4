"""The catalog: study databases (``import`` and the research projects' own), each holding
patient -> study -> series -> instance, plus what happened to every file.

The database is chosen at run time from a URL (`sqlite:///path` or
`postgresql://...`) and bound to ``database``, a proxy the models share.
The schema is built by the numbered migrations in ``migrations/``.
"""

import datetime
import logging
from pathlib import Path
from urllib.parse import quote

from peewee import (AutoField, BigIntegerField, BooleanField, CharField, DatabaseProxy,
                    DateTimeField, ForeignKeyField, IntegerField, Model, OperationalError, PostgresqlDatabase,
                    SqliteDatabase, TextField)
from playhouse import db_url
from playhouse.migrations import Runner
from playhouse.pool import PooledDatabase

LOGGER = logging.getLogger(__name__)
MIGRATIONS = Path(__file__).with_name("migrations")
database = DatabaseProxy()
POOL_MAX_AGE_SECONDS = 300  # PostgreSQL: a pooled connection this old is closed, not reused


def utcnow() -> datetime.datetime:
    return datetime.datetime.now(datetime.timezone.utc).replace(tzinfo=None)


class BaseModel(Model):
    class Meta:
        database = database
        legacy_table_names = False


IMPORT_ID = 1  # the Import database: every intake writes there
IMPORT = "import"


class StudyDatabase(BaseModel):
    """A partition of the catalog: ``import``, or a research project's study database."""
    id = AutoField()
    name = CharField(max_length=64, unique=True)
    description = TextField(default="")
    created_at = DateTimeField(default=utcnow)


class Route(BaseModel):
    """Where a study that left the Import database went: its late arrivals follow it."""
    study_instance_uid = CharField(max_length=64, primary_key=True)
    database_id = IntegerField()
    by = TextField()
    at = DateTimeField()


class Patient(BaseModel):
    id = AutoField()
    database_id = IntegerField(default=IMPORT_ID)
    patient_id = CharField(max_length=64)
    issuer = CharField(max_length=64, default="")
    name = TextField(default="")
    birth_date = CharField(max_length=16, default="")
    sex = CharField(max_length=16, default="")

    class Meta:
        indexes = ((("database_id", "patient_id", "issuer"), True),)


class Study(BaseModel):
    id = AutoField()
    database_id = IntegerField(default=IMPORT_ID)
    study_instance_uid = CharField(max_length=64)
    patient = ForeignKeyField(Patient, backref="studies")
    study_date = CharField(max_length=16, default="")
    study_time = CharField(max_length=32, default="")
    description = TextField(default="")
    accession_number = CharField(max_length=64, default="")
    study_id = CharField(max_length=64, default="")
    referring_physician = TextField(default="")

    class Meta:
        indexes = ((("database_id", "study_instance_uid"), True),)


class Series(BaseModel):
    id = AutoField()
    database_id = IntegerField(default=IMPORT_ID)
    series_instance_uid = CharField(max_length=64)
    study = ForeignKeyField(Study, backref="series")
    modality = CharField(max_length=16, default="")
    series_number = IntegerField(null=True)
    description = TextField(default="")
    institution_name = TextField(default="")
    station_name = TextField(default="")

    class Meta:
        indexes = ((("database_id", "series_instance_uid"), True),)


class Instance(BaseModel):
    id = AutoField()
    database_id = IntegerField(default=IMPORT_ID)
    sop_instance_uid = CharField(max_length=64)
    sop_class_uid = CharField(max_length=64)
    series = ForeignKeyField(Series, backref="instances")
    instance_number = IntegerField(null=True)
    transfer_syntax_uid = CharField(max_length=64, default="")
    sha256 = CharField(max_length=64, index=True)
    xxh3 = CharField(max_length=32, null=True)  # what a download checks; NULL: the sha256
    size = BigIntegerField()
    stored_path = TextField()  # relative to archive.dir
    creator = CharField(max_length=64)
    source = TextField()  # relative to watch.drop_dir
    node = CharField(max_length=255)
    imported_at = DateTimeField(default=utcnow, index=True)
    distributed_by = TextField(null=True)  # who moved it out of the database it was in
    distributed_at = DateTimeField(null=True)
    distributed_from = TextField(null=True)  # the name of that database
    conflict = TextField(default="")  # why a distribution left it behind
    origin = TextField(default="folder")  # the way in: folder, dicom (watcher/origin.py)
    calling_ae = TextField(null=True)  # dicom: the sender's AE title, ours, the sender's address
    called_ae = TextField(null=True)
    remote_host = TextField(null=True)

    class Meta:
        indexes = ((("database_id", "sop_instance_uid"), True),)


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
    database_name = TextField(null=True, column_name="database")  # the study database it concerns
    actor = TextField(null=True)  # the person (or rule) who did it
    intake = TextField(null=True)  # the way in: folder, dicom, upload, replication (watcher/origin.py)

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
    outage = TextField(default="")  # why the node is paused (database or archive unavailable)
    outage_since = DateTimeField(null=True)
    durations = TextField(default="")  # JSON: the process' import durations (watcher/timings.py)
    associations = IntegerField(default=0)  # DICOM associations open at the last heartbeat


class Claim(BaseModel):
    """A node's lease on one file of a shared drop folder (see watcher/claims.py)."""

    path = TextField(primary_key=True)
    node = CharField(max_length=255)
    token = CharField(max_length=64)
    expires_at = DateTimeField()


class Waiting(BaseModel):
    """A file a node holds back, and why; the node rewrites its rows with every heartbeat."""

    node = CharField(max_length=255)
    path = TextField()  # relative to watch.drop_dir
    state = CharField(max_length=32)  # incomplete, open-for-writing, retrying, cannot-dispose
    detail = TextField(default="")
    since = DateTimeField()
    next_attempt = DateTimeField(null=True)

    class Meta:
        primary_key = False
        indexes = ((("node", "path"), True),)


class Disc(BaseModel):
    """A DICOMDIR that came in: kept like an original, and the manifest of its disc copy."""

    id = AutoField()
    source = TextField()  # relative to watch.drop_dir
    sha256 = CharField(max_length=64, unique=True)
    stored_path = TextField()  # relative to archive.dir
    size = BigIntegerField()
    arrived_at = DateTimeField(default=utcnow, index=True)
    node = CharField(max_length=255)
    referenced = TextField(default="[]")  # JSON list of paths relative to watch.drop_dir
    warned_at = DateTimeField(null=True)  # when the WARNING about its missing files was logged
    complete_at = DateTimeField(null=True)  # when the periodic check found it complete (not checked again)


class Account(BaseModel):
    """A person who signs in to the web app (watcher/studies/accounts.py). Never deleted:
    disabled, so that what they did still names them."""
    id = AutoField()
    name = CharField(max_length=64, unique=True)
    password_hash = TextField()  # argon2id, with its parameters and salt (never the password)
    is_manager = BooleanField(default=False)  # every right on every database, import included
    disabled = BooleanField(default=False)  # refused at once: password, tokens and rights
    created_at = DateTimeField(default=utcnow)


class ApiToken(BaseModel):
    """A secret a program presents instead of a password; only its sha256 is kept."""
    id = AutoField()
    account = ForeignKeyField(Account, backref="tokens", on_delete="CASCADE")
    token_hash = CharField(max_length=64, unique=True)  # sha256 hex of the secret
    created_at = DateTimeField(default=utcnow)
    revoked = BooleanField(default=False)


class Grant(BaseModel):
    """A right of one account on one study database (watcher/studies/rights.py decides what
    it allows). Deleting the database deletes its grants (ON DELETE CASCADE)."""
    id = AutoField()
    account = ForeignKeyField(Account, backref="grants", on_delete="CASCADE")
    study_database = ForeignKeyField(StudyDatabase, backref="grants", on_delete="CASCADE")
    level = CharField(max_length=8)  # read, write (write includes read)

    class Meta:
        indexes = ((("account", "study_database"), True),)


class WebSetting(BaseModel):
    """A value the site keeps: the web app's cookie-signing key (made once, never in code), the
    catalog's id (watcher/ownership.py)."""
    key = CharField(max_length=64, primary_key=True)
    value = TextField()


class ReplicationState(BaseModel):
    """A scheduled replication source (its URL without credentials), as the nodes share it:
    its last run, how it ended, failures in a row and the last error, when it is due again."""
    source = TextField(primary_key=True)
    node = TextField(default="")
    last_started = DateTimeField(null=True)
    last_ended = DateTimeField(null=True)
    last_ok = DateTimeField(null=True)
    failures = IntegerField(default=0)
    last_error = TextField(default="")
    next_attempt = DateTimeField()

    class Meta:
        table_name = "replication_state"


class WebSession(BaseModel):
    """A sign-in to the web app (watcher/web/auth.py): the cookie holds its secret, signed; the
    row only the sha256 of it. Signing out deletes the row; so does its account's deletion."""
    token_hash = CharField(max_length=64, primary_key=True)
    account = ForeignKeyField(Account, backref="sessions", on_delete="CASCADE")
    csrf = CharField(max_length=64)  # the token every form of this session posts back
    created_at = DateTimeField(default=utcnow)
    expires_at = DateTimeField(index=True)


MODELS = [StudyDatabase, Route, Patient, Study, Series, Instance, Event, Rejection, Heartbeat, Claim, Waiting, Disc,
          Account, ApiToken, Grant, WebSetting, WebSession, ReplicationState]


def is_shared() -> bool:
    """Several nodes may share this database (PostgreSQL); SQLite is one node's."""
    return not isinstance(database.obj, SqliteDatabase)


def reset_connection() -> None:
    """Drop this thread's connection (after the server went away); the next query reconnects."""
    try:
        database.close()
    except Exception:
        pass


def give_back_connection() -> None:
    """From a thread that will end without closing its connection (a DICOM association's):
    give it back to the pool now, or it stays taken (open, and counted) for good. SQLite's is
    the thread's own, closed with it: kept for the thread's next use."""
    if isinstance(database.obj, PooledDatabase):
        database.close()


def disconnect() -> None:
    """Close every connection of this process, the pool's idle ones too: before a fork, so
    that no child shares a connection's socket with its parent."""
    database.close()
    if isinstance(database.obj, PooledDatabase):
        database.obj.close_all()


def write_transaction():
    """A transaction that takes the write lock at once on SQLite.

    A deferred SQLite transaction that reads first and writes later fails with
    "database is locked" when another writer committed in between; taking
    the lock up front makes writers queue (busy_timeout) instead.
    """
    if isinstance(database.obj, SqliteDatabase):
        return database.atomic("IMMEDIATE")
    return database.atomic()


class NotReady(Exception):
    """The database a read-only command asked for is not there yet, or its schema is older
    than this code (a read-only command never creates or migrates it); the message says why."""


def connect(url: str, migrate: bool = True, readonly: bool = False):
    """Open the database named by ``url``, bring its schema up to date, bind the models.

    ``readonly``: for commands that only look. Never creates the database, never migrates,
    never takes a write lock (so a stalled service cannot block it); raises ``NotReady``
    when there is no database yet or its schema is behind the code."""
    if url.startswith("postgres://") or url.startswith("postgresql://"):
        url = "psycopg3://" + url.split("://", 1)[1]
    if readonly:
        db = _open_readonly(url)
        database.initialize(db)
        _check_schema(db, url)
        return db
    if url.startswith("sqlite:///"):
        Path(url[len("sqlite:///"):]).parent.mkdir(parents=True, exist_ok=True)
        # cache_size: SQLite's page cache lives in this process (PostgreSQL's in its server), by
        # default up to 2 MB per connection, and a thread that had one (a web request, the
        # dashboard counts, a worker) keeps that much in its malloc arena after the close.
        # 512 KiB: ~9 MB less RSS after the web benchmark's requests on 1,000,000 instances.
        db = db_url.connect(url, pragmas={"journal_mode": "wal", "synchronous": "full",
                                          "foreign_keys": 1, "busy_timeout": 30000,
                                          "cache_size": -512},
                            timeout=30)
    else:
        # A pool: a thread (a web request, the heartbeat) takes an open connection instead of
        # opening its own, which cost a web request ~20 ms at p50. A connection is tested as it
        # is taken (SELECT 1), so one the server dropped (a restart) is replaced, not handed
        # out; one older than POOL_MAX_AGE_SECONDS is closed when it is next taken or given
        # back (so what a burst of requests opened does not stay open for long).
        db = db_url.connect(url.replace("psycopg3://", "psycopg3+pool://", 1),
                            max_connections=None, stale_timeout=POOL_MAX_AGE_SECONDS)
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


def _open_readonly(url: str):
    if not url.startswith("sqlite:///"):
        # every transaction read-only: a bug that writes fails instead of writing
        return db_url.connect(url, options="-c default_transaction_read_only=on")
    path = url[len("sqlite:///"):]
    if not Path(path).is_file():
        raise NotReady(f"no database at {path}: has the service run yet? (dicom-watcher run "
                       "creates it; read-only commands never do)")
    # mode=ro reads a WAL database only if its -shm and -wal files exist or can be created;
    # a user who may not write the folder cannot create them. Without a -wal file no one has
    # the database open and everything is in the main file, which immutable=1 reads as is.
    uri = "file:" + quote(path) + "?mode=ro"
    try:
        return _sqlite_readonly(uri)
    except OperationalError as exc:
        if Path(path + "-wal").exists():
            raise OperationalError(f"{exc} (a service has it open or stopped uncleanly: this user "
                                   f"must be able to read {path}-wal and {path}-shm)") from None
        return _sqlite_readonly(uri + "&immutable=1")


def _sqlite_readonly(uri: str):
    db = SqliteDatabase(uri, uri=True, timeout=5,
                        pragmas={"query_only": 1, "foreign_keys": 1, "busy_timeout": 5000})
    try:
        db.execute_sql("SELECT count(*) FROM sqlite_master")  # opens it: fails here, not later
    except OperationalError:
        db.close()
        raise
    return db


def _check_schema(db, url: str) -> None:
    status = Runner(db, str(MIGRATIONS)).status()
    if not any(m.applied for m in status):
        where = url[len("sqlite:///"):] if url.startswith("sqlite:///") else url.split("@")[-1]
        raise NotReady(f"no dicom-watcher tables in the database {where}: has the service run yet?")
    behind = [m.name for m in status if m.applied is None and m.path is not None]
    if behind:
        raise NotReady(f"the database schema is older than this dicom-watcher ({', '.join(behind)} "
                       "not applied): start the service (dicom-watcher run) or run "
                       "dicom-watcher scan once, which bring it up to date")


__all__ = ["database", "connect", "utcnow"] + [m.__name__ for m in MODELS]
