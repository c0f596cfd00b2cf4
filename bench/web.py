"""The web app and DICOMweb against a big catalog (issue 14): the real service, timed with httpx.

For each backend (SQLite; PostgreSQL when ``backends.POSTGRES_ADMIN`` answers, in a fresh
database ``bench_web_<pid>`` dropped afterwards):

1. A catalog of 1,000,000 instances (``--quick``: 20,000) built with bench/catalog.py's
   ``plan_catalog`` and bulk SQL, a manager ``boss`` made with ``users add --manager
   --password-stdin`` and a token with ``users token``.
2. ``dicom-watcher run`` with an [http] section (one importer process). One large original
   (2 GB; ``--quick`` 200 MB; bench/corpus.py's ``make_large``, written 1 MiB at a time) is
   renamed into the drop folder and imported by the service before anything is timed.
3. With one httpx client each (after 10 requests of warm-up; each answer checked): the study
   search ``/api/databases/import/studies?patient=…&limit=50`` (another patient every request),
   a page deep in the list (``offset`` = the last full page), the dashboard ``/`` as a signed-in
   manager (session cookie) and QIDO-RS ``/dicom-web/import/studies?PatientID=…``: p50 and p99
   (nearest rank) over 200 requests. Targets: p99 < 100 ms for the API, < 200 ms for ``/``.
4. The large original's disk read speed (1 MiB reads) and its WADO-RS retrieval (curl into
   /dev/null), both after ``posix_fadvise(DONTNEED)`` took it out of the page cache ("cold"; the
   resident bytes ``fincore`` saw just before are recorded), five rounds in turn, then both
   warm. Target: the median WADO-RS >= 80 % of the median disk read. The zip of its study
   likewise (cold). While each runs the service's processes' VmRSS is polled every 10 ms:
   target < 100 MB (flat memory).

Every row carries the 1-minute load average at its start and end (``load_1m``).
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import signal
import statistics
import subprocess
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import pydicom

from . import catalog, corpus
from .backends import Postgres, Sqlite
from .process import descendants, service_command, watcher_code
from .receive import free_port, percentile
from .results import _table

LOGGER = logging.getLogger(__name__)

FULL_LARGE, QUICK_LARGE = 2_000_000_000, 200_000_000
REQUESTS, WARM_UP = 200, 10
LATENCY_TARGET_MS = {"api": 100, "page": 200}
WADO_TARGET = 0.8  # of the disk's sequential read speed
RSS_TARGET_MB = 100
READ_CHUNK = 1 << 20
COLD_ROUNDS = 5
PASSWORD = "bench web password"
MANAGER = "boss"


def _load() -> float:
    return round(os.getloadavg()[0], 2)


# -- the service -------------------------------------------------------------------------------

@dataclass
class Site:
    url: str
    proc: subprocess.Popen
    config: Path
    archive: Path
    token: str
    log: Path


def _cli(config: Path, *args: str, input: str | None = None) -> str:
    done = subprocess.run([*service_command(), *args, "--config", str(config)], input=input,
                          capture_output=True, text=True, timeout=300)
    if done.returncode != 0:
        raise RuntimeError(f"dicom-watcher {' '.join(args)} exited with {done.returncode}: "
                           f"{done.stderr[-2000:]}")
    return done.stdout


def start_site(folder: Path, url: str, log: Path) -> Site:
    config = catalog.write_config(folder, url)
    port = free_port()
    with config.open("a") as f:
        f.write(f'[import]\nprocesses = 1\n[http]\nbind = "127.0.0.1"\nport = {port}\n')
    _cli(config, "users", "add", MANAGER, "--manager", "--password-stdin", input=PASSWORD + "\n")
    token = _cli(config, "users", "token", MANAGER).strip().splitlines()[-1]
    log.parent.mkdir(parents=True, exist_ok=True)
    proc = subprocess.Popen([*service_command(), "run", "--config", str(config)],
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=log.open("wb"))
    site = Site(f"http://127.0.0.1:{port}", proc, config, folder / "archive", token, log)
    deadline = time.monotonic() + 120
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"the service exited with {proc.returncode}: {log.read_text()[-2000:]}")
        try:
            httpx.get(site.url + "/healthz", timeout=5)
            return site
        except httpx.TransportError:
            if time.monotonic() > deadline:
                stop_site(site)
                raise RuntimeError(f"the web app did not answer within 120 s; see {log}")
            time.sleep(0.2)


def stop_site(site: Site) -> None:
    if site.proc.poll() is None:
        site.proc.send_signal(signal.SIGTERM)
        try:
            site.proc.wait(60)
        except subprocess.TimeoutExpired:
            site.proc.kill()
            site.proc.wait()


def import_large(site: Site, source: Path, timeout: float) -> tuple[pydicom.Dataset, Path, float]:
    """Rename ``source`` into the drop folder; wait until the service has it in import.
    -> its header, its original in the archive, the seconds the import took."""
    ds = pydicom.dcmread(source, stop_before_pixels=True)
    size = source.stat().st_size
    started = time.perf_counter()
    os.rename(source, site.config.parent / "drop" / source.name)
    path = f"/api/databases/import/studies/{ds.StudyInstanceUID}"
    with httpx.Client(base_url=site.url, headers=_bearer(site.token), timeout=30) as client:
        while client.get(path).status_code != 200:
            if site.proc.poll() is not None or time.perf_counter() - started > timeout:
                raise RuntimeError(f"the large file was not imported within {timeout:.0f} s; "
                                   f"see {site.log}")
            time.sleep(0.5)
    seconds = time.perf_counter() - started
    originals = [p for p in site.archive.rglob("*") if p.is_file() and p.stat().st_size == size]
    if len(originals) != 1:
        raise RuntimeError(f"expected one {size}-byte original in {site.archive}, found {originals}")
    return ds, originals[0], seconds


def _bearer(token: str) -> dict:
    return {"Authorization": f"Bearer {token}"}


def sign_in(url: str) -> httpx.Client:
    """A client holding a manager's session cookie, signed in through the form like a browser."""
    client = httpx.Client(base_url=url, timeout=60)
    form = client.get("/login")
    csrf = re.search(r'name="csrf" value="([^"]+)"', form.text)[1]
    answer = client.post("/login", data={"name": MANAGER, "password": PASSWORD, "csrf": csrf})
    if answer.status_code != 303:
        raise RuntimeError(f"sign-in answered {answer.status_code}: {answer.text[:500]}")
    return client


# -- measuring ---------------------------------------------------------------------------------

class RssPoller:
    """The largest VmRSS of any of the service's processes, read every 10 ms while running."""

    def __init__(self, pid: int, interval: float = 0.01):
        self.pid, self.interval = pid, interval
        self.peak_kb, self.before_kb = 0, self._max_rss()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _max_rss(self) -> int:
        biggest = 0
        for pid in [self.pid, *descendants(self.pid)]:
            try:
                for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                    if line.startswith("VmRSS:"):
                        biggest = max(biggest, int(line.split()[1]))
            except OSError:
                pass
        return biggest

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak_kb = max(self.peak_kb, self._max_rss())
            self._stop.wait(self.interval)

    def __enter__(self) -> "RssPoller":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak_kb = max(self.peak_kb, self._max_rss())


def drop_from_cache(path: Path) -> int | None:
    """Ask the kernel to forget ``path``'s pages; -> the bytes still resident (fincore), if known."""
    os.sync()
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)
    return resident_bytes(path)


def resident_bytes(path: Path) -> int | None:
    if not shutil.which("fincore"):
        return None
    done = subprocess.run(["fincore", "--bytes", "--noheadings", "--output", "RES", str(path)],
                          capture_output=True, text=True)
    try:
        return int(done.stdout.split()[0])
    except (IndexError, ValueError):
        return None


def read_speed(path: Path) -> tuple[int, float]:
    """Read the whole file in 1 MiB reads: -> bytes, seconds."""
    total, started = 0, time.perf_counter()
    with path.open("rb", buffering=0) as f:
        while chunk := f.read(READ_CHUNK):
            total += len(chunk)
    return total, time.perf_counter() - started


def download(url: str, token: str, pid: int) -> tuple[int, float, RssPoller]:
    """GET ``url`` with curl into /dev/null: -> bytes, seconds, the service's memory meanwhile.

    curl, not httpx: httpx reads a body at about 300 MB/s on this machine, so it measured
    itself, not the service (session 8: 283-369 MB/s with httpx against 940-1,460 with curl).
    """
    with RssPoller(pid) as rss:
        started = time.perf_counter()
        done = subprocess.run(["curl", "--silent", "--show-error", "--fail", "--output", "/dev/null",
                               "--write-out", "%{size_download}", "--header", f"Authorization: Bearer {token}",
                               url], capture_output=True, text=True, timeout=600)
        seconds = time.perf_counter() - started
    if done.returncode != 0:
        raise RuntimeError(f"GET {url}: curl exited with {done.returncode}: {done.stderr[-500:]}")
    return int(done.stdout), seconds, rss


def latencies(client: httpx.Client, paths: list[str], check) -> list[float]:
    """Seconds per request, ``paths`` in turn (after ``WARM_UP`` untimed); every answer checked."""
    for path in paths[:WARM_UP]:
        check(client.get(path))
    times = []
    for i in range(REQUESTS):
        path = paths[i % len(paths)]
        started = time.perf_counter()
        answer = client.get(path)
        times.append(time.perf_counter() - started)
        check(answer)
    return times


def _ok_json(key: str):
    def check(answer: httpx.Response):
        if answer.status_code != 200 or key not in answer.text:
            raise RuntimeError(f"{answer.request.url} answered {answer.status_code}: {answer.text[:500]}")
    return check


# -- rows --------------------------------------------------------------------------------------

def _row(db: str, what: str, catalog_size: int, load_start: float, **values) -> dict:
    row = {"corpus": f"web {catalog_size:,}", "db": db, "what": what, "catalog_instances": catalog_size,
           "requests": None, "p50_ms": None, "p99_ms": None, "bytes": None, "seconds": None,
           "mb_per_s": None, "vs_disk": None, "peak_rss_mb": None, "rss_before_mb": None,
           "target": None, "met": None}
    row.update(values, load_1m=[load_start, _load()])
    LOGGER.info("web %s %s: %s", db, what, {k: v for k, v in row.items() if v is not None and k in (
        "p50_ms", "p99_ms", "mb_per_s", "vs_disk", "peak_rss_mb", "met")})
    return row


def latency_row(db, what, size, load_start, times, target_ms) -> dict:
    p99 = percentile(times, 99) * 1000
    return _row(db, what, size, load_start, requests=len(times),
                p50_ms=round(statistics.median(times) * 1000, 1), p99_ms=round(p99, 1),
                runs_ms=[round(t * 1000, 2) for t in times],
                target=f"p99 < {target_ms} ms" if target_ms else None,
                met=(p99 < target_ms) if target_ms else None)


def transfer_row(db, what, size, load_start, total, seconds, rss=None, disk=None, judged=True,
                 **extra) -> dict:
    """``disk``: the disk's MB/s to hold this against (the target only when ``judged``: a warm
    page cache reads at memory speed, so there the ratio is only shown)."""
    mb_per_s = total / seconds / 1e6
    values = dict(bytes=total, seconds=round(seconds, 3), mb_per_s=round(mb_per_s, 1), **extra)
    targets, met = [], []
    if disk:
        values["vs_disk"] = round(mb_per_s / disk, 3)
        if judged:
            targets.append(f">= {WADO_TARGET:.0%} of disk")
            met.append(mb_per_s / disk >= WADO_TARGET)
    if rss is not None:
        values.update(peak_rss_mb=round(rss.peak_kb / 1024, 1), rss_before_mb=round(rss.before_kb / 1024, 1))
        targets.append(f"RSS < {RSS_TARGET_MB} MB")
        met.append(rss.peak_kb / 1024 < RSS_TARGET_MB)
    if targets:
        values.update(target=", ".join(targets), met=all(met))
    return _row(db, what, size, load_start, **values)


# -- one backend -------------------------------------------------------------------------------

def measure_backend(backend, folder: Path, total: int, big: int, large: int, log: Path) -> list[dict]:
    rows: list[dict] = []
    db = backend.name
    folder.mkdir(parents=True, exist_ok=True)
    url = backend.create(folder)

    load = _load()
    started = time.perf_counter()
    plan = catalog.plan_catalog(total, big, catalog._prepare(url))
    (catalog.build_sqlite(backend.path, plan) if db == "sqlite" else catalog.build_postgres(url, plan))
    rows.append(_row(db, "build catalog (bulk SQL)", total, load, seconds=round(time.perf_counter() - started, 2)))

    load = _load()
    source = corpus.make_large(folder / "source", (large,))[0]
    os.sync()
    site = start_site(folder, url, log)
    try:
        ds, original, seconds = import_large(site, source, timeout=max(300.0, large / 5e6))
        rows.append(transfer_row(db, "import of the large file (drop folder, polled every 0.5 s)", total, load,
                                 original.stat().st_size, seconds))
        rows += _latencies(site, plan, db, total)
        rows += _transfers(site, ds, original, db, total)
    finally:
        stop_site(site)
    problems = [line for line in log.read_text(errors="replace").splitlines()
                if re.search(r"\b(ERROR|CRITICAL)\b|Traceback", line)]
    for row in rows:
        row["log_problems"] = len(problems)
    return rows


def _latencies(site: Site, plan: catalog.Plan, db: str, total: int) -> list[dict]:
    rows = []
    import_db = plan.db_ids["import"]  # one patient per request, each with studies held in import
    held = {s.study_uid for s in plan.instance_series if s.database_id == import_db}
    study_patient = {study[0]: study[3] for study in plan.studies}  # study id -> patient row id
    patient_ids = {p[0]: p[2] for p in plan.patients}
    studies_held = [study for study in plan.studies if study[1] == import_db and study[2] in held]
    patients = list(dict.fromkeys(patient_ids[study_patient[s[0]]] for s in studies_held))
    patients = [patients[i * len(patients) // REQUESTS] for i in range(REQUESTS)] \
        if len(patients) >= REQUESTS else patients

    with httpx.Client(base_url=site.url, headers=_bearer(site.token), timeout=60) as client:
        load = _load()
        times = latencies(client, [f"/api/databases/import/studies?patient={p}&limit=50" for p in patients],
                          _ok_json('"studies"'))
        rows.append(latency_row(db, "API study search ?patient=…&limit=50", total, load, times,
                                LATENCY_TARGET_MS["api"]))

    # The same on a new connection each time: what the app itself takes, without what a kept-alive
    # connection adds (on this code ~40 ms: see docs/benchmarks.md, issue 14). No target.
    closing = {**_bearer(site.token), "Connection": "close"}
    with httpx.Client(base_url=site.url, headers=closing, timeout=60) as client:
        load = _load()
        times = latencies(client, [f"/api/databases/import/studies?patient={p}&limit=50" for p in patients],
                          _ok_json('"studies"'))
        rows.append(latency_row(db, "API study search, a new connection each", total, load, times, None))

    with httpx.Client(base_url=site.url, headers=_bearer(site.token), timeout=60) as client:
        listed = client.get("/api/databases/import/studies?limit=1").json()["total"]
        offset = max(0, (listed - 1) // 50 * 50)
        load = _load()
        times = latencies(client, [f"/api/databases/import/studies?limit=50&offset={offset}"],
                          _ok_json('"studies"'))
        rows.append(latency_row(db, f"API page offset={offset:,} of {listed:,} studies", total, load,
                                times, LATENCY_TARGET_MS["api"]))
        rows[-1].update(offset=offset, studies_listed=listed)

        load = _load()
        times = latencies(client, [f"/dicom-web/import/studies?PatientID={p}" for p in patients],
                          _ok_json('"0020000D"'))
        rows.append(latency_row(db, "QIDO-RS studies?PatientID=…", total, load, times, None))

    def page(answer: httpx.Response):
        if answer.status_code != 200 or "csrf" not in answer.text:
            raise RuntimeError(f"/ answered {answer.status_code}: {answer.text[:500]}")

    browser = sign_in(site.url)
    try:
        load = _load()
        times = latencies(browser, ["/"], page)
    finally:
        browser.close()
    rows.append(latency_row(db, "dashboard / (signed-in manager)", total, load, times,
                            LATENCY_TARGET_MS["page"]))
    return rows


def _transfers(site: Site, ds: pydicom.Dataset, original: Path, db: str, total: int) -> list[dict]:
    """The disk read and WADO-RS, cold, ``COLD_ROUNDS`` times in turn, then both warm, then the
    zip of the study cold. This disk's cold read speed varies from one read to the next
    (0.8-2.4 GB/s within a minute, session 8): each WADO-RS row is shown against the read just
    before it, and the target is judged on the median WADO-RS against the median read."""
    rows = []
    pid = site.proc.pid
    study, series, sop = ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID
    wado = f"{site.url}/dicom-web/import/studies/{study}/series/{series}/instances/{sop}"
    archive = f"{site.url}/api/databases/import/studies/{study}/archive"
    size = original.stat().st_size

    def disk_then_wado(cache: str) -> tuple[dict, dict]:
        resident = drop_from_cache(original) if cache == "cold" else resident_bytes(original)
        load = _load()
        read, seconds = read_speed(original)
        disk = transfer_row(db, f"disk read 1 MiB ({cache})", total, load, read, seconds,
                            cache=cache, resident_before=resident)
        resident = drop_from_cache(original) if cache == "cold" else resident_bytes(original)
        load = _load()
        got, seconds, rss = download(wado, site.token, pid)
        if got < size:
            raise RuntimeError(f"WADO-RS sent {got} bytes for a {size}-byte original")
        return disk, transfer_row(db, f"WADO-RS instance ({cache})", total, load, got, seconds, rss=rss,
                                   disk=disk["mb_per_s"], judged=False, cache=cache, resident_before=resident)

    disks, wados = [], []
    for _ in range(COLD_ROUNDS):
        disk, got = disk_then_wado("cold")
        rows += [disk, got]
        disks.append(disk["mb_per_s"])
        wados.append(got["mb_per_s"])
    rss_met = all(r["met"] for r in rows if r.get("met") is not None)
    ratio = statistics.median(wados) / statistics.median(disks)
    rows.append(_row(db, f"WADO-RS instance (cold), median of {COLD_ROUNDS} rounds", total, _load(),
                     mb_per_s=statistics.median(wados), disk_mb_per_s=statistics.median(disks),
                     vs_disk=round(ratio, 3), disk_rounds=disks, wado_rounds=wados,
                     target=f">= {WADO_TARGET:.0%} of disk (medians), RSS < {RSS_TARGET_MB} MB",
                     met=ratio >= WADO_TARGET and rss_met))
    rows += disk_then_wado("warm")
    resident = drop_from_cache(original)
    load = _load()
    got, seconds, rss = download(archive, site.token, pid)
    if got < size:
        raise RuntimeError(f"the zip was {got} bytes for a {size}-byte original")
    rows.append(transfer_row(db, "zip of the study (cold)", total, load, got, seconds, rss=rss,
                             cache="cold", resident_before=resident))
    return rows


def measure(quick: bool, backends: tuple[str, ...] = ("sqlite", "postgres"), workdir: Path | None = None,
            log_dir: Path | None = None) -> list[dict]:
    """Every backend's rows; PostgreSQL is skipped (one row saying why) when no server answers."""
    total, big = (catalog.QUICK_SIZE, catalog.QUICK_BIG) if quick else (catalog.FULL_SIZE, catalog.FULL_BIG)
    large = QUICK_LARGE if quick else FULL_LARGE
    root = Path(tempfile.mkdtemp(prefix="dicom-bench-web-", dir=workdir))
    log_dir = log_dir or root / "logs"
    logging.getLogger("httpx").setLevel(logging.WARNING)  # not a line per request
    rows = []
    try:
        for name in backends:
            if name == "sqlite":
                backend = Sqlite()
            elif name == "postgres":
                reason = Postgres.unavailable()
                if reason:
                    rows.append(_row(name, "skipped", total, _load(), skipped=reason))
                    continue
                backend = Postgres()
                backend.dbname = f"bench_web_{os.getpid()}"
            else:
                raise ValueError(f"unknown backend {name!r}; choose from sqlite, postgres")
            try:
                rows += measure_backend(backend, root / name, total, big, large, log_dir / f"web-{name}.log")
            finally:
                backend.drop()
    finally:
        shutil.rmtree(root, ignore_errors=True)
    code = watcher_code()
    for row in rows:
        row["watcher_code"] = code
    return rows


def table(rows: list[dict]) -> str:
    def met(row):
        return None if row["met"] is None else ("yes" if row["met"] else "**no**")

    def load(row):
        return "→".join(f"{v:.2f}" for v in row["load_1m"])

    lines = []
    for row in rows:
        if row.get("skipped"):
            lines.append((row["db"], f"skipped: {row['skipped']}") + (None,) * 10)
            continue
        mb = row["bytes"] / 1e6 if row["bytes"] else None
        lines.append((row["db"], row["what"], row["requests"] or mb, row["p50_ms"], row["p99_ms"],
                      row["seconds"] if not row["requests"] else None, row["mb_per_s"],
                      f"{row['vs_disk']:.0%}" if row["vs_disk"] is not None else None,
                      f"{row['peak_rss_mb']} (idle {row['rss_before_mb']})" if row["peak_rss_mb"] else None,
                      f"{row['target']}: {met(row)}" if row["target"] else None, load(row)))
    headers = ("db", "what", "requests / MB", "p50 ms", "p99 ms", "seconds", "MB/s", "vs disk",
               "peak RSS MB", "target: met", "load 1m")
    out = _table(headers, lines)
    measured = [r for r in rows if not r.get("skipped")]
    if measured:
        cold = [r.get("resident_before") for r in measured if r.get("cache") == "cold"]
        out += (f"\n\n{measured[0]['catalog_instances']:,} instances in the catalog; latencies over "
                f"{REQUESTS} requests on one client after {WARM_UP} untimed (p99 = nearest rank); MB = 10^6 "
                f"bytes; cold = after posix_fadvise(DONTNEED) (bytes still resident then: {cold}); "
                f"peak RSS = the largest VmRSS of any service process, polled every 10 ms; "
                f"WADO-RS vs disk = against the disk read in the same cache state just before.")
        codes = list(dict.fromkeys(r["watcher_code"] for r in measured if r.get("watcher_code")))
        out += f"\ndicom-watcher code: {', '.join(codes)}"
        problems = max(r.get("log_problems", 0) for r in measured)
        if problems:
            out += f"\nthe service logged {problems} ERROR/Traceback line(s): see its log"
    return out
