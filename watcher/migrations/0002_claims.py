"""Claims: which node is importing which file, with an expiry, for several nodes on one folder."""
from peewee import CharField, DateTimeField, Model, TextField


def up(migrator, db):
    class Claim(Model):
        path = TextField(primary_key=True)
        node = CharField(max_length=255)
        token = CharField(max_length=64)
        expires_at = DateTimeField()

        class Meta:
            database = db
            table_name = "claim"

    db.create_tables([Claim])
