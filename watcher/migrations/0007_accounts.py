"""Accounts: the people of the web app, the API tokens of their programs, and their grants on
study databases (``read`` or ``write``; one per account and database).

Passwords are kept as argon2 hashes and tokens as the sha256 of their secret: neither can be
read back. A grant goes with its database (ON DELETE CASCADE): deleting a database leaves no
right behind for a later database of the same name to inherit.
"""
from peewee import (AutoField, BooleanField, CharField, DateTimeField, ForeignKeyField, Model,
                    TextField)


def up(migrator, db):
    class StudyDatabase(Model):  # exists since 0005: only referred to
        id = AutoField()

        class Meta:
            database = db
            table_name = "study_database"

    class Account(Model):
        name = CharField(max_length=64, unique=True)
        password_hash = TextField()
        is_manager = BooleanField(default=False)
        disabled = BooleanField(default=False)
        created_at = DateTimeField()

        class Meta:
            database = db
            table_name = "account"

    class ApiToken(Model):
        account = ForeignKeyField(Account, on_delete="CASCADE")
        token_hash = CharField(max_length=64, unique=True)
        created_at = DateTimeField()
        revoked = BooleanField(default=False)

        class Meta:
            database = db
            table_name = "api_token"

    class Grant(Model):
        account = ForeignKeyField(Account, on_delete="CASCADE")
        study_database = ForeignKeyField(StudyDatabase, on_delete="CASCADE")
        level = CharField(max_length=8)

        class Meta:
            database = db
            table_name = "grant"
            indexes = ((("account", "study_database"), True),)

    db.create_tables([Account, ApiToken, Grant])
