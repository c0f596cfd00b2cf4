"""The one-shot scan: import everything in the drop folder now, then return a summary."""

import collections
import logging
import os
import time

from . import archive, beneath, claims, detect, dispose, settle
from .config import Config
from .errors import Unavailable
from .pipeline import ingest

LOGGER = logging.getLogger(__name__)


def sweep(config: Config, final: bool = False, clock=time.time, sleep=time.sleep,
          monotonic=time.monotonic, progress=None) -> dict:
    """Process the drop folder until nothing is left but files still incomplete.

    Files still settling are waited for. Incomplete files are left (pending)
    unless they stayed unchanged for ``incomplete_seconds`` — or, with
    ``final``, for ``settle_seconds``: the folder is known to be at rest.
    Files still open by a writer are left pending, however long. Files whose
    outcome is recorded but that cannot be removed or moved are listed under
    ``undisposed`` (path: error), and the summary's caller should fail.

    ``progress(done, found, waiting)``, if given, is called after each file and
    while waiting: files with an outcome, files found so far, and what the scan
    waits for ("" when nothing). Each new kind of wait is also logged once.
    """
    w = config.watch
    claims.release_stale(config.import_.node)
    archive.remove_stale_temporaries(config.archive.dir)
    for rel in dispose.recover(w.drop_dir):
        LOGGER.warning("put back %s (its removal was cut short by a crash)", rel)
    counts = collections.Counter()
    attempts = collections.Counter()
    observed = settle.Observed(monotonic)
    done_with, pending, undisposed = set(), set(), {}
    found, told = set(), set()

    def waiting_for(what: str) -> None:
        if what and what.split(" ", 1)[1] not in told:  # ("3 files to settle": told once per kind)
            told.add(what.split(" ", 1)[1])
            LOGGER.info("waiting for %s", what)
        if progress:
            progress(sum(counts.values()), len(found), what)

    while True:
        waits = []
        for path, st in detect.scan(w.drop_dir, w.ignore):
            found.add(path)
            signature = (path, st.st_ino, st.st_size, st.st_ctime_ns)
            if signature in done_with:
                continue
            now = clock()
            seen = observed.unchanged_for(path, st)
            wait = settle.wait_seconds(st, now, w.settle_seconds, observed=seen)
            if wait > 0:
                waits.append(wait)
                continue
            # --final: the person says the folder is at rest, so a settled file is as complete as
            # it will get; otherwise only what we saw counts (settle.py).
            is_final = final or settle.is_final(seen, w.incomplete_seconds)
            attempts[path] += 1
            try:
                outcome = ingest(path, config, final=is_final, attempt=attempts[path])
            except Unavailable as exc:
                LOGGER.error("stopping: %s", exc)
                raise
            if progress:
                progress(sum(counts.values()) + 1, len(found), "")
            if outcome.undisposed:
                LOGGER.warning("%s %r: %s; it stays in the drop folder", outcome.outcome,
                               outcome.source, outcome.undisposed)
                undisposed[outcome.source] = outcome.undisposed
                done_with.add(signature)
                if outcome.outcome != "pending":
                    counts[outcome.outcome] += 1
            elif outcome.outcome == "claimed":
                attempts[path] -= 1
                waits.append(1.0)
            elif outcome.outcome == "retry":
                waits.append(0.5)
            elif outcome.outcome == "pending":
                if path not in pending:
                    LOGGER.info("pending %r: %s: %s", outcome.source, outcome.waiting or "incomplete",
                                outcome.detail)
                pending.add(path)
                done_with.add(signature)
            else:
                counts[outcome.outcome] += 1
                if outcome.again:
                    waits.append(w.settle_seconds)
        if not waits:
            break
        waiting_for(f"{len(waits)} files to settle (unchanged for {w.settle_seconds:g} s)")
        sleep(min(max(min(waits), 0.05), 1.0))
    # --final: the folder is at rest, so its emptied folders may go at once; otherwise one may
    # be about to receive a copy's next file, and waits until it has been quiet.
    quiet = 0.0 if final else w.settle_seconds
    while young := dispose.prune_empty_dirs(w.drop_dir, quiet, clock()):
        waiting_for(f"{young} emptied folders to be quiet for {quiet:g} s before removing them")
        sleep(0.2)
    if progress:
        progress(sum(counts.values()), len(found), "")
    counts["pending"] = sum(1 for p in pending if p not in undisposed
                            and beneath.lexists(w.drop_dir, os.path.relpath(p, w.drop_dir)))
    result = dict(counts)
    result["undisposed"] = undisposed
    return result
