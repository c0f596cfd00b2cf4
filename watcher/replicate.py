"""Replication: pull studies from another archive over DICOMweb into the Import database.

The source is a DICOMweb root (an Orthanc's ``…/dicom-web/``, another dicom-watcher's
``…/dicom-web/<database>/``, a dcm4chee). QIDO-RS lists its studies and their instances;
each instance not stored here yet is fetched with WADO-RS as stored there
(``transfer-syntax=*``), streamed into a file on the archive's file system, and handed to the
one ingest path (``pipeline.ingest_object``) with a ``replication`` origin. A few fetches run
at once; at most ``AHEAD`` fetched objects wait on disk for the ingest, so memory and disk stay
flat whatever the study's size.

Running it again (after a crash, a kill, a network cut) fetches only what is missing: an
instance is "already present" when its SOP Instance UID is in the target database (or still
in import, where a replication that died before ``--to`` moved it left it). When the source
is a dicom-watcher, its API gives each original's sha256: a fetched object with other bytes is
not stored, and counted as failed.
"""

import collections
import contextlib
import dataclasses
import datetime
import getpass
import logging
import os
import re
import shutil
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx

from . import archive
from .config import Config
from .models import IMPORT, IMPORT_ID, Event, Instance, utcnow
from .multipart import CHUNK, BadBody, PartsToFiles, boundary_of
from .origin import from_replication
from .pipeline import ingest_object, is_unavailable
from .studies import databases
from .studies.distribute import distribute

LOGGER = logging.getLogger(__name__)
ACCEPT = 'multipart/related; type="application/dicom"; transfer-syntax=*'
WORKERS = 4  # fetches at once
AHEAD = 2 * WORKERS  # fetched objects waiting on disk for the ingest, at most
PAGE = 1000  # QIDO-RS results asked for at a time
TIMEOUT = httpx.Timeout(30.0, connect=10.0)
STUDY, SERIES, SOP = "0020000D", "0020000E", "00080018"
_WATCHER_ROOT = re.compile(r"^(?P<site>.*)/dicom-web/(?P<db>[^/]+)/$")


class SourceError(Exception):
    """The source cannot be reached, or answered something we cannot use; the message says
    which URL and what happened."""


@dataclasses.dataclass(frozen=True)
class Listed:
    """One instance as the source lists it."""
    study: str
    series: str
    sop: str


@dataclasses.dataclass
class StudyReport:
    study_instance_uid: str
    listed: int = 0
    stored: int = 0
    present: int = 0  # here already (not fetched)
    failed: int = 0
    bytes: int = 0  # of the originals stored now
    errors: list = dataclasses.field(default_factory=list)  # what went wrong, a line each

    @property
    def complete(self) -> bool:
        return not self.errors and not self.failed and self.stored + self.present == self.listed

    def as_dict(self) -> dict:
        return dataclasses.asdict(self) | {"complete": self.complete}


def root_of(url: str) -> str:
    """The DICOMweb root with exactly one trailing slash."""
    url = url.strip()
    if not url.startswith(("http://", "https://")):
        raise SourceError(f"{url!r} is not an http:// or https:// URL of a DICOMweb root")
    return url.rstrip("/") + "/"


def os_user() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return f"uid {os.getuid()}"


class Source:
    """The archive we replicate from, over one HTTP client (thread-safe: fetches share it)."""

    def __init__(self, url: str, token: str | None = None):
        self.root = root_of(url)
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self.client = httpx.Client(headers=headers, timeout=TIMEOUT, follow_redirects=True)

    @property
    def name(self) -> str:
        """The root as recorded (origin, history): without a user name or password in it."""
        return str(httpx.URL(self.root).copy_with(username=None, password=None))

    def close(self) -> None:
        self.client.close()

    def studies(self, since: str = "") -> list[str]:
        """The Study Instance UIDs the source holds (with a study date from ``since`` on)."""
        params = {"StudyDate": f"{since}-"} if since else {}
        return [uid for row in self._search("studies", params) if (uid := _value(row, STUDY))]

    def has_study(self, study_uid: str) -> bool:
        return any(_value(row, STUDY) == study_uid
                   for row in self._search("studies", {"StudyInstanceUID": study_uid}))

    def instances(self, study_uid: str) -> list[Listed]:
        rows = self._search(f"studies/{study_uid}/instances", {})
        found = {}
        for row in rows:
            item = Listed(study_uid, _value(row, SERIES), _value(row, SOP))
            if not item.series or not item.sop:
                raise SourceError(f"{self.root}studies/{study_uid}/instances lists an instance "
                                  "without a Series or SOP Instance UID")
            found[item.sop] = item
        return list(found.values())

    def checksums(self, study_uid: str) -> dict[str, str] | None:
        """{SOP Instance UID: sha256} from a dicom-watcher source's API; None from any other
        source, or when its API does not answer (then nothing is checked)."""
        match = _WATCHER_ROOT.match(self.root)
        if match is None:
            return None
        url = f"{match['site']}/api/databases/{match['db']}/studies/{study_uid}/instances"
        try:
            answer = self.client.get(url, headers={"Accept": "application/json"})
            rows = answer.json() if answer.status_code == 200 else None
        except (httpx.HTTPError, ValueError):
            rows = None
        if not isinstance(rows, list):
            LOGGER.info("%s gives no checksums: replicated originals are not compared", url)
            return None
        return {r["sop_instance_uid"]: r["sha256"] for r in rows
                if isinstance(r, dict) and r.get("sop_instance_uid") and r.get("sha256")}

    def fetch(self, item: Listed, folder: Path) -> Path:
        """WADO-RS: the original, streamed into a new file in ``folder``; its path."""
        url = f"{self.root}studies/{item.study}/series/{item.series}/instances/{item.sop}"
        try:
            with self.client.stream("GET", url, headers={"Accept": ACCEPT}) as answer:
                if answer.status_code != 200:
                    raise SourceError(f"GET {url}: HTTP {answer.status_code}")
                parts = PartsToFiles(folder, boundary_of(answer.headers.get("content-type", "")),
                                     prefix="wado", max_parts=1, max_bytes=room_for_one(folder))
                try:
                    for chunk in answer.iter_bytes(CHUNK):
                        parts.feed(chunk)
                    files = parts.close()
                    if len(files) != 1 or files[0].content_type != "application/dicom":
                        raise SourceError(f"GET {url}: {len(files)} parts, not one application/dicom")
                except BaseException:
                    parts.abandon()
                    raise
        except BadBody as exc:
            raise SourceError(f"GET {url}: {exc}") from None
        except httpx.HTTPError as exc:
            raise SourceError(f"GET {url}: {_http_error(exc)}") from None
        return files[0].path

    def _search(self, path: str, params: dict) -> list[dict]:
        """A QIDO-RS search, a page at a time: on while a page is full or the source warns of
        more (PS3.18 8.3.4.4); a source that ignores limit and offset is read once."""
        url, rows, seen, offset = self.root + path, [], set(), 0
        while True:
            page, more = self._get_json(url, params | {"limit": PAGE, "offset": offset})
            new = [r for r in page if _key(r) not in seen]
            seen.update(_key(r) for r in new)
            rows.extend(new)
            if not new or (len(page) < PAGE and not more):
                return rows
            offset += len(page)

    def _get_json(self, url: str, params: dict) -> tuple[list, bool]:
        """The datasets of one QIDO-RS answer, and whether the source says there are more."""
        try:
            answer = self.client.get(url, params=params, headers={"Accept": "application/dicom+json"})
        except httpx.HTTPError as exc:
            raise SourceError(f"cannot reach {url}: {_http_error(exc)}") from None
        if answer.status_code == 204:
            return [], False
        if answer.status_code in (401, 403):
            raise SourceError(f"GET {url}: HTTP {answer.status_code} (give a valid --token)")
        if answer.status_code != 200:
            raise SourceError(f"GET {url}: HTTP {answer.status_code}")
        try:
            rows = answer.json()
        except ValueError:
            raise SourceError(f"GET {url}: not DICOM JSON (is it a DICOMweb root?)") from None
        if not isinstance(rows, list):
            raise SourceError(f"GET {url}: not a list of DICOM JSON datasets")
        more = "additional results" in answer.headers.get("warning", "").lower()
        return [r for r in rows if isinstance(r, dict)], more


MAX_OBJECT_BYTES = 16 << 30  # more than any original we expect (a DICOM length field is 32-bit)


def room_for_one(folder: Path) -> int:
    """The most one fetched object may take: a source that streams without end is cut off
    before the archive's disk is full."""
    return min(MAX_OBJECT_BYTES, archive.room(folder))


def _value(row: dict, tag: str) -> str:
    values = (row.get(tag) or {}).get("Value") or [""]
    return str(values[0]).strip()


def _key(row: dict) -> tuple:
    return tuple(_value(row, tag) for tag in (STUDY, SERIES, SOP))


def _http_error(exc: httpx.HTTPError) -> str:
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__


def incoming_folder(config: Config) -> Path:
    """Where this process's fetched objects wait for the ingest: the archive's file system,
    so that the archive takes their inodes. The folders of dead replications are removed."""
    base = config.archive.dir / archive.INCOMING
    prefix = f"replicate-{config.import_.node.replace('/', '_')}-"
    if base.is_dir():
        for old in base.glob(prefix + "*"):
            pid = old.name[len(prefix):]
            if pid.isdigit() and not archive.is_alive(int(pid)):
                shutil.rmtree(old, ignore_errors=True)
    folder = base / f"{prefix}{os.getpid()}"
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def stored_here(sop_uids: list[str], database_ids: list[int]) -> dict[str, str]:
    """{SOP Instance UID: sha256} of those held in these databases."""
    found = {}
    for i in range(0, len(sop_uids), 500):
        query = (Instance.select(Instance.sop_instance_uid, Instance.sha256)
                 .where(Instance.database_id.in_(database_ids),
                        Instance.sop_instance_uid.in_(sop_uids[i:i + 500])).tuples())
        found.update(query)
    return found


@dataclasses.dataclass
class Replication:
    """One run: a source, where the studies go, who asked, and the folder objects wait in."""
    config: Config
    source: Source
    to: str = IMPORT
    actor: str = ""
    folder: Path | None = None
    pool: ThreadPoolExecutor | None = None
    stopping: threading.Event | None = None

    def study(self, study_uid: str) -> StudyReport:
        """Fetch and ingest what of one study is missing here; move it on ``to``; record it."""
        report = StudyReport(study_uid)
        try:
            listed = self.source.instances(study_uid)
        except SourceError as exc:
            report.errors.append(str(exc))
            return report
        report.listed = len(listed)
        sums = self.source.checksums(study_uid) if listed else None
        here = stored_here([i.sop for i in listed], self._database_ids())
        missing = []
        for item in listed:
            if item.sop not in here:
                missing.append(item)
            elif sums and sums.get(item.sop, here[item.sop]) != here[item.sop]:
                self._fail(report, item, "stored here with other bytes than the source's (a "
                                         "conflict: decide which is right)")
            else:
                report.present += 1
        with contextlib.closing(self._fetched(missing)) as fetching:
            for item, fetched in fetching:
                self._ingest(report, item, fetched, sums)
                if self.stopping is not None and self.stopping.is_set():
                    report.errors.append("stopped before the study was complete")
                    break
        if report.stored or report.failed:
            self._record(report)
        if self.to != IMPORT and (report.stored or report.present):
            self._move(report)
        LOGGER.info("replicated study %s from %s: listed %d, stored %d, already present %d, "
                    "failed %d", study_uid, self.source.name, report.listed, report.stored,
                    report.present, report.failed)
        return report

    def _database_ids(self) -> list[int]:
        return sorted({IMPORT_ID, databases.get(self.to).id})

    def _fetched(self, items: list[Listed]):
        """(item, path or SourceError) in order; a few fetches run at once, and at most
        ``AHEAD`` fetched objects wait for the caller. What is left when the caller stops
        (an outage, a signal) is cancelled, or removed once fetched."""
        pending = collections.deque()
        try:
            for item in items:
                pending.append((item, self.pool.submit(self.source.fetch, item, self.folder)))
                if len(pending) >= AHEAD:
                    yield _result(*pending.popleft())
            while pending:
                yield _result(*pending.popleft())
        finally:
            for _, future in pending:
                future.cancel()
            for _, future in pending:
                if not future.cancelled() and future.exception() is None:
                    future.result().unlink(missing_ok=True)

    def _ingest(self, report: StudyReport, item: Listed, fetched, sums) -> None:
        if isinstance(fetched, Exception):
            return self._fail(report, item, str(fetched))
        try:
            size = fetched.stat().st_size
            if sums and item.sop in sums and archive.sha256_of(fetched) != sums[item.sop]:
                return self._fail(report, item, "the bytes received differ from the source's "
                                                "original (sha256): not stored")
            origin = from_replication(self.actor, self.source.name)
            outcome = ingest_object(fetched, origin, self.config, sop_instance_uid=item.sop,
                                    study_uid=item.study)
        except Exception as exc:
            if is_unavailable(exc):
                raise  # the archive or the database: nothing more can be stored now
            LOGGER.exception("replication of %s: ingest failed", item.sop)
            return self._fail(report, item, f"{type(exc).__name__}: {exc}")
        finally:
            fetched.unlink(missing_ok=True)  # (the archive has its inode, or rejected_dir a copy)
        if outcome.outcome == "imported":
            report.stored += 1
            report.bytes += size
        elif outcome.outcome == "duplicate":
            report.present += 1
        else:
            self._fail(report, item, f"{outcome.outcome}"
                       + (f" as {outcome.reason}: {outcome.detail}" if outcome.reason else
                          f": {outcome.detail}" if outcome.detail else ""))

    @staticmethod
    def _fail(report: StudyReport, item: Listed, why: str) -> None:
        report.failed += 1
        report.errors.append(f"{item.sop}: {why}")
        LOGGER.warning("replication of %s (study %s) failed: %s", item.sop, item.study, why)

    def _record(self, report: StudyReport) -> None:
        """The study's line in the history."""
        detail = (f"{report.stored} instances ({report.bytes} bytes) from {self.source.name} by "
                  f"{self.actor}: listed {report.listed}, stored {report.stored}, already present "
                  f"{report.present}, failed {report.failed}")
        Event.insert(outcome="replicated", source=report.study_instance_uid, detail=detail,
                     node=self.config.import_.node, at=utcnow(), database_name=IMPORT,
                     actor=self.actor).execute()

    def _move(self, report: StudyReport) -> None:
        try:
            moved = distribute([report.study_instance_uid], to=self.to, actor=self.actor)
        except Exception as exc:  # (Refused: the study is neither in import nor in the target)
            report.errors.append(f"not moved to {self.to}: {exc}")
            return
        if moved["conflicts"]:
            report.errors.append(f"{moved['conflicts']} instances not moved to {self.to}: it "
                                 "holds other bytes under their SOP Instance UIDs")


def _result(item: Listed, future):
    try:
        return item, future.result()
    except SourceError as exc:
        return item, exc


def replicate(config: Config, url: str, token: str | None = None, studies=(), since: str = "",
              to: str = IMPORT, actor: str = "", workers: int = WORKERS,
              stopping: threading.Event | None = None) -> list[StudyReport]:
    """Replicate ``studies`` (Study Instance UIDs; none: every study, with a date from ``since``
    on, YYYYMMDD) from the DICOMweb root ``url`` into import, then move them into ``to``.
    A report per study. ``SourceError`` when the source cannot be listed at all; an outage of
    the archive or the database (``Unavailable``, ``OSError``, peewee's errors) stops the run.
    ``stopping``: once set, no more is fetched (what was fetched is ingested or removed)."""
    databases.get(to)  # Refused before anything is fetched
    source = Source(url, token)
    folder = None
    try:
        uids = _selected(source, studies, since)
        folder = incoming_folder(config)
        with ThreadPoolExecutor(max_workers=max(1, workers), thread_name_prefix="replicate") as pool:
            run = Replication(config, source, to, actor or os_user(), folder, pool, stopping)
            reports = []
            for uid, wanted in uids:
                if stopping is not None and stopping.is_set():
                    break
                reports.append(run.study(uid) if uid else _not_found(wanted))
            return reports
    finally:
        source.close()
        if folder is not None:
            shutil.rmtree(folder, ignore_errors=True)


def _selected(source: Source, studies, since: str) -> list[tuple[str, str]]:
    """(uid, asked-for uid) of each study to replicate; uid empty when the source lacks it."""
    if not studies:
        return [(uid, uid) for uid in dict.fromkeys(source.studies(since))]
    wanted = list(dict.fromkeys(s.strip() for s in studies if s.strip()))
    return [(uid if source.has_study(uid) else "", uid) for uid in wanted]


def _not_found(study_uid: str) -> StudyReport:
    return StudyReport(study_uid, errors=["the source holds no such study"])


def since_date(text: str) -> str:
    """YYYYMMDD from YYYYMMDD or YYYY-MM-DD; ``ValueError`` otherwise."""
    for form in ("%Y%m%d", "%Y-%m-%d"):
        try:
            return datetime.datetime.strptime(text.strip(), form).strftime("%Y%m%d")
        except ValueError:
            continue
    raise ValueError(f"{text!r} is not a date (YYYY-MM-DD or YYYYMMDD)")
