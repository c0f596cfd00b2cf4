"""When is a file ready to be looked at, and when has it waited long enough?

A file is settled when nothing has written to it for ``settle_seconds``:
its ctime (moved by every write, and not fakeable with utime) and mtime are
that old. A writer that closed the file, or a rename into the folder, is a
stronger sign: such a file is ready at once, as long as it has not changed
since. Settled is never proof of completeness: validation proves that.
The clock is passed in, so the rules can be tested without waiting.
"""

import os


def last_change(st: os.stat_result) -> float:
    return max(st.st_mtime, st.st_ctime)


def wait_seconds(st: os.stat_result, now: float, settle_seconds: float,
                 done_at: float | None = None) -> float:
    """0 when the file may be looked at now, else how long to wait.

    ``done_at``: when a writer closed the file or renamed it in (if we saw it).
    """
    changed = last_change(st)
    if done_at is not None and changed <= done_at:
        return 0.0
    if changed > now + 1:  # clock skew (a network share): trust our own wait
        return settle_seconds
    return max(0.0, changed + settle_seconds - now)


def is_final(st: os.stat_result, now: float, incomplete_seconds: float) -> bool:
    """The file stayed unchanged so long that, if incomplete, it never will be complete."""
    return now - last_change(st) >= incomplete_seconds
