"""The databases' counts as the dashboard shows them: counted by a background job, so that a
page never waits for a count over millions of instances (a third of a second at 1,000,000 on
SQLite). The job counts every EVERY seconds, less often when counting takes long (never more
than 5 % of a core); the page says when the counts were made.

Without the job (the app outside the service, in a test), or when its counts are old, a page
counts for itself.
"""

import datetime
import logging
import threading
import time

from apscheduler.schedulers.background import BackgroundScheduler

from ..models import utcnow
from ..studies import databases
from .auth import connected

LOGGER = logging.getLogger(__name__)
EVERY = 10.0  # seconds between counts
SHARE = 0.05  # of one core, at most: a count that takes 1 s is made every 20 s


class Counts:
    def __init__(self, every: float = EVERY):
        self.every = every
        self._lock = threading.Lock()
        self._latest: tuple[list[dict], datetime.datetime, float] | None = None  # (+ monotonic)
        self._took = 0.0
        self._scheduler: BackgroundScheduler | None = None

    @property
    def interval(self) -> float:
        return max(self.every, self._took / SHARE)

    def latest(self) -> tuple[list[dict], datetime.datetime]:
        """``databases.listing()`` as last counted, and when (UTC); counted now if never, or if
        the counts are older than three intervals (no job is counting)."""
        with self._lock:
            latest = self._latest
        if latest is None or time.monotonic() - latest[2] > 3 * self.interval:
            return self.count()
        return latest[0], latest[1]

    def count(self) -> tuple[list[dict], datetime.datetime]:
        started = time.monotonic()
        with connected():
            listing = databases.listing()
        now = time.monotonic()
        with self._lock:
            self._took = now - started
            self._latest = (listing, utcnow(), now)
        return listing, self._latest[1]

    def start(self) -> "Counts":
        self._scheduler = BackgroundScheduler(daemon=True)
        self._scheduler.add_job(self._tick, "interval", seconds=self.every, id="count-databases",
                                next_run_time=datetime.datetime.now(datetime.timezone.utc),
                                max_instances=1, coalesce=True)
        self._scheduler.start()
        return self

    def stop(self) -> None:
        if self._scheduler is not None:
            self._scheduler.shutdown(wait=True)
            self._scheduler = None

    def _tick(self) -> None:
        with self._lock:
            latest = self._latest
        if latest is not None and time.monotonic() - latest[2] < self.interval - 0.5:
            return  # counting is costly here: less often
        try:
            self.count()
        except Exception as exc:  # (the database is away: a page then counts, or fails, itself)
            LOGGER.warning("counting the databases for the dashboard failed: %s", exc)


__all__ = ["Counts", "EVERY"]
