"""Study databases: the Import database becomes one of several partitions of the catalog.

Every patient, study, series and instance row gains ``database_id``; what was imported
before belongs to ``import`` (id 1). A UID is unique within a database, not across them
(``distribute --copy`` keeps a study in two). Instances gain who moved them, when and from
where, and a conflict note; studies and series gain the attributes that rules match on;
history gains the database and the person of an event. ``route`` remembers where a
study went, so that its late arrivals follow it.
"""
import datetime

from peewee import CharField, DateTimeField, IntegerField, Model, PostgresqlDatabase, TextField

PARTITIONED = {  # table: (old unique index, its columns)
    "patient": ("patient_patient_id_issuer", ('"patient_id"', '"issuer"')),
    "study": ("study_study_instance_uid", ('"study_instance_uid"',)),
    "series": ("series_series_instance_uid", ('"series_instance_uid"',)),
    "instance": ("instance_sop_instance_uid", ('"sop_instance_uid"',)),
}


def up(migrator, db):
    class StudyDatabase(Model):
        name = CharField(max_length=64, unique=True)
        description = TextField(default="")
        created_at = DateTimeField()

        class Meta:
            database = db
            table_name = "study_database"

    class Route(Model):
        study_instance_uid = CharField(max_length=64, primary_key=True)
        database_id = IntegerField()
        by = TextField()
        at = DateTimeField()

        class Meta:
            database = db
            table_name = "route"

    db.create_tables([StudyDatabase, Route])
    StudyDatabase.insert(id=1, name="import", description="everything that arrives",
                         created_at=datetime.datetime.utcnow()).execute()
    if isinstance(db, PostgresqlDatabase):  # the next id after the one given explicitly
        db.execute_sql("SELECT setval(pg_get_serial_sequence('study_database', 'id'), 1)")
    for table, (index, columns) in PARTITIONED.items():
        db.execute_sql(f'ALTER TABLE "{table}" ADD COLUMN "database_id" INTEGER NOT NULL DEFAULT 1')
        db.execute_sql(f'DROP INDEX "{index}"')
        db.execute_sql(f'CREATE UNIQUE INDEX "{table}_in_database" ON "{table}" '
                       f'("database_id", {", ".join(columns)})')
        if table != "patient":
            db.execute_sql(f'CREATE INDEX "{table}_uid" ON "{table}" ({columns[0]})')
    # what the per-database counts read (watcher/studies/databases.py listing): covering
    db.execute_sql('CREATE INDEX "instance_database_series" ON "instance" '
                   '("database_id", "series_id", "size")')
    for table, column, kind in (  # with their defaults in the schema: raw inserts rely on them
            ("study", "referring_physician", "TEXT NOT NULL DEFAULT ''"),
            ("series", "institution_name", "TEXT NOT NULL DEFAULT ''"),
            ("series", "station_name", "TEXT NOT NULL DEFAULT ''"),
            ("instance", "distributed_by", "TEXT"),
            ("instance", "distributed_at", "TIMESTAMP"),
            ("instance", "distributed_from", "TEXT"),
            ("instance", "conflict", "TEXT NOT NULL DEFAULT ''"),
            ("history", "database", "TEXT"),
            ("history", "actor", "TEXT")):
        db.execute_sql(f'ALTER TABLE "{table}" ADD COLUMN "{column}" {kind}')
