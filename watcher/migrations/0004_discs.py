"""Discs: each DICOMDIR that came in, kept like an original, with the files it references, so a
disc copy that stopped half-way is noticed (watcher/discs.py)."""
from peewee import BigIntegerField, CharField, DateTimeField, Model, TextField


def up(migrator, db):
    class Disc(Model):
        source = TextField()  # relative to watch.drop_dir
        sha256 = CharField(max_length=64, unique=True)
        stored_path = TextField()  # relative to archive.dir
        size = BigIntegerField()
        arrived_at = DateTimeField(index=True)
        node = CharField(max_length=255)
        referenced = TextField(default="[]")  # JSON list of paths relative to watch.drop_dir
        warned_at = DateTimeField(null=True)
        complete_at = DateTimeField(null=True)

        class Meta:
            database = db
            table_name = "disc"

    db.create_tables([Disc])
