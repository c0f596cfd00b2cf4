"""Each outcome in the history says which way its object came in (``folder``, ``dicom``,
``upload``, ``replication``); NULL for what concerns no intake (distributions, retries)."""


def up(migrator, db):
    db.execute_sql('ALTER TABLE "history" ADD COLUMN "intake" TEXT')
