"""Discs: a DICOMDIR is the manifest of the disc it came on; did every file it lists arrive?

A DICOMDIR is kept like an original (watcher/pipeline.py) and its Disc row lists the
files its directory records reference, as paths relative to the drop folder. Whether
they arrived is worked out when asked, never by updating rows on every import: a
referenced file has arrived when it has an outcome (an instance, a rejection or a
history line with its source), is *waiting* while it is still in the drop folder, and
is *missing* otherwise. Copies change case (IMG0001, img0001) and some copiers add an
extension (IM000001.dcm) or keep the ISO 9660 version (IM000001;1): names are matched
on all three.

A disc copy that stopped half-way (an autorun copy, a pulled USB stick) is reported once
at WARNING when files are still missing ``incomplete_seconds`` after its DICOMDIR came.
"""

import datetime
import json
import logging
import os
import posixpath
import re
from dataclasses import dataclass
from pathlib import Path

import peewee
from pydicom import dcmread

from . import detect
from .errors import Rejected
from .models import Disc, Event, Instance, Rejection, reset_connection, utcnow
from .names import from_text, to_text

LOGGER = logging.getLogger(__name__)
SHOWN = 10  # missing paths named in the WARNING
_VERSION = re.compile(r";\d*$")


@dataclass(frozen=True)
class Arrival:
    referenced: list  # paths relative to the drop folder
    arrived: list
    waiting: list  # no outcome yet, but still in the drop folder
    missing: list

    @property
    def complete(self) -> bool:
        return not (self.waiting or self.missing)


def references(dicomdir: Path, rel: str) -> tuple:
    """The files the DICOMDIR at ``dicomdir`` (which came in as ``rel``) lists, relative to the
    drop folder: its folder joined with each record's Referenced File ID."""
    try:
        records = dcmread(dicomdir, stop_before_pixels=True).DirectoryRecordSequence
    except OSError:
        raise  # the archive's trouble, not the file's (pipeline.py decides what it means)
    except Exception as exc:
        raise Rejected("malformed", f"a DICOMDIR whose directory records cannot be read: "
                                    f"{type(exc).__name__}: {exc}") from exc
    folder, found = posixpath.dirname(rel), {}
    for record in records:
        file_id = record.get("ReferencedFileID")  # a value: a str, or a MultiValue of components
        if not file_id:
            continue
        parts = [file_id] if isinstance(file_id, str) else list(file_id)
        parts = [str(p).strip().strip("/\\") for p in parts if p]  # never an absolute path
        parts = [p for p in parts if p]
        if parts:
            found[posixpath.join(folder, *parts)] = None
    return tuple(found)


def arrival(disc: Disc, drop_dir: Path) -> Arrival:
    referenced = json.loads(disc.referenced)
    folders = _folders(disc)
    seen = set().union(*(_outcomes(f) for f in folders))
    present = set().union(*(_present(drop_dir, f) for f in folders))
    own = _prefix(posixpath.dirname(disc.source))
    arrived, waiting, missing = [], [], []
    for path in referenced:
        key = _key(path[len(own):])
        (arrived if key in seen else waiting if key in present else missing).append(path)
    return Arrival(referenced, arrived, waiting, missing)


def report(config) -> list[dict]:
    """Every disc, oldest first, with what of it arrived (``dicom-watcher discs``)."""
    rows = []
    if not config.watches:
        return rows  # (discs come through a drop folder)
    for disc in Disc.select().order_by(Disc.arrived_at, Disc.id):
        a = arrival(disc, config.watch.drop_dir)
        rows.append({"source": disc.source, "sha256": disc.sha256, "arrived_at": _iso(disc.arrived_at),
                     "stored_path": str(config.archive.dir / disc.stored_path), "node": disc.node,
                     "referenced": len(a.referenced), "arrived": len(a.arrived), "waiting": a.waiting,
                     "missing": a.missing, "complete": a.complete, "warned_at": _iso(disc.warned_at)})
    return rows


def warn_incomplete(config, node: str) -> int:
    """Log one WARNING for each disc of ``node`` still missing files ``incomplete_seconds``
    after its DICOMDIR came (and not warned about yet); how many were warned about.

    Files still waiting in the drop folder are not missing: such a disc is looked at again;
    a complete one is not (``complete_at``).
    Run periodically by the service; a database away is the service's outage to report.
    """
    try:
        return _warn(config, node)
    except (peewee.OperationalError, peewee.InterfaceError) as exc:
        LOGGER.debug("disc check skipped: %s", exc)
        reset_connection()
        return 0


def _warn(config, node: str) -> int:
    after = config.watch.incomplete_seconds
    due = utcnow() - datetime.timedelta(seconds=after)
    warned = 0
    for disc in Disc.select().where((Disc.node == node) & Disc.warned_at.is_null()
                                    & Disc.complete_at.is_null() & (Disc.arrived_at <= due)):
        a = arrival(disc, config.watch.drop_dir)
        if a.complete:
            Disc.update(complete_at=utcnow()).where(Disc.id == disc.id).execute()
        if not a.missing:
            continue
        taken = (Disc.update(warned_at=utcnow())
                 .where((Disc.id == disc.id) & Disc.warned_at.is_null()).execute())
        if not taken:  # another process warned meanwhile
            continue
        more = f" (and {len(a.missing) - SHOWN} more)" if len(a.missing) > SHOWN else ""
        LOGGER.warning("incomplete disc copy %r: %d of its %d files have not arrived %.0f s after its "
                       "DICOMDIR: %s%s; copy them again into the drop folder (see `dicom-watcher discs`)",
                       disc.source, len(a.missing), len(a.referenced), after,
                       ", ".join(a.missing[:SHOWN]), more)
        warned += 1
    return warned


def _folders(disc: Disc) -> set:
    """Every folder the same DICOMDIR came in (a disc copied again goes to a new folder)."""
    sources = (Event.select(Event.source)
               .where((Event.sha256 == disc.sha256) & Event.outcome.in_(("dicomdir", "duplicate"))))
    return {posixpath.dirname(disc.source)} | {posixpath.dirname(s) for (s,) in sources.tuples()}


def _outcomes(folder: str) -> set:
    """The match keys of every file below ``folder`` that has an outcome."""
    prefix, keys = _prefix(folder), set()
    for model in (Instance, Rejection, Event):
        query = model.select(model.source).distinct()
        if prefix:
            query = query.where(peewee.fn.LOWER(model.source).startswith(prefix.lower()))
        for (source,) in query.tuples().iterator():
            if source.lower().startswith(prefix.lower()):
                keys.update(_keys(source[len(prefix):]))
    return keys


def _present(drop_dir: Path, folder: str) -> set:
    """The match keys of the files still in the drop folder below ``folder``."""
    prefix, keys = _prefix(folder), set()
    for path, _ in detect.scan(drop_dir, (), under=from_text(folder)):
        keys.update(_keys(to_text(os.path.relpath(path, drop_dir))[len(prefix):]))
    return keys


def _prefix(folder: str) -> str:
    return f"{folder}/" if folder else ""


def _key(path: str) -> str:
    return _VERSION.sub("", path).rstrip(".").lower()


def _keys(path: str) -> set:
    """A file's name as referenced, without an extension a copier added."""
    key = _key(path)
    stem, ext = posixpath.splitext(key)
    return {key, stem} if ext else {key}


def _iso(t) -> str | None:
    return None if t is None else t.replace(tzinfo=datetime.timezone.utc).isoformat()
