"""Claim a file before importing it, so that several nodes on one drop folder never
import the same file at once.

A claim is a row keyed by the file's path with an expiry (a lease), not a lock
file: a node killed while holding one blocks nobody for longer than the lease,
after which any node takes it over. The lease grows with the file's size, so
a slow copy of a large file is not taken over while it runs. On SQLite (one
node per database) claiming is skipped: the service's own schedule already
keeps one path in one worker's hands.
"""

import contextlib
import datetime
import os
import time
import uuid

from . import archive
from .models import Claim, database, is_shared, utcnow, write_transaction
from .names import to_text

BYTES_PER_SECOND = 10e6  # a slow archive disk: how long storing a large file may take


def lease_for(size: int, base_seconds: float) -> float:
    return base_seconds + size / BYTES_PER_SECOND


@contextlib.contextmanager
def claim(path, node: str, lease_seconds: float):
    """Yields True when this node holds ``path`` for the block, False when another does."""
    if not is_shared():
        yield True
        return
    key, token = to_text(os.path.abspath(path)), f"{os.getpid()}:{uuid.uuid4().hex[:16]}"
    try:
        size = os.lstat(path).st_size
    except OSError:
        size = 0
    now = utcnow()
    until = now + datetime.timedelta(seconds=lease_for(size, lease_seconds))
    with write_transaction():
        _no_fsync_wait()
        taken = database.execute_sql(_take_sql(database.param), (
            key, node, token, _stamp(until), _stamp(now), f"{os.getpid()}:%")).fetchone()
    if taken is None:  # another node's claim, still within its lease
        yield False
        return
    try:
        yield True
    finally:
        try:
            with write_transaction():
                _no_fsync_wait()
                database.execute_sql(f'DELETE FROM "claim" WHERE "path" = {database.param} '
                                     f'AND "token" = {database.param}', (key, token))
        except Exception:  # the database went away: the lease runs out by itself
            pass


def _take_sql(p: str) -> str:
    """Insert the claim, or take over an expired one or one of this process's own (its release
    was lost with the database connection: one process never claims a path twice at once, so
    it is an orphan); returns a row only if we got it."""
    return (f'INSERT INTO "claim" ("path", "node", "token", "expires_at") VALUES ({p}, {p}, {p}, {p}) '
            'ON CONFLICT ("path") DO UPDATE SET "node" = excluded."node", '
            '"token" = excluded."token", "expires_at" = excluded."expires_at" '
            f'WHERE "claim"."expires_at" < {p} OR ("claim"."node" = excluded."node" '
            f'AND "claim"."token" LIKE {p}) RETURNING "token"')


def _stamp(moment):
    return Claim.expires_at.db_value(moment)


def _no_fsync_wait() -> None:
    """A claim need not survive a server crash: if it is lost, the worst is that two nodes
    look at one file at once, which the unique SOP Instance UID already settles. So its
    commit does not wait for the WAL flush (PostgreSQL's synchronous_commit, this
    transaction only); instance rows keep full durability."""
    database.execute_sql("SET LOCAL synchronous_commit = off")


def await_dead_holders(node: str, timeout: float = 10.0) -> None:
    """Before a node's importers start (the run lock is ours, so no other live process of this
    node may import): processes of its last run that still hold claims are dying (a SIGKILLed
    service's children die after it); give them ``timeout`` to be gone, so that
    ``release_stale`` frees their claims at once instead of after their leases."""
    if not is_shared():
        return
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        holders = {int(c.token.split(":")[0]) for c in Claim.select(Claim.token).where(Claim.node == node)}
        if not any(archive.is_alive(pid) for pid in holders - {os.getpid()}):
            return
        time.sleep(0.05)


def release_stale(node: str) -> int:
    """At start-up: claims this node's dead processes held (a crash, a restart) are ours to drop.

    Claims of live processes with the same node name (a ``scan`` beside a
    running service) are left alone.
    """
    if not is_shared():
        return 0
    dead = [c.token for c in Claim.select(Claim.token).where(Claim.node == node)
            if not archive.is_alive(int(c.token.split(":")[0]))]
    if dead:
        Claim.delete().where((Claim.node == node) & Claim.token.in_(dead)).execute()
    return len(dead)
