"""instance.xxh3: each original's xxh3-128 (watcher/archive.py, quick_digest), which a download
checks as it sends, ~15 times faster than sha256. Rows from before it have NULL: their
downloads check the sha256, as before."""


def up(migrator, db):
    db.execute_sql('ALTER TABLE "instance" ADD COLUMN "xxh3" VARCHAR(32)')
