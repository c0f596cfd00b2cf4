"""SIGKILL the real service again and again while files arrive, then prove nothing was lost.

Usage:
    python tools/crash_harness.py --rounds 20 --files 3000 --db sqlite|postgresql
                                  [--workdir DIR] [--seed N] [--large N] [--keep]

Each round drops the next slice of a generated corpus into the drop folder
(renamed in from a staging folder on the same filesystem, while some large
files are copied in slowly by a writer that carries on across kills), starts
``dicom-watcher run``, sleeps a seeded random time (or waits for a store to
begin in archive/.tmp) and SIGKILLs it. A last run drains the folder and is
stopped with SIGTERM, which must end it with exit status 0.

Then, read from the database itself and the files on disk, every dropped file
must be accounted for exactly once: imported (a row with its sha256 whose stored
file holds its bytes), a duplicate of imported bytes, or rejected (a rejection
row whose file holds its bytes); conflicts are rejected as ``conflict``, junk
as ``not-dicom``; one row per SOP Instance UID, no row without its file, no
row with bytes that were never dropped, a history line for every outcome,
nothing left in the drop folder, ``dicom-watcher verify`` exit 0. Orphans and
temporary files in the archive are allowed, and counted.

In tests: ``result = run(tmp_path / "crash", rounds=5, files=300, database=url)``,
then ``assert result.lost == 0 and result.duplicated == 0 and result.verify_ok``.
Exit status: 0 when every check holds, 1 otherwise. The work folder is kept
when a check fails (or with ``--keep``): logs/round-NN.log holds each run's log.
"""

from __future__ import annotations

import argparse
import collections
import hashlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path

from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian

PG_SERVER = os.environ.get("WATCHER_TEST_PG", "postgresql://postgres@127.0.0.1:5432")
JUNK = {  # name -> how it starts; none of these may look like DICOM
    "README.TXT": b"Thank you for using this disc.\r\n",
    "AUTORUN.INF": b"[autorun]\r\nopen=VIEWER.EXE\r\n",
    "VIEWER.EXE": b"MZ\x90\x00\x03\x00\x00\x00\x04\x00",
    "report.pdf": b"%PDF-1.4\n%\xe2\xe3\xcf\xd3\n",
    "scan.jpg": b"\xff\xd8\xff\xe0\x00\x10JFIF\x00",
}


@dataclass(frozen=True)
class Item:
    """One file the harness drops; ``rel`` is its path relative to the drop folder."""

    rel: str
    kind: str
    sha256: str
    size: int
    sop_instance_uid: str | None = None
    slow: bool = False  # copied into the drop folder in chunks instead of renamed in
    of: str | None = None  # duplicate / conflict: the rel of the file it collides with


@dataclass
class Kill:
    round: int
    after_s: float  # seconds after the service was started
    phase: str  # start-up, mid-store, source-being-written, importing, idle
    alive: bool  # False: the service had exited by itself before the kill
    exit_code: int | None
    in_drop: int  # files in the drop folder right after the kill
    instances: int  # instance rows right after the kill
    slow_copies: int  # slow copies in progress at the kill
    last_log: str


@dataclass
class Result:
    workdir: str
    database: str
    watcher: str = ""  # which code was tested: commit, and a hash of the package's sources
    rounds: int = 0
    survived: int = 0
    files: int = 0
    by_kind: dict = field(default_factory=dict)
    imported: int = 0
    duplicates: int = 0
    rejected: dict = field(default_factory=dict)
    lost: int = 0
    duplicated: int = 0
    misfiled: int = 0
    foreign_rows: int = 0
    rows_without_file: int = 0
    instance_rows: int = 0
    distinct_uids: int = 0
    left_in_drop: int = 0
    orphans: int = 0
    orphan_kinds: dict = field(default_factory=dict)  # what the orphans' bytes were dropped as
    temporary: int = 0
    verify_exit: int | None = None
    final_exit: int | None = None
    ready_s: float | None = None  # final run: start until "watching" was logged
    drained_s: float | None = None
    conflicts_inverted: int = 0
    folder_races: int = 0
    log_errors: list = field(default_factory=list)
    problems: list = field(default_factory=list)
    kills: list = field(default_factory=list)
    seconds: float = 0.0

    @property
    def verify_ok(self) -> bool:
        return self.verify_exit == 0

    @property
    def ok(self) -> bool:
        return not self.problems and self.verify_ok and self.final_exit == 0

    def as_dict(self) -> dict:
        return dict(asdict(self), verify_ok=self.verify_ok, ok=self.ok)


# --- the corpus ----------------------------------------------------------------

def _uid(rng: random.Random) -> str:
    return f"2.25.{uuid.UUID(int=rng.getrandbits(128), version=4).int}"


def _ct(rng, study, series, patient, number, rows, cols) -> Dataset:
    """A complete CT image, explicit VR little endian, with random 16-bit pixels."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = CTImageStorage
    ds.SOPInstanceUID = _uid(rng)
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SpecificCharacterSet = "ISO_IR 192"
    ds.SOPClassUID = CTImageStorage
    ds.StudyDate, ds.StudyTime, ds.AccessionNumber = "20260101", "120000", f"A{study[-6:]}"
    ds.Modality, ds.StudyDescription, ds.SeriesDescription = "CT", "Crash harness", "Axial"
    ds.PatientName, ds.PatientID = "Crash^Harness", patient
    ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series
    ds.StudyID, ds.SeriesNumber, ds.InstanceNumber = "1", 1, number
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.Rows, ds.Columns = rows, cols
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.PixelData = rng.randbytes(rows * cols * 2)
    return ds


def _save(ds: Dataset, path: Path) -> bytes:
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.preamble = b"\0" * 128
    ds.save_as(path, enforce_file_format=True)
    return path.read_bytes()


def build_corpus(staging: Path, files: int, large: int, rng: random.Random,
                 large_mb=(20, 60)) -> list[Item]:
    """Write ``files`` files below ``staging``; return them in the order they will be dropped.

    About 2 % duplicates (same bytes, another name), 2 % conflicts (same SOP
    Instance UID, other bytes), 4 % junk, ``large`` files of ``large_mb`` MB of
    native pixel data (every other one copied in slowly), the rest small CT images.
    Duplicates and conflicts come after the file they collide with.
    """
    n_dup = max(1, files // 50)
    n_conflict = max(1, files // 50)
    n_junk = max(1, files // 25)
    n_valid = files - large - n_dup - n_conflict - n_junk
    if n_valid < max(n_dup, n_conflict):
        raise ValueError(f"{files} files are too few for {large} large ones")
    kinds = ["valid"] * n_valid + ["large"] * large + ["junk"] * n_junk
    rng.shuffle(kinds)
    items: list[Item] = []
    datasets: dict[str, Dataset] = {}  # rel -> dataset of small valid files, for conflicts
    series_left, patient, study, series, folder, number = 0, "", "", "", "", 0
    for kind in kinds:
        if kind == "junk":
            name, head = rng.choice(sorted(JUNK.items()))
            rel = f"{folder or 'loose'}/{len(items):05d}_{name}"
            data = head + rng.randbytes(rng.randint(50, 6000))
            _write_bytes(staging / rel, data)
            items.append(_item(rel, "junk", data))
            continue
        if kind == "large":
            mb = rng.uniform(*large_mb)
            cols = 2048
            rows = max(1, int(mb * 1e6 / (2 * cols)))
            ds = _ct(rng, _uid(rng), _uid(rng), f"BIG{len(items):05d}", 1, rows, cols)
            rel = f"big/{len(items):05d}_{mb:.0f}MB.dcm"
            data = _save(ds, staging / rel)
            slow = sum(1 for it in items if it.kind == "large") % 2 == 1  # every other one
            items.append(_item(rel, "large", data, ds.SOPInstanceUID, slow=slow))
            continue
        if series_left == 0:  # a new series, sometimes in a new study of a new patient
            if not study or rng.random() < 0.3:
                patient, study = f"P{rng.randrange(10**6):06d}", _uid(rng)
            series, series_left, number = _uid(rng), rng.randint(5, 80), 0
            cd_style = rng.random() < 0.3
            folder = f"{patient}/{study[-8:]}/{series[-8:]}"
        series_left -= 1
        number += 1
        ds = _ct(rng, study, series, patient, number, 32, 32)
        rel = f"{folder}/IM{number:05d}" + ("" if cd_style else ".dcm")
        rel = rel if rel not in datasets else f"{rel}_{len(items)}"
        data = _save(ds, staging / rel)
        datasets[rel] = ds
        items.append(_item(rel, "valid", data, ds.SOPInstanceUID))
    small = [it for it in items if it.kind == "valid"]
    larges = [it for it in items if it.kind == "large"]
    extra = []
    for orig in larges[:1] + rng.sample(small, n_dup - len(larges[:1])):  # one of a large file
        rel = f"again/{orig.rel}"
        (staging / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(staging / orig.rel, staging / rel)
        extra.append(Item(rel, "duplicate", orig.sha256, orig.size, orig.sop_instance_uid,
                          slow=orig.slow, of=orig.rel))
    for orig in rng.sample(small, n_conflict):
        ds = datasets[orig.rel]
        ds.SeriesDescription = "Axial (re-exported)"  # same UIDs, other bytes
        rel = f"edited/{orig.rel}"
        extra.append(_item(rel, "conflict", _save(ds, staging / rel), ds.SOPInstanceUID,
                           of=orig.rel))
    for item in extra:
        after = next(n for n, it in enumerate(items) if it.rel == item.of)
        items.insert(rng.randint(after + 1, len(items)), item)
    return items


def _item(rel, kind, data, uid=None, slow=False, of=None) -> Item:
    return Item(rel, kind, hashlib.sha256(data).hexdigest(), len(data), uid, slow, of)


def _write_bytes(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)


def sha256_of(path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


# --- dropping files in ---------------------------------------------------------

class Dropper:
    """Puts corpus files into the drop folder: renamed in at once, or written slowly.

    Slow copies run in a thread of their own and go on while the service is
    killed and restarted, so kills land while the *source* is half written.
    Half of them write the final name directly, half write ``name.part``
    (ignored by the watcher) and rename it at the end. Pauses are kept well
    under ``incomplete_seconds``: a copy that stalls longer is rightly rejected.
    """

    def __init__(self, staging: Path, drop: Path, seed: int):
        self.staging, self.drop = staging, drop
        self.rng = random.Random(seed)
        self.folder_races = 0
        self.copy_errors: list[str] = []
        self._queue: collections.deque = collections.deque()
        self._busy = 0
        self._cond = threading.Condition()
        self._closed = False
        self._thread = threading.Thread(target=self._copy_loop, name="slow-copier", daemon=True)
        self._thread.start()

    def drop_item(self, item: Item) -> None:
        if item.slow:
            with self._cond:
                self._queue.append(item)
                self._cond.notify()
        else:
            self._retry_on_vanished_folder(
                lambda: os.rename(self.staging / item.rel, self.drop / item.rel), item.rel)

    def copying(self) -> int:
        with self._cond:
            return len(self._queue) + self._busy

    def close(self, timeout: float) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        self._thread.join(timeout)

    def _retry_on_vanished_folder(self, action, rel: str) -> None:
        """The service removes sub-folders emptied a minute ago: if it just did, make it again."""
        for attempt in range(5):
            (self.drop / rel).parent.mkdir(parents=True, exist_ok=True)
            try:
                return action()
            except FileNotFoundError:
                if not (self.staging / rel).exists() or attempt == 4:
                    raise
                self.folder_races += 1

    def _copy_loop(self) -> None:
        while True:
            with self._cond:
                while not self._queue and not self._closed:
                    self._cond.wait()
                if not self._queue:
                    return
                item = self._queue.popleft()
                self._busy += 1
            try:
                self._copy_slowly(item)
            except Exception as exc:  # reported: the file will be missing from the drop folder
                self.copy_errors.append(f"{item.rel}: {type(exc).__name__}: {exc}")
            finally:
                with self._cond:
                    self._busy -= 1

    def _copy_slowly(self, item: Item) -> None:
        src, dest = self.staging / item.rel, self.drop / item.rel
        via_part = self.rng.random() < 0.5
        target = dest.with_name(dest.name + ".part") if via_part else dest
        w = self._retry_on_vanished_folder(lambda: open(target, "wb"), item.rel)
        with open(src, "rb") as f, w:
            while chunk := f.read(self.rng.randint(1, 6) << 20):
                w.write(chunk)
                w.flush()
                # mostly shorter than settle_seconds, sometimes longer: the watcher
                # then looks at a half-written file and must leave it alone
                time.sleep(self.rng.choice((0.02, 0.05, 0.1, 0.2, 0.3, 0.8, 1.2)))
        if via_part:
            self._retry_on_vanished_folder(lambda: os.rename(target, dest), item.rel)
        os.unlink(src)


def files_below(folder: Path) -> list[str]:
    out = []
    for root, _, names in os.walk(folder):
        out.extend(os.path.relpath(os.path.join(root, n), folder) for n in names)
    return sorted(out)


# --- the database, read directly -------------------------------------------------

class Db:
    """A plain connection to the service's database for the checks (not the watcher's code)."""

    def __init__(self, url: str):
        self.url = url
        if url.startswith("sqlite:///"):
            import sqlite3
            self.conn = sqlite3.connect(url[len("sqlite:///"):], timeout=30)
        else:
            import psycopg
            self.conn = psycopg.connect(url, autocommit=True)

    def rows(self, sql: str) -> list[tuple]:
        try:
            return list(self.conn.execute(sql).fetchall())
        except Exception as exc:  # no schema yet: killed before the first migration finished
            if "no such table" in str(exc) or "does not exist" in str(exc):
                return []
            raise

    def close(self) -> None:
        self.conn.close()


def _create_pg_database(server: str) -> str:
    import psycopg
    name = f"dw_crash_{os.getpid()}_{uuid.uuid4().hex[:6]}"
    with psycopg.connect(server + "/postgres", autocommit=True, connect_timeout=5) as admin:
        admin.execute(f'CREATE DATABASE "{name}"')
    return f"{server}/{name}"


def _drop_pg_database(url: str) -> None:
    import psycopg
    server, name = url.rsplit("/", 1)
    with psycopg.connect(server + "/postgres", autocommit=True, connect_timeout=5) as admin:
        admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


# --- the service ------------------------------------------------------------------

def watcher_command() -> list[str]:
    beside = Path(sys.executable).with_name("dicom-watcher")
    if beside.exists():
        return [str(beside)]
    found = shutil.which("dicom-watcher")
    return [found] if found else [sys.executable, "-m", "watcher"]


def watcher_version() -> str:
    """The commit of the watcher under test and a hash of its sources as they are on disk."""
    import watcher
    package = Path(watcher.__file__).parent
    digest = hashlib.sha256()
    for path in sorted(package.rglob("*.py")):
        digest.update(path.relative_to(package).as_posix().encode() + b"\0" + path.read_bytes())
    try:
        head = subprocess.run(["git", "-C", str(package), "log", "-1", "--format=%h"],
                              capture_output=True, text=True, timeout=10).stdout.strip()
    except OSError:
        head = ""
    return f"{head or 'unknown commit'}, sources {digest.hexdigest()[:12]}"


def write_config(workdir: Path, url: str) -> Path:
    path = workdir / "watcher.toml"
    path.write_text(
        '[watch]\ndrop_dir = "drop"\nsettle_seconds = 1\nrescan_seconds = 1\n'
        'incomplete_seconds = 60\n\n'
        '[archive]\ndir = "archive"\nrejected_dir = "rejected"\n\n'
        f'[database]\nurl = {json.dumps(url)}\n\n'
        '[import]\nworkers = 2\nnode = "crash"\n')
    return path


def start_service(config: Path, log: Path) -> subprocess.Popen:
    with open(log, "ab") as out:
        return subprocess.Popen([*watcher_command(), "run", "--config", str(config)],
                                stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)


def kill_delay(rng: random.Random) -> float:
    """How long a round lets the service live: start-up, mid-work, or long enough to drain."""
    band = rng.random()
    if band < 0.2:
        return rng.uniform(0.0, 0.7)  # start-up: imports, connect, migrate, first rescan
    if band < 0.75:
        return rng.uniform(0.7, 4.0)  # importing, mid large copies, between commits
    return rng.uniform(4.0, 9.0)


def _last_line(log: Path) -> str:
    try:
        with open(log, "rb") as f:
            f.seek(max(0, f.seek(0, 2) - 4096))
            lines = f.read().decode("utf-8", "replace").strip().splitlines()
        return lines[-1][:200] if lines else ""
    except OSError:
        return ""


def _phase(log_text: str, tmp_before: set, tmp_after: set, copying: int, in_drop: int) -> str:
    if "watching " not in log_text:
        return "start-up"
    if tmp_after - tmp_before:
        return "mid-store"
    if copying:
        return "source-being-written"
    return "importing" if in_drop else "idle"


# --- the run --------------------------------------------------------------------

def run(workdir, rounds: int = 20, files: int = 3000, database: str = "sqlite", seed: int = 1,
        large: int | None = None, large_mb=(20, 60), timeout: float = 600.0,
        pg_server: str = PG_SERVER, echo=None, keep: str = "never") -> Result:
    """Run the whole experiment in ``workdir`` (created; must be empty).

    ``database``: ``sqlite``, ``postgresql`` (a fresh database is created on
    ``pg_server`` and dropped afterwards, unless ``keep`` is ``always``, or
    ``failed`` and a check failed) or a database URL to use as it is.
    """
    started = time.monotonic()
    say = echo or (lambda *_: None)
    workdir = Path(workdir).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    if any(workdir.iterdir()):
        raise ValueError(f"{workdir} is not empty")
    staging, drop, logs = workdir / "staging", workdir / "drop", workdir / "logs"
    for d in (staging, drop, logs, workdir / "archive", workdir / "rejected"):
        d.mkdir()
    rng = random.Random(seed)
    large = max(2, files // 200) if large is None else large
    created_db = None
    if database == "sqlite":
        url = f"sqlite:///{workdir / 'watcher.db'}"
    elif database in ("postgresql", "postgres"):
        url = created_db = _create_pg_database(pg_server)
    else:
        url = database
    result = Result(str(workdir), url, watcher_version(), rounds=rounds)
    try:
        say(f"generating {files} files ({large} large) in {staging}")
        items = build_corpus(staging, files, large, rng, large_mb)
        (workdir / "expected.json").write_text(json.dumps([asdict(i) for i in items], indent=1))
        result.files = len(items)
        result.by_kind = dict(collections.Counter(i.kind for i in items))
        config = write_config(workdir, url)
        dropper = Dropper(staging, drop, seed + 1)
        try:
            _rounds(result, items, rounds, rng, config, drop, workdir, logs, dropper, say)
            _final_run(result, config, drop, logs, dropper, timeout, say)
        finally:
            dropper.close(timeout=120)
        result.folder_races = dropper.folder_races
        result.problems += [f"slow copy failed: {e}" for e in dropper.copy_errors]
        if dropper.copying():
            result.problems.append(f"{dropper.copying()} slow copies never finished")
        check(result, items, workdir, url, config)
        _scan_logs(result, logs)
    finally:
        if created_db and not (keep == "always" or keep == "failed" and not result.ok):
            _drop_pg_database(created_db)
    result.seconds = round(time.monotonic() - started, 1)
    (workdir / "result.json").write_text(json.dumps(result.as_dict(), indent=1))
    return result


def _rounds(result, items, rounds, rng, config, drop, workdir, logs, dropper, say) -> None:
    per_round = -(-len(items) // rounds)
    slices = [items[i * per_round:(i + 1) * per_round] for i in range(rounds)]
    db = Db(_url_of(config))
    try:
        for r, batch in enumerate(slices):
            kill = _round(r, batch, rng, config, drop, workdir, logs / f"round-{r:02d}.log",
                          dropper, db)
            result.kills.append(kill)
            if kill.alive:
                result.survived += 1
            else:
                result.problems.append(f"round {r}: the service exited by itself with code "
                                       f"{kill.exit_code} before the kill: {kill.last_log}")
            say(f"round {r:2d}: killed after {kill.after_s:5.2f} s ({kill.phase}), {kill.in_drop} "
                f"files in the drop folder, {kill.instances} instances, "
                f"{kill.slow_copies} slow copies")
    finally:
        db.close()


def _round(r, batch, rng, config, drop, workdir, log, dropper, db) -> Kill:
    """Drop part of the slice, start the service, drop the rest while it runs, SIGKILL it.

    In about a third of the rounds the kill waits for a temporary file to
    appear in archive/.tmp (a store in progress: often a large file) and
    lands a few milliseconds after it, unless the round's time runs out first.
    """
    before = int(len(batch) * rng.uniform(0.3, 1.0))
    for item in batch[:before]:
        dropper.drop_item(item)
    hunt_store = rng.random() < 0.35
    delay = rng.uniform(1.0, 9.0) if hunt_store else kill_delay(rng)
    jitter = rng.choice((0.0, 0.005, 0.02, 0.05, 0.15))
    later = sorted(zip((rng.uniform(0, delay) for _ in batch[before:]), batch[before:]),
                   key=lambda pair: pair[0])
    tmp_before = set(_tmp_files(workdir))
    t0 = time.monotonic()
    proc = start_service(config, log)
    try:
        deadline = t0 + delay
        while time.monotonic() < deadline:
            while later and t0 + later[0][0] <= time.monotonic():
                dropper.drop_item(later.pop(0)[1])
            if hunt_store and set(_tmp_files(workdir)) - tmp_before:
                deadline, hunt_store = time.monotonic() + jitter, False
            time.sleep(0.003 if hunt_store else 0.01)
    finally:
        alive, copying = proc.poll() is None, dropper.copying()
        proc.send_signal(signal.SIGKILL)
        code = proc.wait()
    after = time.monotonic() - t0
    for _, item in later:  # the rest of the slice arrives while the service is down
        dropper.drop_item(item)
    in_drop = len(files_below(drop))
    phase = _phase(log.read_text("utf-8", "replace"), tmp_before, set(_tmp_files(workdir)),
                   copying, in_drop)
    return Kill(r, round(after, 3), phase, alive, None if alive else code, in_drop,
                _count(db, "instance"), copying, _last_line(log))


def _final_run(result, config, drop, logs, dropper, timeout, say) -> None:
    """Start the service once more, let it empty the drop folder, stop it with SIGTERM.

    SIGTERM is sent only once the service has said it is watching: before
    that, ``dicom-watcher run`` has no handler for it yet (see the report).
    """
    log = logs / "final.log"
    t0 = time.monotonic()
    proc = start_service(config, log)
    try:
        while time.monotonic() - t0 < timeout and proc.poll() is None:
            if result.ready_s is None and "watching " in log.read_text("utf-8", "replace"):
                result.ready_s = round(time.monotonic() - t0, 2)
            if result.ready_s is not None and not dropper.copying() and not files_below(drop):
                break
            time.sleep(0.1)
    except BaseException:
        proc.kill()
        proc.wait()
        raise
    left = files_below(drop)
    if result.ready_s is None:
        result.problems.append(f"the final service never said it was watching ({log})")
    if left or dropper.copying():
        result.problems.append(f"the drop folder still holds {len(left)} files after "
                               f"{timeout:.0f} s (first: {left[:5]}), "
                               f"{dropper.copying()} slow copies running")
    else:
        result.drained_s = round(time.monotonic() - t0, 1)
    if proc.poll() is not None:
        result.problems.append(f"the final service exited by itself with code {proc.returncode}")
        result.final_exit = proc.returncode
        return
    proc.send_signal(signal.SIGTERM)
    try:
        result.final_exit = proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        result.problems.append("the final service did not stop within 60 s of SIGTERM")
    if result.final_exit != 0:
        result.problems.append(f"SIGTERM: the service exited with {result.final_exit}, not 0 "
                               f"({log}: {_last_line(log)})")
    say(f"final run: drained in {result.drained_s} s, SIGTERM -> exit {result.final_exit}")


def _url_of(config: Path) -> str:
    import tomllib
    return tomllib.loads(config.read_text())["database"]["url"]


def _tmp_files(workdir: Path) -> list[str]:
    return files_below(workdir / "archive" / ".tmp")  # [] while it does not exist


def _count(db: Db, table: str) -> int:
    rows = db.rows(f"SELECT COUNT(*) FROM {table}")
    return rows[0][0] if rows else 0


# --- the checks -------------------------------------------------------------------

def check(result: Result, items: list[Item], workdir: Path, url: str, config: Path) -> None:
    """Every dropped file accounted for exactly once, byte for byte; see the module docstring."""
    archive, rejected, drop = workdir / "archive", workdir / "rejected", workdir / "drop"
    db = Db(url)
    try:
        instances = db.rows("SELECT sop_instance_uid, sha256, stored_path, source FROM instance")
        rejections = db.rows("SELECT source, reason, path, sha256 FROM rejection")
        events = set(db.rows("SELECT outcome, source FROM history"))
        heartbeat = db.rows("SELECT state FROM heartbeat WHERE node = 'crash'")
        claims = db.rows("SELECT path, node FROM claim")  # [] where the table does not exist
    finally:
        db.close()
    problems = result.problems
    if [h[0] for h in heartbeat] != ["stopped"]:
        problems.append(f"after SIGTERM the heartbeat of node crash says {heartbeat}, not stopped")
    if claims:
        problems.append(f"{len(claims)} claims outlive the clean stop, e.g. {claims[:3]}")
    intact = {}  # stored_path -> sha256 of the file there, None when missing
    for _, _, stored, _ in instances:
        p = archive / stored
        intact[stored] = sha256_of(p) if p.is_file() else None
    by_uid = collections.defaultdict(list)
    by_sha = collections.defaultdict(list)
    by_source = {}
    for row in instances:
        uid, sha, stored, source = row
        by_uid[uid].append(row)
        by_sha[sha].append(row)
        by_source[source] = row
        if intact[stored] != sha:
            result.rows_without_file += 1
            problems.append(f"instance {uid} (from {source}): its stored file {stored} is "
                            + ("missing" if intact[stored] is None else "not its bytes"))
    rej_by_source = collections.defaultdict(list)
    rejected_paths = set()
    for source, reason, path, sha in rejections:
        rejected_paths.add(os.path.realpath(path))
        found = sha256_of(path) if os.path.isfile(path) else None
        rej_by_source[source].append((reason, path, found))
        if found is None:
            problems.append(f"rejection row for {source} ({reason}): {path} is missing")
        elif sha and found != sha:
            problems.append(f"rejection row for {source} ({reason}): {path} is not its bytes")
    for rel in files_below(rejected):
        if os.path.realpath(rejected / rel) not in rejected_paths:
            problems.append(f"rejected/{rel} lies in the rejected folder without a rejection row")

    dropped = {i.sha256: i for i in items}
    for uid, sha, _, source in instances:
        if sha not in dropped:
            result.foreign_rows += 1
            problems.append(f"instance {uid} from {source} has bytes that were never dropped "
                            f"(sha256 {sha[:12]}…): a partial or altered file was imported")
        elif dropped[sha].sop_instance_uid != uid:
            result.foreign_rows += 1
            problems.append(f"instance {uid} from {source} holds the bytes of {dropped[sha].rel}, "
                            f"whose SOP Instance UID is {dropped[sha].sop_instance_uid}")
    for uid, rows in by_uid.items():
        if len(rows) > 1:
            result.duplicated += len(rows) - 1
            problems.append(f"{len(rows)} instance rows for SOP Instance UID {uid}")
    valid_uids = {i.sop_instance_uid for i in items if i.sop_instance_uid}
    result.instance_rows, result.distinct_uids = len(instances), len(valid_uids)
    if len(instances) != len(valid_uids):
        problems.append(f"{len(instances)} instance rows for {len(valid_uids)} distinct "
                        "SOP Instance UIDs dropped")

    left = set(files_below(drop))
    result.left_in_drop = len(left)
    rejected_counts = collections.Counter()
    for item in items:
        ways = []
        row = by_source.get(item.rel)
        if row and row[1] == item.sha256 and intact[row[2]] == item.sha256:
            ways.append("imported")
        elif any(intact[r[2]] == item.sha256 for r in by_sha.get(item.sha256, ())):
            ways.append("duplicate")
        for reason, path, found in rej_by_source.get(item.rel, ()):
            if found == item.sha256:
                ways.append(f"rejected:{reason}")
        if item.rel in left:
            problems.append(f"{item.rel} ({item.kind}) is still in the drop folder")
        if not ways:
            if item.rel not in left:
                result.lost += 1
                problems.append(f"LOST: {item.rel} ({item.kind}, sha256 {item.sha256[:12]}…) is "
                                "neither imported, nor a duplicate, nor rejected")
            continue
        if len(ways) > 1:
            result.duplicated += 1
            problems.append(f"{item.rel} ({item.kind}) is accounted for {len(ways)} times: {ways}")
        way = ways[0]
        if way.startswith("rejected:"):
            rejected_counts[way.split(":", 1)[1]] += 1
        elif way == "imported":
            result.imported += 1
        else:
            result.duplicates += 1
        if (way.split(":")[0], item.rel) not in events:
            problems.append(f"{item.rel} ({item.kind}) ended {way} without a history line")
        wanted = _expected(item, by_uid)
        if way not in wanted:
            result.misfiled += 1
            problems.append(f"{item.rel} ({item.kind}) ended {way}, expected {' or '.join(wanted)}")
        if item.kind == "conflict" and way != "rejected:conflict":
            result.conflicts_inverted += 1
    result.rejected = dict(rejected_counts)
    _verify(result, config, items)


def _expected(item: Item, by_uid) -> tuple:
    """What may happen to ``item``: the bytes that won its SOP Instance UID are imported
    (or a duplicate), other bytes under that UID are a conflict, junk is not-dicom.
    Which of two conflicting files wins depends on which was looked at first."""
    if item.kind == "junk":
        return ("rejected:not-dicom",)
    rows = by_uid.get(item.sop_instance_uid, [])
    if rows and rows[0][1] != item.sha256:
        return ("rejected:conflict",)
    return ("imported", "duplicate")


def _verify(result: Result, config: Path, items: list[Item]) -> None:
    proc = subprocess.run([*watcher_command(), "-q", "verify", "--json", "--config", str(config)],
                          capture_output=True, text=True, timeout=600)
    result.verify_exit = proc.returncode
    try:
        report = json.loads(proc.stdout)
    except ValueError:
        result.problems.append(f"verify --json printed no JSON (exit {proc.returncode}): "
                               f"{proc.stderr.strip()[-300:]}")
        return
    result.orphans, result.temporary = len(report["orphans"]), len(report["temporary"])
    kinds = {i.sha256: i.kind for i in items}
    result.orphan_kinds = dict(collections.Counter(
        kinds.get(Path(o).stem, "unknown bytes") for o in report["orphans"]))
    if proc.returncode != 0:
        result.problems.append(f"verify exited {proc.returncode}: missing {report['missing'][:5]}, "
                               f"mismatched {report['mismatched'][:5]}")


def _scan_logs(result: Result, logs: Path) -> None:
    """Tracebacks and ERROR lines in the service's own logs (a worker thread may die silently)."""
    seen = collections.Counter()
    for log in sorted(logs.iterdir()):
        for line in log.read_text("utf-8", "replace").splitlines():
            if " ERROR " in line or "Traceback" in line or "Exception in thread" in line:
                key = line.split(": ", 1)[-1][:160] if " ERROR " in line else line[:160]
                if not seen[key]:
                    result.log_errors.append(f"{log.name}: {line[:300]}")
                seen[key] += 1
            if "Exception in thread" in line:
                result.problems.append(f"{log.name}: a thread died: {line[:200]}")


# --- the command line ------------------------------------------------------------

def summary(r: Result) -> str:
    phases = collections.Counter(k.phase for k in r.kills)
    moments = sorted(k.after_s for k in r.kills)
    lines = [
        f"database {r.database}\nwork folder {r.workdir}\nwatcher {r.watcher}",
        f"rounds survived {r.survived}/{r.rounds}; kills after {moments[0] if moments else '-'}–"
        f"{moments[-1] if moments else '-'} s; phases {dict(phases)}",
        f"files dropped {r.files} {r.by_kind}",
        f"imported {r.imported}, duplicates {r.duplicates}, rejected {r.rejected}"
        f" (conflicts won by the later file: {r.conflicts_inverted})",
        f"instance rows {r.instance_rows} for {r.distinct_uids} distinct SOP Instance UIDs",
        f"LOST {r.lost}, DUPLICATED {r.duplicated}, misfiled {r.misfiled}, foreign rows "
        f"{r.foreign_rows}, rows without file {r.rows_without_file}, left in drop {r.left_in_drop}",
        f"verify exit {r.verify_exit}: orphans {r.orphans} {r.orphan_kinds or ''}, "
        f"temporary {r.temporary}",
        f"final run ready after {r.ready_s} s, drained in {r.drained_s} s, "
        f"SIGTERM exit {r.final_exit}; "
        f"folders re-made under the writer {r.folder_races}",
        f"time {r.seconds} s",
    ]
    if r.log_errors:
        lines.append(f"{len(r.log_errors)} distinct ERROR/traceback lines in the service logs:")
        lines += [f"  {e}" for e in r.log_errors[:15]]
    if r.problems:
        lines.append(f"{len(r.problems)} PROBLEMS:")
        lines += [f"  {p}" for p in r.problems[:40]]
    lines.append("OK" if r.ok else "FAILED")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--files", type=int, default=3000)
    parser.add_argument("--db", default="sqlite", help="sqlite, postgresql, or a database URL")
    parser.add_argument("--workdir", type=Path,
                        help="an absent or empty folder (default: a new temporary one)")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--large", type=int, default=None,
                        help="large files (default: files / 200, at least 2)")
    parser.add_argument("--large-mb", type=float, nargs=2, default=(20, 60), metavar=("MIN", "MAX"))
    parser.add_argument("--timeout", type=float, default=600,
                        help="seconds the final run may take to drain")
    parser.add_argument("--pg-server", default=PG_SERVER)
    parser.add_argument("--keep", action="store_true",
                        help="keep the work folder (and PostgreSQL database) even when all is well")
    parser.add_argument("--json", action="store_true", help="print the result as JSON too")
    args = parser.parse_args(argv)
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="crash-harness-"))
    result = run(workdir, args.rounds, args.files, args.db, args.seed, args.large,
                 tuple(args.large_mb), args.timeout, args.pg_server,
                 echo=lambda msg: print(msg, flush=True), keep="always" if args.keep else "failed")
    if args.json:
        print(json.dumps(result.as_dict(), indent=1))
    print(summary(result))
    if result.ok and not args.keep:
        shutil.rmtree(workdir, ignore_errors=True)
    else:
        print(f"kept {workdir}")
    return 0 if result.ok else 1


if __name__ == "__main__":
    sys.exit(main())
