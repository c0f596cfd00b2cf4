"""One importer per database: a second ``run`` (or a ``scan`` beside it) is refused at once.

The lock is the kernel's or the server's, never a file's existence: a
process killed with SIGKILL holds nothing, so a crash never blocks the next start.
- SQLite (one node per database): flock on ``<database file>.lock`` beside it.
  The file only carries who holds the lock, for the message.
- PostgreSQL (several nodes, one importer per node name): a session-level
  advisory lock keyed by the node name, on a connection of its own whose
  application_name says who holds it.
"""

import contextlib
import datetime
import fcntl
import os
import socket
import time
import zlib
from pathlib import Path

LOCK_CLASS = 7347002  # first key of our advisory locks (migrations use 7347001)


class AlreadyRunning(Exception):
    """Another importer holds this database (or this node name on it); the message says who."""


def _who(what: str, since: bool = True) -> str:
    who = f"dicom-watcher {what}, pid {os.getpid()} on {socket.gethostname()}"
    if since:
        who += ", since " + datetime.datetime.now().astimezone().isoformat(timespec="seconds")
    return who


@contextlib.contextmanager
def hold(url: str, node: str, what: str):
    """Hold the importer's lock for the block; raise ``AlreadyRunning`` if someone else has it."""
    if url.startswith("sqlite:///"):
        with _flock(Path(url[len("sqlite:///"):] + ".lock"), what):
            yield
    else:
        with _advisory(url, node, what):
            yield


@contextlib.contextmanager
def _flock(path: Path, what: str):
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _holder(fd)
            raise AlreadyRunning(f"{holder} already imports into this database "
                                 f"({path.with_suffix('')}); stop it first") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, (_who(what) + "\n").encode(), 0)
        yield
    finally:
        os.close(fd)


def _holder(fd: int) -> str:
    """Who holds the flock, as the holder wrote it; it writes just after taking the lock, so
    a refusal that comes in between waits a moment for the name."""
    for _ in range(40):
        holder = os.pread(fd, 4096, 0).decode("utf-8", "replace").strip()
        if holder:
            return holder
        time.sleep(0.025)
    return "another process"


@contextlib.contextmanager
def _advisory(url: str, node: str, what: str):
    import psycopg

    key = zlib.crc32(node.encode()) - (1 << 31)  # a signed 32-bit key
    dsn = "postgresql://" + url.split("://", 1)[1]
    conn = psycopg.connect(dsn, autocommit=True, application_name=_who(what, since=False)[:63])
    try:
        if not conn.execute("SELECT pg_try_advisory_lock(%s, %s)", (LOCK_CLASS, key)).fetchone()[0]:
            row = conn.execute(
                "SELECT a.application_name, a.client_addr FROM pg_locks l "
                "JOIN pg_stat_activity a ON a.pid = l.pid WHERE l.locktype = 'advisory' "
                "AND l.classid = %s AND l.objid = %s AND l.objsubid = 2 AND l.granted",
                (LOCK_CLASS, key & 0xFFFFFFFF)).fetchone()
            holder = f"{row[0]} (from {row[1] or 'a local socket'})" if row else "another process"
            raise AlreadyRunning(f"{holder} already imports as node {node!r} on this database; "
                                 "stop it first, or give this one another import.node")
        yield
    finally:
        conn.close()
