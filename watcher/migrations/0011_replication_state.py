"""Each scheduled replication source's state, shared by the nodes: when it last ran, on which
node, how it ended, how many runs in a row failed and why, and when it is due again (so that
``status`` shows a failing source, and one node at a time runs it)."""
from peewee import DateTimeField, IntegerField, Model, TextField


def up(migrator, db):
    class ReplicationState(Model):
        source = TextField(primary_key=True)
        node = TextField(default="")
        last_started = DateTimeField(null=True)
        last_ended = DateTimeField(null=True)
        last_ok = DateTimeField(null=True)
        failures = IntegerField(default=0)
        last_error = TextField(default="")
        next_attempt = DateTimeField()

        class Meta:
            database = db
            table_name = "replication_state"

    db.create_tables([ReplicationState])
