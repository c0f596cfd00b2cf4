"""Each node's heartbeat carries what /metrics shows of it: its histogram of import durations
(JSON, since the process started) and its DICOM associations open now."""


def up(migrator, db):
    db.execute_sql("ALTER TABLE \"heartbeat\" ADD COLUMN \"durations\" TEXT NOT NULL DEFAULT ''")
    db.execute_sql('ALTER TABLE "heartbeat" ADD COLUMN "associations" INTEGER NOT NULL DEFAULT 0')
