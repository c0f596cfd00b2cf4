"""The ingest in a process of its own, for an intake whose own threads would share one GIL
with it: a replication's fetches.

Python runs one thread at a time. An ingest makes a dozen system calls an object (open, stat,
link, fsync, rename, …), and after each it must win the GIL back from the threads that are
receiving and hashing the next objects: measured on this project's 2-core machine, the same
2,000 small objects took 0.8 ms each to ingest alone and ~2.4 ms each beside two fetching
threads. Here the fetching stays in the caller's process and ``pipeline.ingest_objects``
runs, unchanged, in a child started for the run (a new Python: nothing of the caller's
threads, locks or connections is inherited), fed over a pipe. What it gives back is what
``ingest_objects`` returns, and the caller counts each import's time (``timings.IMPORTS``) as
if it had been its own.

A child whose caller dies (``kill -9``) reads the end of its pipe and exits once the batch in
hand is committed: what it committed is in the catalog, and a run again finds it present.
SIGTERM and SIGINT are left to the caller, which stops its run and then this process: the
child has a session of its own (a Ctrl-C at the terminal does not reach it) and ignores both
(systemd signals every process of a service). The child's side is ``watcher.ingest_child``.
"""

import logging
import multiprocessing
import os
import subprocess
import sys
from pathlib import Path

from . import timings
from .config import Config
from .errors import Unavailable
from .outcome import Outcome, is_timed

LOGGER = logging.getLogger(__name__)
PACKAGE_ROOT = Path(__file__).resolve().parent.parent
STOP_SECONDS = 30.0  # for the batch in hand to be committed, when the run ends


class IngestProcess:
    """``ingest(objects)``: ``ingest_objects(objects, config)`` in the child, started at once
    (its start-up overlaps what the caller does next); ``close()`` ends it: once it has
    finished its batch, or at once (killed) if it was never given one."""

    def __init__(self, config: Config, name: str = "ingest"):
        self._used = False  # given a batch
        self._pipe, theirs = multiprocessing.Pipe()
        sqlite = config.database.url.startswith("sqlite:")
        try:
            # A session of its own: a Ctrl-C at the terminal goes to the caller alone, which
            # stops its run and then this process (in its start-up, it would print a traceback).
            self._process = subprocess.Popen(
                # The same package as ours, wherever it was imported from: first on its path,
                # and not the working folder (-P), which may hold another ``watcher``.
                [sys.executable, "-P", "-c",
                 f"from watcher.ingest_child import main; main({theirs.fileno()}, {sqlite})"],
                env=os.environ | {"PYTHONPATH": os.pathsep.join(
                    p for p in (str(PACKAGE_ROOT), os.environ.get("PYTHONPATH")) if p)},
                pass_fds=[theirs.fileno()], stdin=subprocess.DEVNULL, start_new_session=True)
        finally:
            theirs.close()
        try:
            self._pipe.send((config, logging.getLogger().getEffectiveLevel(), name))
        except OSError:  # (it ended already: the first batch says how)
            pass

    def ingest(self, objects: list[dict]) -> list:
        """In order, each object's Outcome or the exception that stopped it. ``Unavailable``
        if the child is gone (what it committed of this batch, a run again finds present)."""
        self._used = True
        try:
            self._pipe.send(objects)
            outcomes = self._pipe.recv()
        except (EOFError, OSError):
            raise Unavailable(f"the ingest process ended ({self._ended()})") from None
        for outcome in outcomes:  # (this process's heartbeat reports the import times)
            if isinstance(outcome, Outcome) and is_timed(outcome):
                timings.IMPORTS.observe(outcome.ms / 1000)
        return outcomes

    def _ended(self) -> str:
        try:
            code = self._process.wait(1.0)
        except subprocess.TimeoutExpired:
            return "its pipe closed"
        return f"killed by signal {-code}" if code < 0 else f"exit code {code}"

    def close(self) -> None:
        if not self._used:  # (still loading, most likely: it has nothing to finish)
            self._process.kill()
        try:
            self._pipe.send(None)
        except OSError:
            pass
        self._pipe.close()
        try:
            self._process.wait(STOP_SECONDS)
        except subprocess.TimeoutExpired:
            LOGGER.error("the ingest process did not end in %.0f s: killed", STOP_SECONDS)
            self._process.kill()
            self._process.wait()
