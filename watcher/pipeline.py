"""One file through the stages: open, validate, store, record, dispose.

``ingest`` is the only place that decides what an exception means for a file:
``Rejected`` moves it to the rejected folder, ``NotReady`` leaves it for later
(or rejects it once it has stayed incomplete long enough), a vanished file
is noted, trouble with the archive disk or the database (``Unavailable``)
stops the caller without touching the file, and anything else is retried a
few times before the file is rejected as ``error``.
"""

import errno
import logging
import os
import stat
import time
from dataclasses import dataclass
from pathlib import Path

import peewee

from . import archive, catalog, claims, dispose, stage
from .commit import commit_all, commit_now
from .config import Config
from .errors import NotReady, Rejected, Unavailable
from .names import to_text

LOGGER = logging.getLogger(__name__)


@dataclass(frozen=True)
class Outcome:
    outcome: str  # imported, duplicate, dicomdir, rejected, pending, retry, claimed, vanished
    source: str
    sop_instance_uid: str | None = None
    sha256: str | None = None
    reason: str | None = None
    detail: str = ""
    ms: float = 0.0


def ingest(path: Path, config: Config, final: bool = False, attempt: int = 1,
           commit=commit_now) -> Outcome:
    """Import one file of the drop folder.

    ``final``: the file has not changed for ``incomplete_seconds``, so if it is
    still incomplete it never will be complete: reject it.
    ``attempt``: how many times an unexpected error has been met for it so far, plus one.
    ``commit``: writes its instance record durably and returns "imported" or "duplicate"
    (``commit_now``); ``ingest_together`` commits many files' records at once instead.
    """
    steps = ingesting(path, config, final, attempt)
    try:
        record = next(steps)
        while True:  # (once: a file has one record)
            try:
                result = commit(record)
            except Exception as exc:
                record = steps.throw(exc)
            else:
                record = steps.send(result)
    except StopIteration as done:
        return done.value


def ingest_together(files: list, config: Config) -> list:
    """``ingest`` for many files, their rows committed in one transaction (one fsync for all).

    ``files``: (path, final, attempt) tuples. Returns, in order, each file's Outcome, or the
    ``Unavailable`` that stopped it.
    """
    results: list = [None] * len(files)
    waiting: list = []  # (index, steps, record): stored, waiting for the commit
    for i, (path, final, attempt) in enumerate(files):
        results[i] = _advance(ingesting(path, config, final, attempt), i, waiting)
    while waiting:
        batch, waiting = waiting, []
        for (i, steps, _), result in zip(batch, commit_all([record for _, _, record in batch])):
            results[i] = _advance(steps, i, waiting, result)
    return results


_START = object()


def _advance(steps, i: int, waiting: list, result=_START):
    """Run ``steps`` on (sent ``result``, or thrown it if an exception) to its next record,
    which goes to ``waiting``, or to its outcome, which is returned."""
    try:
        if result is _START:
            record = next(steps)
        elif isinstance(result, Exception):
            record = steps.throw(result)
        else:
            record = steps.send(result)
    except StopIteration as done:
        return done.value
    except Unavailable as exc:
        return exc
    waiting.append((i, steps, record))
    return None


def ingesting(path: Path, config: Config, final: bool = False, attempt: int = 1):
    """The stages of ``ingest`` as a generator: it yields the file's instance record once the
    original is stored, is sent the commit's result (or thrown its exception) and returns the
    Outcome; the caller decides how records are committed."""
    started = time.monotonic()
    rel = os.path.relpath(path, config.watch.drop_dir)
    try:
        with claims.claim(path, config.import_.node, config.import_.claim_seconds) as held:
            if held:
                outcome = yield from _decide(Path(path), rel, config, final, attempt)
            else:
                outcome = Outcome("claimed", rel, detail="another node is importing it")
    except Exception as exc:  # the decision itself could not be carried out
        if _is_unavailable(exc):
            raise Unavailable(str(exc)) from exc
        if not os.path.lexists(path):
            outcome = Outcome("vanished", rel, detail="removed by someone else before it was imported")
        else:
            LOGGER.warning("retry %s: %s: %s", to_text(rel), type(exc).__name__, exc, exc_info=attempt == 1)
            outcome = Outcome("retry", rel, detail=f"{type(exc).__name__}: {exc}")
    outcome = _timed(outcome, started)
    _log(outcome)
    return outcome


def _decide(path: Path, rel: str, config: Config, final: bool, attempt: int):
    try:
        return (yield from _ingest(path, rel, config))
    except Rejected as exc:
        return _reject(path, rel, exc.reason, exc.detail, config)
    except NotReady as exc:
        if not final:
            return Outcome("pending", rel, detail=exc.detail)
        detail = f"{exc.detail}; it has not changed since"
        return _reject(path, rel, exc.reason, detail, config)
    except Exception as exc:
        if _is_unavailable(exc) or not os.path.lexists(path) or attempt < config.import_.attempts:
            raise
        LOGGER.error("giving up on %s after %d attempts", to_text(rel), attempt, exc_info=True)
        detail = f"{type(exc).__name__}: {exc} (failed {attempt} times; see the log)"
        return _reject(path, rel, "error", detail, config)


def _ingest(path: Path, rel: str, config: Config):
    node, creator = config.import_.node, config.import_.creator
    link = config.archive.on_success == "delete"  # the source's name goes: the archive may keep its inode
    with stage.prepare(str(path), config.archive.dir, link) as staged:
        info, stored = staged.info, staged.stored
        try:
            if staged.changed:
                raise NotReady("the file changed while it was being imported")
            if info.is_dicomdir:
                catalog.record_event("dicomdir", rel, node, info.sop_instance_uid or None,
                                     detail="a DICOMDIR: the index of a disc, not an instance")
                outcome = Outcome("dicomdir", rel, info.sop_instance_uid or None)
            else:
                result = yield catalog.InstanceRecord(info, stored, rel, creator, node)
                outcome = Outcome(result, rel, info.sop_instance_uid, stored.sha256)
        except (Rejected, NotReady):
            _discard(stored, config)
            raise
        if outcome.outcome == "duplicate":  # the bytes are in the archive under the first import's day
            _discard(stored, config)
        dispose.remove_source(path, rel, config.archive.on_success, config.archive.done_dir)
    return outcome


def _discard(stored, config: Config) -> None:
    """Remove an original we just stored that no row points at (a conflict, a duplicate)."""
    if stored is not None and not catalog.is_referenced(stored.relpath):
        archive.remove(config.archive.dir, stored)


def _reject(path, rel: str, reason: str, detail: str, config: Config) -> Outcome:
    """Record the rejection, then move the file to the rejected folder; never delete it."""
    sha256, size = _fingerprint(path)
    dest = dispose.free_path(config.archive.rejected_dir, rel)
    catalog.record_rejection(rel, reason, detail, dest, sha256, size, config.import_.node)
    try:
        dispose.move(Path(path), dest)
    except OSError:
        if not os.path.lexists(dest):  # (if it is there, another node moved it: its row stays)
            catalog.forget_rejection(dest)
        raise
    return Outcome("rejected", rel, sha256=sha256, reason=reason, detail=detail)


def _fingerprint(path):
    """sha256 and size of a regular file we can read; (None, None) otherwise."""
    try:
        st = os.lstat(path)
        if not stat.S_ISREG(st.st_mode):
            return None, None
        return archive.sha256_of(path), st.st_size
    except OSError:
        return None, None


def _is_unavailable(exc: BaseException) -> bool:
    """Trouble that is not the file's fault: wait and try again, leave the file alone."""
    if isinstance(exc, Unavailable):
        return True
    if isinstance(exc, (peewee.OperationalError, peewee.InterfaceError)):
        return True
    return isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EROFS)


def _timed(outcome: Outcome, started: float) -> Outcome:
    ms = (time.monotonic() - started) * 1000
    return Outcome(outcome.outcome, to_text(outcome.source), outcome.sop_instance_uid, outcome.sha256,
                   outcome.reason, outcome.detail, round(ms, 1))


def _log(o: Outcome) -> None:
    if o.outcome in ("pending", "claimed"):
        LOGGER.debug("%s %s: %s", o.outcome, o.source, o.detail)
        return
    if o.outcome == "retry":
        return
    level = logging.WARNING if o.outcome == "rejected" else logging.INFO
    LOGGER.log(level, "%s %r uid=%s%s %.1f ms", o.outcome, o.source, o.sop_instance_uid or "-",
               f" reason={o.reason} ({o.detail})" if o.reason else "", o.ms)
