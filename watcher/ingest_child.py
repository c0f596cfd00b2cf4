"""The ingest process's own side (see ``watcher.ingest_process``): ``main(fd)`` reads the
config from its pipe, then batches of objects, and answers each batch with what
``pipeline.ingest_objects`` returns.

Its start-up is on the path of every replication (the first objects wait for it), so a
SQLite catalog's process is kept from loading a PostgreSQL driver that peewee would import as
it loads, used or not (~0.15 s, a third of this process's start-up).
"""

import logging
import pickle
import signal
import sys
from multiprocessing.connection import Connection

POSTGRES_DRIVERS = ("psycopg", "psycopg2", "psycopg2cffi")


def main(fd: int, sqlite: bool = False) -> None:
    """The child: ``python -c "…main(fd, sqlite)"``, ``fd`` its end of the pipe, ``sqlite``
    whether the catalog is SQLite (known before the config is read: reading it loads peewee)."""
    for sig in (signal.SIGTERM, signal.SIGINT):  # (systemd signals every process of the
        signal.signal(sig, signal.SIG_IGN)  # service: the caller stops, then ends this one)
    if sqlite:
        for driver in POSTGRES_DRIVERS:  # (None in sys.modules: "import psycopg" fails at once)
            sys.modules.setdefault(driver, None)
    pipe = Connection(fd)
    try:
        config, level, name = pipe.recv()
    except (EOFError, OSError, pickle.UnpicklingError):
        return
    from . import logs, models  # (only now: each of them loads peewee)
    from .pipeline import ingest_objects

    logs.setup(verbose=max(0, (logging.INFO - level) // 10),
               quiet=max(0, (level - logging.INFO) // 10))
    logs.name_process(name)
    models.connect(config.database.url, migrate=False)
    try:
        while True:
            try:
                objects = pipe.recv()
            except (EOFError, OSError):  # the caller is gone
                return
            if objects is None:
                return
            outcomes = [_portable(o) if isinstance(o, Exception) else o
                        for o in ingest_objects(objects, config)]
            try:
                pipe.send(outcomes)
            except OSError:  # the caller is gone: what was committed stays committed
                return
    finally:
        models.disconnect()


def _portable(exc: Exception) -> Exception:
    """An exception the caller can unpickle, still telling an outage (``is_unavailable``)
    from a fault of the object."""
    from .errors import Unavailable
    from .outcome import is_unavailable

    kind = Unavailable if is_unavailable(exc) else RuntimeError
    return kind(f"{type(exc).__name__}: {exc}")
