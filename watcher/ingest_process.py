"""The ingest in a process of its own, for an intake whose own threads would share one GIL
with it: a replication's fetches.

Python runs one thread at a time. An ingest makes a dozen system calls an object (open, stat,
link, fsync, rename, …), and after each it must win the GIL back from the threads that are
receiving and hashing the next objects: measured on this project's 2-core machine, the same
2,000 small objects took 0.8 ms each to ingest alone and ~2.4 ms each beside two fetching
threads. Here the fetching stays in the caller's process and ``pipeline.ingest_objects``
runs, unchanged, in a child started for the run (``spawn``: nothing of the caller's threads,
locks or connections is inherited). What it gives back is what ``ingest_objects`` returns,
and the caller counts each import's time (``timings.IMPORTS``) as if it had been its own.

A child whose caller dies (``kill -9``) reads the end of its pipe and exits once the batch in
hand is committed: what it committed is in the catalog, and a run again finds it present.
SIGTERM and SIGINT (systemd and Ctrl-C signal every process) are left to the caller, which
stops its run and then this process's.
"""

import logging
import multiprocessing
import signal

from . import logs, models, timings
from .config import Config
from .errors import Unavailable
from .pipeline import Outcome, ingest_objects, is_timed, is_unavailable

LOGGER = logging.getLogger(__name__)
STOP_SECONDS = 30.0  # for the batch in hand to be committed, when the run ends


class IngestProcess:
    """``ingest(objects)``: ``ingest_objects(objects, config)`` in the child, started at once
    (its start-up overlaps what the caller does next); ``close()`` ends it."""

    def __init__(self, config: Config, name: str = "ingest"):
        context = multiprocessing.get_context("spawn")
        self._pipe, theirs = context.Pipe()
        self._process = context.Process(
            target=_serve, args=(theirs, config, logging.getLogger().getEffectiveLevel(), name),
            name=f"dicom-watcher {name}", daemon=True)
        self._process.start()
        theirs.close()

    def ingest(self, objects: list[dict]) -> list:
        """In order, each object's Outcome or the exception that stopped it. ``Unavailable``
        if the child is gone (what it committed of this batch, a run again finds present)."""
        try:
            self._pipe.send(objects)
            outcomes = self._pipe.recv()
        except (EOFError, OSError):
            self._process.join(1.0)
            code = self._process.exitcode
            how = (f"killed by signal {-code}" if code is not None and code < 0 else
                   f"exit code {code}" if code is not None else "its pipe closed")
            raise Unavailable(f"the ingest process ended ({how})") from None
        for outcome in outcomes:  # (this process's heartbeat reports the import times)
            if isinstance(outcome, Outcome) and is_timed(outcome):
                timings.IMPORTS.observe(outcome.ms / 1000)
        return outcomes

    def close(self) -> None:
        try:
            self._pipe.send(None)
        except OSError:
            pass
        self._pipe.close()
        self._process.join(STOP_SECONDS)
        if self._process.is_alive():
            LOGGER.error("the ingest process did not end in %.0f s: killed", STOP_SECONDS)
            self._process.kill()
            self._process.join()


def _serve(pipe, config: Config, level: int, name: str) -> None:
    for sig in (signal.SIGTERM, signal.SIGINT):  # (systemd and Ctrl-C signal every process:
        signal.signal(sig, signal.SIG_IGN)  # the caller stops, then ends this one's work)
    logs.setup(verbose=max(0, (logging.INFO - level) // 10),
               quiet=max(0, (level - logging.INFO) // 10))
    logs.name_process(name)
    models.connect(config.database.url, migrate=False)
    try:
        while True:
            try:
                objects = pipe.recv()
            except EOFError:  # the caller is gone
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
    kind = Unavailable if is_unavailable(exc) else RuntimeError
    return kind(f"{type(exc).__name__}: {exc}")
