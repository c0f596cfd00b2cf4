"""The web app: its signing key (made once, shared by every node of a PostgreSQL site) and the
sessions of the people signed in (a signed cookie names one; signing out deletes it)."""
from peewee import CharField, DateTimeField, ForeignKeyField, Model, TextField


def up(migrator, db):
    class Account(Model):  # exists since 0007: only referred to
        class Meta:
            database = db
            table_name = "account"

    class WebSetting(Model):
        key = CharField(max_length=64, primary_key=True)
        value = TextField()

        class Meta:
            database = db
            table_name = "web_setting"

    class WebSession(Model):
        token_hash = CharField(max_length=64, primary_key=True)
        account = ForeignKeyField(Account, on_delete="CASCADE")
        csrf = CharField(max_length=64)
        created_at = DateTimeField()
        expires_at = DateTimeField(index=True)

        class Meta:
            database = db
            table_name = "web_session"

    db.create_tables([WebSetting, WebSession])
