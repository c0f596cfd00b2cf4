"""Replication: pull studies from another archive over DICOMweb into the Import database.

The source is a DICOMweb root (an Orthanc's ``…/dicom-web/``, another dicom-watcher's
``…/dicom-web/<database>/``, a dcm4chee). QIDO-RS lists its studies and their instances;
each instance not stored here yet is fetched with WADO-RS as stored there
(``transfer-syntax=*``), streamed into a file on the archive's file system (its sha256 and
xxh3 computed as it is written, and not again), and handed to the one ingest path
(``pipeline.ingest_objects``) with a ``replication`` origin. A series of which nothing is here
yet is fetched in one request (its parts are its instances); what such an answer lacks, and
every instance of a series that is here in part, is fetched one request an instance. A few
fetches run at once; at most ``AHEAD`` fetched objects wait on disk for the ingest (a fetch
that is further ahead waits before it reads on), so memory and disk stay flat whatever the
study's size. What has arrived is ingested together, one commit for all, by a process of its
own (``ingest_process``: the fetches' threads would otherwise hold up its every system call).

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
import json
import logging
import os
import queue
import re
import shutil
import threading
import urllib.parse
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import urllib3
from urllib3.util import make_headers, parse_url

from . import archive
from .config import Config
from .ingest_process import IngestProcess
from .models import IMPORT, IMPORT_ID, Event, Instance, utcnow
from .multipart import BadBody, PartsToFiles, boundary_of
from .origin import from_replication
from .outcome import is_unavailable
from .studies import databases
from .studies.distribute import distribute

LOGGER = logging.getLogger(__name__)
ACCEPT = 'multipart/related; type="application/dicom"; transfer-syntax=*'
WORKERS = 2  # fetches at once (4 was slower here: threads wait on one another for the GIL)
AHEAD = 32  # fetched objects waiting on disk for the ingest (and ingested together), at most
PAGE = 1000  # QIDO-RS results asked for at a time
TIMEOUT = urllib3.Timeout(connect=10.0, read=30.0)
# No retries (a run again resumes), but redirects are followed. An answer is read as it comes,
# up to 1 MiB at a time: in C, where httpx reads 64 KiB a Python call (twice the CPU, and the
# GIL handed to and fro between the fetches each time).
RETRIES = urllib3.Retry(total=None, connect=0, read=0, status=0, other=0, redirect=10)
READ_BYTES = 1 << 20
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
    unidentified: int = 0  # parts of a series' answer that failed before they said what they
    #                        are: kept as rejected (or not stored); what the series lacked
    #                        was asked for one by one (see the log for each)

    @property
    def complete(self) -> bool:
        return not self.errors and not self.failed and self.stored + self.present == self.listed

    def as_dict(self) -> dict:
        return dataclasses.asdict(self) | {"complete": self.complete}


def public_url(url: str) -> str:
    """A URL without a user name or password in it."""
    return parse_url(url)._replace(auth=None).url


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
        self._name = public_url(self.root)
        auth = parse_url(self.root).auth  # (user:password@ in the URL: basic auth)
        self.headers = ({"Authorization": f"Bearer {token}"} if token else
                        make_headers(basic_auth=urllib.parse.unquote(auth)) if auth else {})
        self.client = urllib3.PoolManager(maxsize=10, timeout=TIMEOUT)
        self._reading: set = set()  # the answers being read now
        self._lock = threading.Lock()

    @property
    def name(self) -> str:
        """The root as recorded (origin, history): without a user name or password in it."""
        return self._name

    def close(self) -> None:
        """Close every connection now (urllib3's ``clear()`` leaves that to the collector)."""
        for key in self.client.pools.keys():
            if (pool := self.client.pools.get(key)) is not None:
                pool.close()
        self.client.clear()

    def abort(self) -> None:
        """End every answer being read now (its read fails at once): a source that stalls, or
        trickles a byte at a time, does not hold up a run that is stopping."""
        with self._lock:
            for answer in self._reading:
                with contextlib.suppress(OSError, ValueError, RuntimeError):  # (ended meanwhile)
                    answer.shutdown()

    def _get(self, url: str, accept: str, fields: dict | None = None, stream: bool = False):
        """GET ``url``: the answer (its body read unless ``stream``); ``SourceError`` if the
        source cannot be reached or the connection fails."""
        try:
            return self.client.request("GET", url, fields=fields, preload_content=not stream,
                                       headers=self.headers | {"Accept": accept}, retries=RETRIES)
        except urllib3.exceptions.HTTPError as exc:
            raise SourceError(f"cannot reach {url}: {_http_error(exc)}") from None

    @contextlib.contextmanager
    def _abortable(self, answer: urllib3.BaseHTTPResponse):
        with self._lock:
            self._reading.add(answer)
        try:
            yield
        finally:
            with self._lock:
                self._reading.discard(answer)

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

    def listing(self, study_uid: str) -> tuple[list[Listed], dict[str, str] | None]:
        """A study's instances, and their checksums (see ``checksums``)."""
        listed = self.instances(study_uid)
        return listed, self.checksums(study_uid) if listed else None

    def checksums(self, study_uid: str) -> dict[str, str] | None:
        """{SOP Instance UID: sha256} from a dicom-watcher source's API; None from any other
        source, or when its API does not answer (then nothing is checked)."""
        match = _WATCHER_ROOT.match(self.root)
        if match is None:
            return None
        url = f"{match['site']}/api/databases/{match['db']}/studies/{study_uid}/instances"
        try:
            answer = self._get(url, "application/json")
            rows = json.loads(answer.data) if answer.status == 200 else None
        except (SourceError, ValueError):
            rows = None
        if not isinstance(rows, list):
            LOGGER.info("%s gives no checksums: replicated originals are not compared", url)
            return None
        return {r["sop_instance_uid"]: r["sha256"] for r in rows
                if isinstance(r, dict) and r.get("sop_instance_uid") and r.get("sha256")}

    def fetch(self, fetch: "Fetch", folder: Path, deliver) -> None:
        """WADO-RS: each original of the answer streamed into a new file in ``folder`` and
        handed to ``deliver(Fetched)``: a series' as soon as each is whole, an instance once its
        answer has ended properly. ``SourceError`` if the answer is not what was asked for, or is
        cut short (what was delivered before stays delivered)."""
        url = self.root + fetch.path
        held = []  # (the one instance asked for)
        answer = self._get(url, ACCEPT, stream=True)
        read = False  # (to its end: its connection can be used again)
        try:
            with self._abortable(answer):
                if answer.status != 200:
                    raise SourceError(f"GET {url}: HTTP {answer.status}")

                def whole(part):
                    if part.content_type != "application/dicom":
                        part.path.unlink(missing_ok=True)
                        raise SourceError(f"GET {url}: a part of type {part.content_type}")
                    got = Fetched(part.path, part.sha256, fetch.sop, part.size, part.xxh3)
                    if fetch.sop:
                        held.append(got)
                    else:
                        deliver(got)

                parts = PartsToFiles(folder, boundary_of(answer.headers.get("content-type", "")),
                                     prefix="wado", max_parts=1 if fetch.sop else 1_000_000,
                                     max_bytes=room_for(folder, fetch), hashed=True, on_part=whole)
                try:
                    while chunk := answer.read1(READ_BYTES):  # (as it comes: a cut loses no whole part)
                        parts.feed(chunk)
                    read = True
                    parts.close()
                except BaseException:
                    parts.abandon()
                    for got in held:
                        got.path.unlink(missing_ok=True)
                    raise
        except BadBody as exc:
            raise SourceError(f"GET {url}: {exc}") from None
        except urllib3.exceptions.HTTPError as exc:
            raise SourceError(f"GET {url}: {_http_error(exc)}") from None
        finally:
            if not read:
                answer.close()  # (its connection is dropped, not used again mid-answer)
            answer.release_conn()
        for got in held:
            deliver(got)

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
        answer = self._get(url, "application/dicom+json", fields=params)
        if answer.status == 204:
            return [], False
        if answer.status in (401, 403):
            raise SourceError(f"GET {url}: HTTP {answer.status} (give a valid --token)")
        if answer.status != 200:
            raise SourceError(f"GET {url}: HTTP {answer.status}")
        try:
            rows = json.loads(answer.data)
        except ValueError:
            raise SourceError(f"GET {url}: not DICOM JSON (is it a DICOMweb root?)") from None
        if not isinstance(rows, list):
            raise SourceError(f"GET {url}: not a list of DICOM JSON datasets")
        more = "additional results" in answer.headers.get("warning", "").lower()
        return [r for r in rows if isinstance(r, dict)], more


MAX_OBJECT_BYTES = 16 << 30  # more than any original we expect (a DICOM length field is 32-bit)


@dataclasses.dataclass(frozen=True)
class Fetch:
    """One WADO-RS request: a whole series, or one instance of it (``sop``)."""
    study: str
    series: str
    sop: str = ""

    @property
    def path(self) -> str:
        return f"studies/{self.study}/series/{self.series}" + (f"/instances/{self.sop}" if self.sop else "")


@dataclasses.dataclass(frozen=True)
class Fetched:
    """One original that arrived whole: its file, the sha256 of its bytes as they came, the
    SOP Instance UID asked for (empty from a series), its size."""
    path: Path
    sha256: str
    sop: str
    size: int
    xxh3: str


def room_for(folder: Path, fetch: Fetch) -> int:
    """The most one answer may bring: a source that streams without end is cut off before the
    archive's disk is full."""
    room = archive.room(folder)
    return min(MAX_OBJECT_BYTES, room) if fetch.sop else room


def _sop_in(path: Path) -> str:
    """The SOP Instance UID a fetched file holds: its file meta's (the ingest rejects a dataset
    that says otherwise), else its dataset's; empty if it holds none we can read (the ingest
    then says why it is rejected)."""
    import pydicom
    for read in (pydicom.filereader.read_file_meta_info,
                 lambda p: pydicom.dcmread(p, stop_before_pixels=True, specific_tags=["SOPInstanceUID"])):
        try:
            found = read(path)
            uid = str(found.get("MediaStorageSOPInstanceUID") or found.get("SOPInstanceUID") or "").strip()
        except Exception:  # not DICOM, or cut
            continue
        if uid:
            return uid
    return ""


def _value(row: dict, tag: str) -> str:
    values = (row.get(tag) or {}).get("Value") or [""]
    return str(values[0]).strip()


def _key(row: dict) -> tuple:
    return tuple(_value(row, tag) for tag in (STUDY, SERIES, SOP))


def _http_error(exc: urllib3.exceptions.HTTPError) -> str:
    """What went wrong, without urllib3's wrapping (``MaxRetryError``: the first try's error)."""
    exc = getattr(exc, "reason", None) or exc
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
    ingester: IngestProcess | None = None  # started as the run begins, if a study is found
    ahead: tuple | None = None  # (the next study, its listing or the SourceError it ended in)

    def ingest_process(self) -> IngestProcess:
        if self.ingester is None:
            self.ingester = IngestProcess(self.config, "replicate-ingest")
        return self.ingester

    def close(self) -> None:
        if self.ingester is not None:
            self.ingester.close()
            self.ingester = None

    def study(self, study_uid: str, following: str | None = None) -> StudyReport:
        """Fetch and ingest what of one study is missing here; move it on ``to``; record it.
        The study ``following`` it is listed as soon as this one's fetches are asked for,
        while their first objects are on their way."""
        report = StudyReport(study_uid)
        try:
            listed, sums = self._listing(study_uid)
        except SourceError as exc:
            report.errors.append(str(exc))
            return report
        report.listed = len(listed)
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
        self._fetch_and_ingest(report, listed, missing, sums, following)
        if report.stored or report.failed or report.unidentified:
            self._record(report)
        if self.to != IMPORT and (report.stored or report.present):
            self._move(report)
        LOGGER.info("replicated study %s from %s: listed %d, stored %d, already present %d, "
                    "failed %d", study_uid, self.source.name, report.listed, report.stored,
                    report.present, report.failed)
        return report

    def _listing(self, study_uid: str) -> tuple[list[Listed], dict[str, str] | None]:
        """The source's listing of a study: the one taken ahead, else asked for now."""
        ahead, self.ahead = self.ahead, None
        if ahead is None or ahead[0] != study_uid:
            return self.source.listing(study_uid)
        if isinstance(ahead[1], SourceError):
            raise ahead[1]
        return ahead[1]

    def _database_ids(self) -> list[int]:
        return sorted({IMPORT_ID, databases.get(self.to).id})

    def _fetch_and_ingest(self, report: StudyReport, listed: list[Listed], missing: list[Listed],
                          sums: dict | None, following: str | None = None) -> None:
        """Fetch ``missing`` (a series at once where all of it is missing) and ingest the
        originals as they arrive; what a series' answer lacks is asked for one by one."""
        by_sop = {item.sop: item for item in listed}
        by_sha = {sha: sop for sop, sha in (sums or {}).items()}
        in_series = collections.Counter(item.series for item in listed)
        wanted = collections.defaultdict(list)
        for item in missing:
            wanted[item.series].append(item)
        fetcher = _Fetcher(self.source, self.folder, self.pool)
        for series, items in wanted.items():
            if len(items) == in_series[series] and len(items) > 1:
                fetcher.add(Fetch(report.study_instance_uid, series))
            else:
                for item in items:
                    fetcher.add(Fetch(item.study, item.series, item.sop))
        if following:
            try:
                self.ahead = (following, self.source.listing(following))
            except SourceError as exc:
                self.ahead = (following, exc)
        handled: set[str] = set()  # the SOP Instance UIDs that came (stored, present or failed)
        try:
            while fetcher.running:
                arrived, ended = [], []
                for fetch, got in fetcher.waiting(self.stopping):
                    if isinstance(got, Fetched):
                        arrived.append((fetch, got))
                    else:
                        ended.append((fetch, got))
                self._ingest(report, arrived, by_sop, handled, sums, by_sha)  # (first: what came)
                for fetch, error in ended:
                    if not fetch.sop:  # a series: what it did not bring, one by one
                        self._ask_for_the_rest(fetcher, fetch, error, wanted[fetch.series], handled)
                    elif fetch.sop not in handled:
                        self._fail(report, by_sop[fetch.sop], str(error) if error else
                                   "the source's answer held no instance")
                if self.stopping is not None and self.stopping.is_set():
                    report.errors.append("stopped before the study was complete")
                    break
        finally:
            fetcher.close()

    def _ask_for_the_rest(self, fetcher: "_Fetcher", fetch: Fetch, error, wanted: list[Listed],
                          handled: set[str]) -> None:
        lacking = [item for item in wanted if item.sop not in handled]
        if lacking:
            LOGGER.info("%s%s brought %d of %d instances%s: asking for the rest one by one",
                        self.source.name, fetch.path, len(wanted) - len(lacking), len(wanted),
                        f" ({error})" if error else "")
        for item in lacking:
            fetcher.add(Fetch(item.study, item.series, item.sop))

    def _ingest(self, report: StudyReport, arrived: list, by_sop: dict, handled: set[str],
                sums: dict | None, by_sha: dict) -> None:
        """Ingest what arrived, in one transaction; each is counted as stored, present or failed
        (once: a source that sends one twice is not counted twice). An outage of the archive or
        the database is raised once all are counted."""
        study = report.study_instance_uid
        taken = []  # (fetch, fetched, the SOP Instance UID it must be, if known)
        for fetch, fetched in arrived:
            sop, good = self._checked(fetched, sums, by_sha)
            if sop and sop in handled:  # sent twice: counted once
                fetched.path.unlink(missing_ok=True)
                continue
            if sop:
                handled.add(sop)
            if not good:
                fetched.path.unlink(missing_ok=True)
                self._fail(report, by_sop.get(sop) or Listed(study, fetch.series, sop),
                           "the bytes received differ from the source's original (sha256): not stored")
                continue
            taken.append((fetch, fetched, sop))
        origin = from_replication(self.actor, self.source.name)
        try:
            objects = [dict(path=fetched.path, origin=origin, sop_instance_uid=sop, study_uid=study,
                            digests=(fetched.sha256, fetched.xxh3)) for _, fetched, sop in taken]
            outcomes = self.ingest_process().ingest(objects) if objects else []
        finally:
            for _, fetched, _ in taken:  # (the archive has their inodes, or rejected_dir copies)
                fetched.path.unlink(missing_ok=True)
        outage = None
        for (fetch, fetched, sop), outcome in zip(taken, outcomes):
            if isinstance(outcome, Exception) and is_unavailable(outcome):
                outage = outage or outcome
            if not sop:  # (from a series of a source without checksums: the object says)
                sop = getattr(outcome, "sop_instance_uid", None) or ""
                if not sop:  # it failed before it said: the instance it was is asked for alone
                    report.unidentified += 1
                    LOGGER.warning("replication of study %s: a part of the answer for series %s "
                                   "is no instance we can name (%s); what the series lacks is "
                                   "asked for one by one", study, fetch.series, _said(outcome))
                    continue
                if sop in handled:  # sent twice: counted once; other bytes the second time are told
                    if isinstance(outcome, Exception) or outcome.outcome not in ("imported", "duplicate"):
                        report.errors.append(f"{sop}: sent again in the same answer, and that copy "
                                             f"{_said(outcome)}")
                    continue
                handled.add(sop)
            item = by_sop.get(sop)
            if item is None:  # not listed (it came to the series since): taken too
                item = Listed(study, fetch.series, sop)
                report.listed += 1
            if isinstance(outcome, Exception):
                if not is_unavailable(outcome):
                    LOGGER.error("replication of %s: ingest failed", item.sop, exc_info=outcome)
                self._fail(report, item, f"{type(outcome).__name__}: {outcome}")
            elif outcome.outcome == "imported":
                report.stored += 1
                report.bytes += fetched.size
            elif outcome.outcome == "duplicate":
                report.present += 1
            else:
                self._fail(report, item, f"{outcome.outcome}"
                           + (f" as {outcome.reason}: {outcome.detail}" if outcome.reason else
                              f": {outcome.detail}" if outcome.detail else ""))
        if outage is not None:
            raise outage  # nothing more can be stored now

    @staticmethod
    def _checked(fetched: Fetched, sums: dict | None, by_sha: dict) -> tuple[str, bool]:
        """The SOP Instance UID the fetched bytes must hold ("" if unknown: the ingest reads
        it), and whether they may be stored. From a dicom-watcher (``sums``; ``by_sha`` the same
        the other way round), bytes with a listed sha256 are that instance's original; other
        bytes pass only for an instance the source gave no sha256 for."""
        if not sums:
            return fetched.sop, True
        if fetched.sop:  # the one instance asked for
            return fetched.sop, sums.get(fetched.sop, fetched.sha256) == fetched.sha256
        if fetched.sha256 in by_sha:
            return by_sha[fetched.sha256], True
        held = _sop_in(fetched.path)  # (a series' part that no listed sha256 matches)
        return held, held not in sums

    @staticmethod
    def _fail(report: StudyReport, item: Listed, why: str) -> None:
        report.failed += 1
        report.errors.append(f"{item.sop}: {why}")
        LOGGER.warning("replication of %s (study %s) failed: %s", item.sop, item.study, why)

    def _record(self, report: StudyReport) -> None:
        """The study's line in the history."""
        detail = (f"{report.stored} instances ({report.bytes} bytes) from {self.source.name} by "
                  f"{self.actor}: listed {report.listed}, stored {report.stored}, already present "
                  f"{report.present}, failed {report.failed}"
                  + (f", {report.unidentified} parts that named no instance" if report.unidentified else ""))
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


class _Cancelled(Exception):
    """The run stopped taking what is fetched: the fetch ends where it is."""


class _Fetcher:
    """Fetches on the pool; ``waiting()`` gives ``(fetch, Fetched)`` for each original that
    has arrived and ``(fetch, None or SourceError)`` for each fetch that has ended. Originals
    wait in a queue of ``AHEAD``: a fetch that is that far ahead waits (and its source with it)."""

    def __init__(self, source: Source, folder: Path, pool: ThreadPoolExecutor):
        self.source, self.folder, self.pool = source, folder, pool
        self.queue: queue.Queue = queue.Queue(AHEAD)
        self.cancelled = threading.Event()
        self.running = 0  # fetches added and not ended

    def add(self, fetch: Fetch) -> None:
        self.running += 1
        self.pool.submit(self._run, fetch)

    def waiting(self, stopping: threading.Event | None = None) -> list:
        """What has arrived: at least one thing (waited for), at most ``AHEAD``; nothing if
        ``stopping`` is set meanwhile."""
        while True:
            try:
                found = [self.queue.get(timeout=0.5)]
                break
            except queue.Empty:
                if stopping is not None and stopping.is_set():
                    return []
        while len(found) < AHEAD:
            try:
                found.append(self.queue.get_nowait())
            except queue.Empty:
                break
        self.running -= sum(not isinstance(got, Fetched) for _, got in found)
        return found

    def close(self) -> None:
        """Stop: fetches end at their next original, or at once if they are reading an answer;
        what waits is removed (and the run's folder, with anything a fetch was writing, when
        the run ends)."""
        self.cancelled.set()
        self.source.abort()
        while True:
            try:
                _, got = self.queue.get_nowait()
            except queue.Empty:
                return
            if isinstance(got, Fetched):
                got.path.unlink(missing_ok=True)

    def _run(self, fetch: Fetch) -> None:
        try:
            self.source.fetch(fetch, self.folder, lambda got: self._put(fetch, got))
            ended = None
        except _Cancelled:
            return
        except SourceError as exc:
            ended = exc
        except Exception as exc:  # (a disk that is full, …): that fetch failed, say why
            LOGGER.exception("fetching %s%s failed", self.source.name, fetch.path)
            ended = SourceError(f"GET {self.source.root}{fetch.path}: {type(exc).__name__}: {exc}")
        try:
            self._put(fetch, ended)
        except _Cancelled:
            pass

    def _put(self, fetch: Fetch, got) -> None:
        while not self.cancelled.is_set():
            try:
                return self.queue.put((fetch, got), timeout=0.2)
            except queue.Full:
                continue
        if isinstance(got, Fetched):
            got.path.unlink(missing_ok=True)
        raise _Cancelled


def replicate(config: Config, url: str, token: str | None = None, studies=(), since: str = "",
              to: str = IMPORT, actor: str = "", workers: int = WORKERS,
              stopping: threading.Event | None = None) -> list[StudyReport]:
    """Replicate ``studies`` (Study Instance UIDs; none: every study, with a date from ``since``
    on, YYYYMMDD) from the DICOMweb root ``url`` into import, then move them into ``to``.
    A report per study. ``SourceError`` when the source cannot be listed at all; an outage of
    the archive or the database (``Unavailable``, ``OSError``, peewee's errors) stops the run.
    ``stopping``: once set, no more is fetched (what was fetched is ingested or removed)."""
    databases.get(to)  # Refused before anything is fetched
    archive.remove_stale_temporaries(config.archive.dir)  # (of an ingest process killed mid-store)
    source = Source(url, token)
    folder = None
    try:
        uids = _selected(source, studies, since)
        folder = incoming_folder(config)
        with ThreadPoolExecutor(max_workers=max(1, workers), thread_name_prefix="replicate") as pool:
            run = Replication(config, source, to, actor or os_user(), folder, pool, stopping)
            found = [uid for uid, _ in uids if uid]
            following = dict(zip(found, found[1:]))  # {study: the one replicated after it}
            try:
                if found:  # (its start-up, half a second of imports, overlaps the first listing)
                    run.ingest_process()
                reports = []
                for uid, wanted in uids:
                    if stopping is not None and stopping.is_set():
                        break
                    reports.append(run.study(uid, following.get(uid)) if uid else _not_found(wanted))
                return reports
            finally:
                run.close()
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


def _said(outcome) -> str:
    """What an ingest's outcome (or the exception that stopped it) says went wrong."""
    if isinstance(outcome, Exception):
        return f"failed: {type(outcome).__name__}: {outcome}"
    return f"was {outcome.outcome}" + (f" as {outcome.reason}: {outcome.detail}" if outcome.reason else "")


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
