"""When is a file ready to be looked at, and when has it waited long enough?

A file is settled when nothing has written to it for ``settle_seconds``, and
final (if still incomplete, it never will be complete) after
``incomplete_seconds``. How long it has been quiet is measured two ways: by its
ctime (moved by every write, and not fakeable with utime) and mtime, when they
lie in the past; and by our own observation, on a monotonic clock, of its
signature staying the same.

- Settled takes the longer of the two. Timestamps in the future (``cp -p`` from
  a skewed clock, FAT or ISO time zones, a clock that jumped back) therefore
  never leave a file waiting forever: observation takes over. A clock that
  jumped forward makes a file look older than it is, which only lets
  validation look at it sooner; validation proves completeness, and a writer
  that still holds the file keeps it (the read lease).
- Final, which turns an incomplete file into a rejection, trusts only what we
  saw: the file unchanged on our monotonic clock for ``incomplete_seconds``.
  No wall clock, however wrong, can reject a file that is still being written.

A writer that closed the file, or a rename into the folder, is a stronger
sign: such a file is ready at once, as long as it has not changed since.
Settled is never proof of completeness: validation proves that. The clocks
are passed in, so the rules can be tested without waiting.
"""

import os
import time

CLOCK_SLACK = 1.0  # seconds a timestamp may lie ahead of our clock (coarse file system clocks)


def last_change(st: os.stat_result) -> float:
    return max(st.st_mtime, st.st_ctime)


def quiet_seconds(st: os.stat_result, now: float, observed: float = 0.0) -> float:
    """How long the file has certainly not changed; ``observed``: how long we saw it unchanged."""
    changed = last_change(st)
    stamped = now - changed if changed <= now + CLOCK_SLACK else 0.0
    return max(stamped, observed, 0.0)


def wait_seconds(st: os.stat_result, now: float, settle_seconds: float,
                 done_at: float | None = None, observed: float = 0.0) -> float:
    """0 when the file may be looked at now, else how long to wait.

    ``done_at``: when a writer closed the file or renamed it in (if we saw it).
    """
    if done_at is not None and last_change(st) <= done_at:
        return 0.0
    return max(0.0, settle_seconds - quiet_seconds(st, now, observed))


def is_final(observed: float, incomplete_seconds: float) -> bool:
    """We saw the file unchanged so long that, if incomplete, it never will be complete."""
    return observed >= incomplete_seconds


class Observed:
    """For each path, since when (monotonic) we have seen it with the same signature."""

    def __init__(self, monotonic=time.monotonic):
        self._monotonic = monotonic
        self._seen: dict = {}

    def unchanged_for(self, path, st: os.stat_result) -> float:
        sig = (st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
        now = self._monotonic()
        seen = self._seen.get(path)
        if seen is None or seen[0] != sig:
            self._seen[path] = (sig, now)
            return 0.0
        return now - seen[1]

    def forget(self, path) -> None:
        self._seen.pop(path, None)

    def __len__(self) -> int:
        return len(self._seen)
