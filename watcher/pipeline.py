"""One file through the stages: open, validate, store, record, dispose.

``ingest`` is the only place that decides what an exception means for a file:
``Rejected`` moves it to the rejected folder, ``NotReady`` leaves it for later
(or rejects it once it has stayed incomplete long enough), a vanished file
is noted, trouble with the archive disk or the database (``Unavailable``)
stops the caller without touching the file, and anything else is retried a
few times before the file is rejected as ``error``.
"""

import contextlib
import dataclasses
import logging
import os
import time
from pathlib import Path

from . import archive, beneath, catalog, claims, discs, dispose, models, stage, timings
from .commit import commit_all, commit_now
from .config import Config
from .errors import Busy, CannotDispose, NotReady, Rejected, Unavailable
from .names import to_text
from .outcome import Outcome, is_timed, is_unavailable
from .source import Source
from .validate import validate

LOGGER = logging.getLogger(__name__)


def ingest(path: Path, config: Config, final: bool = False, attempt: int = 1,
           commit=commit_now) -> Outcome:
    """Import one file of the drop folder.

    ``final``: the file has not changed for ``incomplete_seconds``, so if it is
    still incomplete it never will be complete: reject it.
    ``attempt``: how many times an unexpected error has been met for it so far, plus one.
    ``commit``: writes its instance record durably and returns "imported" or "duplicate"
    (``commit_now``); ``ingest_together`` commits many files' records at once instead.
    """
    with archive.storing(config.archive.dir):
        return _ingest_one(ingesting(path, config, final, attempt), commit)


def _ingest_one(steps, commit) -> Outcome:
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
    with archive.storing(config.archive.dir):  # no repair runs between a store and its commit
        return together([ingesting(path, config, final, attempt) for path, final, attempt in files])


def together(steps: list, caught: tuple = (Unavailable,)) -> list:
    """Run each generator of ``steps`` (``ingesting``, ``ingesting_object``) to its record,
    commit those records in one transaction, and on to their outcomes; in order, each one's
    Outcome, or the exception of ``caught`` that stopped it."""
    results: list = [None] * len(steps)
    waiting: list = []  # (index, steps, record): stored, waiting for the commit
    for i, one in enumerate(steps):
        results[i] = _advance(one, i, waiting, caught=caught)
    while waiting:
        batch, waiting = waiting, []
        for (i, one, _), result in zip(batch, commit_all([record for _, _, record in batch])):
            results[i] = _advance(one, i, waiting, result, caught)
    return results


_START = object()


def _advance(steps, i: int, waiting: list, result=_START, caught: tuple = (Unavailable,)):
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
    except caught as exc:
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
                outcome = yield from _decide(rel, config, final, attempt)
            else:
                outcome = Outcome("claimed", rel, detail="another node is importing it")
    except CannotDispose as exc:
        outcome = Outcome("pending", rel, detail=str(exc), undisposed=str(exc), waiting="cannot-dispose")
    except Exception as exc:  # the decision itself could not be carried out
        if is_unavailable(exc):
            raise Unavailable(str(exc)) from exc
        if not beneath.lexists(config.watch.drop_dir, rel):
            outcome = Outcome("vanished", rel, detail="removed by someone else before it was imported")
        else:
            LOGGER.warning("retry %s: %s: %s", to_text(rel), type(exc).__name__, exc, exc_info=attempt == 1)
            outcome = Outcome("retry", rel, detail=f"{type(exc).__name__}: {exc}")
    outcome = _timed(outcome, started)
    _log(outcome)
    return outcome


def _decide(rel: str, config: Config, final: bool, attempt: int):
    try:
        source = Source(config.watch.drop_dir, rel)
    except Busy as exc:
        return Outcome("pending", rel, detail=exc.detail, waiting=exc.state)
    except Rejected as exc:  # a link, a FIFO, a file we may not read: moved as it is
        return _reject(None, rel, exc.reason, exc.detail, config)
    except (FileNotFoundError, IsADirectoryError, beneath.Outside):
        return Outcome("vanished", rel, detail="removed, replaced by a folder, or its folder replaced, "
                                               "before it was imported")
    with source:
        try:
            return (yield from _ingest(source, rel, config))
        except Rejected as exc:
            return _reject(source, rel, exc.reason, exc.detail, config)
        except NotReady as exc:
            if isinstance(exc, Busy):
                return Outcome("pending", rel, detail=exc.detail, waiting=exc.state)
            if not final:
                return Outcome("pending", rel, detail=exc.detail, waiting="incomplete")
            detail = f"{exc.detail}; it has not changed since"
            return _reject(source, rel, exc.reason, detail, config)
        except Exception as exc:
            if (is_unavailable(exc) or isinstance(exc, CannotDispose)
                    or not beneath.lexists(config.watch.drop_dir, rel) or attempt < config.import_.attempts):
                raise
            LOGGER.error("giving up on %s after %d attempts", to_text(rel), attempt, exc_info=True)
            detail = f"{type(exc).__name__}: {exc} (failed {attempt} times; see the log)"
            return _reject(source, rel, "error", detail, config)


def _ingest(source: Source, rel: str, config: Config):
    node, creator = config.import_.node, config.import_.creator
    # The archive may take the source's own inode (no bytes copied) only when removing it, and
    # only with one node per database: a capture left by a killed process is put back when
    # that node starts again, and another node sharing the folder would never see it.
    share = None
    if config.archive.on_success == "delete" and not models.is_shared():
        share = lambda: dispose.capture(source)  # noqa: E731
    staged = stage.prepare(source, config.archive.dir, share)
    info, stored = staged.info, staged.stored
    if stored is not None:
        LOGGER.debug("%s: valid %s, stored as %s (%d bytes); recording it", to_text(rel),
                     "DICOMDIR" if info.is_dicomdir else info.sop_instance_uid, stored.relpath, source.size)
    try:
        if staged.changed:
            raise Busy("the file changed while it was being imported: looking again when it is quiet",
                       state="changing")
        if info.is_dicomdir:  # kept like an original; never an instance; the manifest of its disc
            listed = discs.references(config.archive.dir / stored.relpath, to_text(rel))
            record = catalog.DiscRecord(stored, rel, listed, node, info.sop_instance_uid or None)
        else:
            record = catalog.InstanceRecord(info, stored, rel, creator, node)
        result = yield record
        outcome = Outcome(result, rel, info.sop_instance_uid or None, stored.sha256)
    except (Rejected, NotReady):
        _discard(stored, config)
        _give_back(stored)
        raise
    except BaseException:  # the database went away, say: the file waits in its place
        with contextlib.suppress(Exception):  # (nothing can be asked of the database now)
            _discard(stored, config)
        _give_back(stored)
        raise
    if outcome.outcome == "duplicate":  # the bytes are in the archive under the first import's day
        _discard(stored, config)
    return _dispose(source, rel, outcome, config, stored)


def _give_back(stored) -> None:
    """A captured source whose import did not complete gets its name back."""
    if stored is not None and stored.captured is not None:
        stored.captured.put_back()


def _dispose(source: Source, rel: str, outcome: Outcome, config: Config, stored=None) -> Outcome:
    """Remove (or move to done_dir) the version we recorded, and only that version."""
    a, drop = config.archive, config.watch.drop_dir
    captured = stored.captured if stored is not None else None
    try:
        if captured is not None and source.lease_broken():
            # Out of sight since before it was stored, yet a writer reached the inode (one that
            # had found it by name an instant before, or through /proc): the archive takes a
            # copy of its own while the writer still waits, and the file goes back to its name.
            archive.unshare(source, a.dir, stored)
            captured.put_back()
            gone = False
        elif captured is not None and not source.folder_in_place():
            # Its folder was moved out of ours after the capture: the file gets its name back
            # there, untouched, and the archive a copy of its own (no inode shared with a file
            # anyone can write).
            archive.unshare(source, a.dir, stored)
            captured.put_back()
            return outcome
        elif captured is not None:
            captured.remove()
            gone = True
        elif a.on_success == "move":
            dispose.transfer(drop, rel, a.done_dir, source)
            gone = True
        else:
            gone = dispose.remove(source)
    except (FileNotFoundError, beneath.Outside):
        return outcome  # moved away by someone after we read it: nothing of ours is left there
    except OSError as exc:
        error = f"cannot {'move' if a.on_success == 'move' else 'remove'} it: {exc.strerror or exc}"
        return dataclasses.replace(outcome, undisposed=error)
    if not gone:
        return dataclasses.replace(outcome, again=True, detail=(
            "another version took its name (or a writer waits for it): that one is looked at next"))
    return outcome


def dispose_recorded(path: Path, config: Config, outcome: Outcome) -> Outcome:
    """Try again to remove (or move) a file whose outcome is recorded already."""
    rel = os.path.relpath(path, config.watch.drop_dir)
    clean = dataclasses.replace(outcome, undisposed="", again=False)
    try:
        with Source(config.watch.drop_dir, rel) as source:
            return _dispose(source, rel, clean, config)
    except Busy:
        return dataclasses.replace(clean, again=True)
    except (FileNotFoundError, beneath.Outside, Rejected):
        return clean


def _discard(stored, config: Config) -> None:
    """Remove an original we just stored that no row points at (a conflict, a duplicate)."""
    if stored is not None and not catalog.is_referenced(stored.relpath):
        archive.remove(config.archive.dir, stored)


def ingest_object(path: Path, origin, config: Config, sop_class_uid: str = "",
                  sop_instance_uid: str = "", study_uid: str | None = None,
                  refused: Rejected | None = None) -> Outcome:
    """An object that arrived whole and is ours alone (a C-STORE's dataset, written by the
    receiver into the archive's folder for incoming objects), through the same stages as a
    dropped file: validate, store, record. The caller acknowledges it only if the outcome is
    ``imported`` or ``duplicate``: then the original is durable and its row committed. A
    rejected object is kept in ``rejected_dir/<label>``, with its row; a database or disk
    outage raises (the object is not kept: its sender still has it and was not told success).
    ``sop_class_uid`` / ``sop_instance_uid``: what the sender said it was sending;
    ``study_uid``: the study it said the object belongs to (an upload to one study);
    ``refused``: the intake refuses it already (kept as rejected, with that reason).
    """
    # (no repair runs between the store and the commit: it would take the original for an orphan)
    with archive.storing(config.archive.dir):
        return _ingest_one(ingesting_object(path, origin, config, sop_class_uid, sop_instance_uid,
                                            study_uid, refused), commit_now)


def ingest_objects(objects: list[dict], config: Config) -> list:
    """``ingest_object`` for many objects (each a dict of its arguments), their rows committed
    in one transaction; in order, each one's Outcome or the exception that stopped it."""
    with archive.storing(config.archive.dir):  # (one syncfs for the batch: archive.make_durable)
        return together([ingesting_object(config=config, sync=False, **one) for one in objects],
                        caught=(Exception,))


def ingesting_object(path: Path, origin, config: Config, sop_class_uid: str = "",
                     sop_instance_uid: str = "", study_uid: str | None = None,
                     refused: Rejected | None = None, digests: tuple[str, str] | None = None,
                     sync: bool = True):
    """The stages of ``ingest_object`` as a generator, as ``ingesting`` is ``ingest``'s.
    ``digests``: the object's (sha256, xxh3), computed as its bytes were written; ``sync``:
    see ``archive.store_original`` (the commit makes it durable)."""
    started = time.monotonic()
    label = origin.label(sop_instance_uid or path.name)
    info = stored = None
    with Source(path.parent, path.name, lease=False, private=True,
                read_whole=digests is None) as source:
        try:
            if refused is not None:
                raise refused
            info = validate(source)
            said = (sop_class_uid or info.sop_class_uid, sop_instance_uid or info.sop_instance_uid)
            if info.is_dicomdir or (info.sop_class_uid, info.sop_instance_uid) != said:
                raise Rejected("meta-mismatch", (
                    f"the dataset is {info.sop_class_uid} {info.sop_instance_uid}, but the sender "
                    f"said {said[0]} {said[1]}"))
            if study_uid is not None and info.study_instance_uid != study_uid:
                raise Rejected("meta-mismatch", (
                    f"the dataset belongs to study {info.study_instance_uid}, but it was sent to "
                    f"study {study_uid}"))
            stored = archive.store_original(source, config.archive.dir, capture=lambda: OWNED,
                                            known=digests, sync=sync)
            # A failed commit raises from the yield and leaves the original for ``verify
            # --repair``: another intake may be storing the same bytes under the same name
            # right now, its row not committed yet.
            result = yield catalog.InstanceRecord(info, stored, label, origin.creator,
                                                  config.import_.node, origin)
            if result == "duplicate":
                _discard(stored, config)
            outcome = Outcome(result, label, info.sop_instance_uid, stored.sha256,
                              sop_class_uid=info.sop_class_uid, study_uid=info.study_instance_uid)
        except Rejected as exc:
            _discard(stored, config)  # (a conflict, found at the commit: the archive keeps none of it)
            outcome = _reject(source, path.name, exc.reason, exc.detail, config, root=path.parent,
                              dest_rel=_safe_rel(label), recorded_as=label, intake=origin.kind)
            if info is not None:  # (what it was, for the intake's answer: a conflict, a mismatch)
                outcome = dataclasses.replace(outcome, sop_instance_uid=info.sop_instance_uid or None,
                                              sop_class_uid=info.sop_class_uid or None)
        except NotReady as exc:  # a dropped file may still grow; a whole message never will
            outcome = _reject(source, path.name, exc.reason, f"{exc.detail} (the whole message was received)",
                              config, root=path.parent, dest_rel=_safe_rel(label), recorded_as=label,
                              intake=origin.kind)
    outcome = _timed(outcome, started)
    _log(outcome)
    return outcome


class _Owned:
    """What the archive's zero-copy store asks to take out of sight: an object that only we
    can reach needs nothing (its writer, the receiver, has finished with it)."""

    def remove(self) -> None:
        pass

    def put_back(self) -> None:
        pass


OWNED = _Owned()


def _safe_rel(label: str) -> str:
    """A relative path below the rejected folder: no empty, '.' or '..' parts, no NUL."""
    parts = [p.replace("\0", "") for p in label.split("/")]
    return "/".join(p if p not in ("", ".", "..") else "_" for p in parts) + ".dcm"


def _reject(source: Source | None, rel: str, reason: str, detail: str, config: Config,
            root: Path | None = None, dest_rel: str | None = None,
            recorded_as: str | None = None, intake: str = "folder") -> Outcome:
    """Record the rejection, then move the file to the rejected folder; never delete it.

    The row names the free path the file is about to take; if that name is taken
    meanwhile, the row follows the file to the next one. If the move fails, the
    row and its history line go again and the file stays where it is.
    """
    sha256, size = (source.sha256(), source.size) if source is not None else (None, None)
    rejected_dir, node = config.archive.rejected_dir, config.import_.node
    ids = []

    def before(dest_rel: str) -> None:
        dest = rejected_dir / dest_rel
        if ids:
            catalog.move_rejection(ids[0], dest)
        else:
            ids.extend(catalog.record_rejection(recorded_as or rel, reason, detail, dest, sha256,
                                                size, node, intake))

    try:
        with dispose.one_at_a_time(config.archive.dir):
            dispose.transfer(root or config.watch.drop_dir, rel, rejected_dir, source, before,
                             dest_rel=dest_rel)
    except (FileNotFoundError, beneath.Outside):
        if ids:
            catalog.forget_rejection(*ids)
        return Outcome("vanished", rel, detail="moved away by someone else before it was rejected")
    except OSError as exc:
        if ids:
            catalog.forget_rejection(*ids)
        if is_unavailable(exc):
            raise
        raise CannotDispose(f"rejected as {reason}, but cannot move it to {rejected_dir}: "
                            f"{exc.strerror or exc}") from exc
    return Outcome("rejected", recorded_as or rel, sha256=sha256, reason=reason, detail=detail)


def _timed(outcome: Outcome, started: float) -> Outcome:
    ms = (time.monotonic() - started) * 1000
    return dataclasses.replace(outcome, source=to_text(outcome.source), ms=round(ms, 1))


def _log(o: Outcome) -> None:
    if o.outcome in ("pending", "claimed"):
        LOGGER.debug("%s %s: %s", o.outcome, o.source, o.detail)
        return
    if not is_timed(o):
        return
    timings.IMPORTS.observe(o.ms / 1000)
    level = logging.WARNING if o.outcome == "rejected" else logging.INFO
    LOGGER.log(level, "%s %r uid=%s%s %.1f ms", o.outcome, o.source, o.sop_instance_uid or "-",
               f" reason={o.reason} ({o.detail})" if o.reason else "", o.ms)
