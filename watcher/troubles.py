"""What keeps a node from working as it should, since when, and saying so once.

A trouble has a kind (``unavailable``: the database or the archive cannot be
used; ``drop-folder``: it is gone; ``watches``: the kernel gives no more inotify
watches; ``stalled``: a commit has waited too long) and a reason a person can
act on. Each is logged once when it begins (WARNING) and once when it ends
(INFO, with how long it lasted); the heartbeat shows the current ones, so
``status`` says ``paused (why, since)``.
"""

import datetime
import logging
import threading

from .models import utcnow

LOGGER = logging.getLogger(__name__)


class Troubles:
    def __init__(self, on_change=None):
        """``on_change()``: called when a trouble begins or ends (the node reports at once)."""
        self._on_change = on_change or (lambda: None)
        self._lock = threading.Lock()
        self._now: dict[str, tuple[str, datetime.datetime]] = {}

    def began(self, kind: str, why: str) -> bool:
        """Note a trouble; True (and one WARNING) only when it is new. A new reason for a
        trouble already under way replaces the old one silently."""
        with self._lock:
            known = self._now.get(kind)
            self._now[kind] = (why, known[1] if known else utcnow())
        if known is None:
            LOGGER.warning("paused: %s", why)
            self._on_change()
        return known is None

    def ended(self, kind: str) -> bool:
        """The trouble is over; True (and one INFO line) if there was one."""
        with self._lock:
            known = self._now.pop(kind, None)
        if known is not None:
            why, since = known
            LOGGER.info("resumed after %.0f s (was: %s)", (utcnow() - since).total_seconds(), why)
            self._on_change()
        return known is not None

    def __contains__(self, kind: str) -> bool:
        return kind in self._now

    def summary(self) -> tuple[str, datetime.datetime | None]:
        """Every current reason, joined, and since when the oldest has lasted ("", None if none)."""
        with self._lock:
            current = list(self._now.values())
        if not current:
            return "", None
        return "; ".join(why for why, _ in current), min(since for _, since in current)
