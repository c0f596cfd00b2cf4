"""Waiting: the files a node is holding back, and why (incomplete, open for writing, retrying,
cannot be removed), so that ``pending`` and ``status`` can show them; and on each heartbeat,
the outage that pauses the node (database or archive unavailable), and since when."""
from peewee import CharField, DateTimeField, Model, TextField


def up(migrator, db):
    class Waiting(Model):
        node = CharField(max_length=255)
        path = TextField()  # relative to watch.drop_dir
        state = CharField(max_length=32)
        detail = TextField(default="")
        since = DateTimeField()
        next_attempt = DateTimeField(null=True)

        class Meta:
            database = db
            table_name = "waiting"
            primary_key = False
            indexes = ((("node", "path"), True),)

    db.create_tables([Waiting])
    migrator.migrate(
        migrator.add_column("heartbeat", "outage", TextField(default="")),
        migrator.add_column("heartbeat", "outage_since", DateTimeField(null=True)))
