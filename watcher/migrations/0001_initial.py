"""The first schema: patients, studies, series, instances, history, rejections, heartbeats.

A frozen copy of the models as they were when this migration was written,
so later changes to watcher/models.py cannot change what this step does.
"""
import datetime

from peewee import (AutoField, BigIntegerField, CharField, DateTimeField, ForeignKeyField,
                    IntegerField, Model, TextField)


def up(migrator, db):
    def now():
        return datetime.datetime.utcnow()

    class Base(Model):
        class Meta:
            database = db
            legacy_table_names = False

    class Patient(Base):
        id = AutoField()
        patient_id = CharField(max_length=64)
        issuer = CharField(max_length=64, default="")
        name = TextField(default="")
        birth_date = CharField(max_length=16, default="")
        sex = CharField(max_length=16, default="")

        class Meta:
            indexes = ((("patient_id", "issuer"), True),)

    class Study(Base):
        id = AutoField()
        study_instance_uid = CharField(max_length=64, unique=True)
        patient = ForeignKeyField(Patient)
        study_date = CharField(max_length=16, default="")
        study_time = CharField(max_length=32, default="")
        description = TextField(default="")
        accession_number = CharField(max_length=64, default="")
        study_id = CharField(max_length=64, default="")

    class Series(Base):
        id = AutoField()
        series_instance_uid = CharField(max_length=64, unique=True)
        study = ForeignKeyField(Study)
        modality = CharField(max_length=16, default="")
        series_number = IntegerField(null=True)
        description = TextField(default="")

    class Instance(Base):
        id = AutoField()
        sop_instance_uid = CharField(max_length=64, unique=True)
        sop_class_uid = CharField(max_length=64)
        series = ForeignKeyField(Series)
        instance_number = IntegerField(null=True)
        transfer_syntax_uid = CharField(max_length=64, default="")
        sha256 = CharField(max_length=64, index=True)
        size = BigIntegerField()
        stored_path = TextField()
        creator = CharField(max_length=64)
        source = TextField()
        node = CharField(max_length=255)
        imported_at = DateTimeField(default=now, index=True)

    class Event(Base):
        id = AutoField()
        at = DateTimeField(default=now, index=True)
        outcome = CharField(max_length=16)
        source = TextField()
        sop_instance_uid = CharField(max_length=64, null=True)
        sha256 = CharField(max_length=64, null=True)
        reason = CharField(max_length=32, null=True)
        detail = TextField(default="")
        node = CharField(max_length=255)

        class Meta:
            table_name = "history"

    class Rejection(Base):
        id = AutoField()
        source = TextField()
        reason = CharField(max_length=32)
        detail = TextField()
        path = TextField(unique=True)
        sha256 = CharField(max_length=64, null=True)
        size = BigIntegerField(null=True)
        rejected_at = DateTimeField(default=now)
        node = CharField(max_length=255)

    class Heartbeat(Base):
        node = CharField(max_length=255, primary_key=True)
        host = CharField(max_length=255)
        pid = IntegerField()
        started_at = DateTimeField()
        last_seen = DateTimeField()
        last_rescan = DateTimeField(null=True)
        queue_depth = IntegerField(default=0)
        in_flight = IntegerField(default=0)
        state = CharField(max_length=32, default="running")

    db.create_tables([Patient, Study, Series, Instance, Event, Rejection, Heartbeat])
