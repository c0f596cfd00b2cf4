"""Study databases at scale: a big catalog built with bulk SQL, the read commands and one
study's move timed on it.

For each backend (SQLite; PostgreSQL when ``backends.POSTGRES_ADMIN`` answers, in a fresh
database ``bench_catalog_<pid>`` dropped afterwards):

1. ``models.connect`` makes the schema (the migrations), ``databases.create`` adds trial-a and
   trial-b; then the rows go in with bulk SQL (``executemany`` in large transactions on
   SQLite, ``COPY`` on PostgreSQL, followed there by the ``VACUUM ANALYZE`` autovacuum would
   have done; SQLite gets no ``ANALYZE``, as the service never runs one). Shape: studies of
   2–6 series of 60–140 instances, one to three studies per patient, the patients spread over
   import (50 %), trial-a (30 %) and trial-b (20 %); what is in a trial also left its empty
   patient, study and series rows in import, as a move does. Two extra studies of 10,000
   instances (``--quick``: 2,000) of 20 series each wait in import, one for the CLI's move and
   one for the in-process move. The total is exactly N instances (1,000,000; ``--quick`` 20,000).
2. ``dicom-watcher databases --json`` and ``status --json`` as subprocesses (wall time, Python
   start-up included; median of 3), ``dicom-watcher --help`` for the start-up alone, and the
   in-process ``databases.listing()`` and ``report.status()``.
3. ``dicom-watcher distribute UID --to trial-a --json``: one ordinary study (~600 instances),
   then the big one; instances/s = the summary's ``moved`` over the wall time; peak RSS is the
   command's VmHWM polled from /proc (flat memory: the big move's peak against the small one's
   and ``--help``'s). Then the other big study in-process with ``distribute.distribute`` to
   trial-b. Every command's answer is checked (counts, instances moved).

Rows are ``results.make_row`` rows (``corpus`` "catalog N", ``files`` = instances) plus
``db``, ``runs_s``, ``peak_rss_mb``, ``target`` and ``met``; ``table`` prints them.
"""

from __future__ import annotations

import datetime
import json
import logging
import os
import random
import shutil
import sqlite3
import statistics
import subprocess
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from .backends import Postgres, Sqlite
from .process import service_command, watcher_code
from .results import _table, make_row

LOGGER = logging.getLogger(__name__)

FULL_SIZE, QUICK_SIZE = 1_000_000, 20_000
FULL_BIG, QUICK_BIG = 10_000, 2_000
READ_TARGET_S = 1.0  # databases and status answer within this, with FULL_SIZE instances
MOVE_TARGET_PER_S = 5_000  # instances moved per second
RUNS = 3
DATABASES = (("import", 0.5), ("trial-a", 0.3), ("trial-b", 0.2))
BIG_SERIES = 20
CHUNK = 50_000  # instance rows per executemany / per COPY progress line
COMMIT_EVERY = 250_000  # SQLite: instance rows per transaction

INSTANCE_COLUMNS = ("id", "database_id", "sop_instance_uid", "sop_class_uid", "series_id",
                    "instance_number", "transfer_syntax_uid", "sha256", "size", "stored_path",
                    "creator", "source", "node", "imported_at", "distributed_by", "distributed_at",
                    "distributed_from", "conflict")
PATIENT_COLUMNS = ("id", "database_id", "patient_id", "issuer", "name", "birth_date", "sex")
STUDY_COLUMNS = ("id", "database_id", "study_instance_uid", "patient_id", "study_date", "study_time",
                 "description", "accession_number", "study_id", "referring_physician")
SERIES_COLUMNS = ("id", "database_id", "series_instance_uid", "study_id", "modality", "series_number",
                  "description", "institution_name", "station_name")
MODALITIES = (("CT", "1.2.840.10008.5.1.4.1.1.2"), ("MR", "1.2.840.10008.5.1.4.1.1.4"),
              ("PT", "1.2.840.10008.5.1.4.1.1.128"))


# -- the catalog's rows ------------------------------------------------------------------------

@dataclass
class SeriesPlan:
    id: int
    database_id: int
    uid: str
    study_uid: str
    modality: int
    count: int  # instances (0: a row a move left behind)
    day: datetime.datetime  # when it was imported
    distributed_from: str | None = None


@dataclass
class Plan:
    """Every patient, study and series row, and what it takes to write the instance rows."""
    total: int
    big: int
    db_ids: dict[str, int]
    patients: list[tuple] = field(default_factory=list)
    studies: list[tuple] = field(default_factory=list)
    series: list[tuple] = field(default_factory=list)
    instance_series: list[SeriesPlan] = field(default_factory=list)
    cli_study: str = ""  # the big study distribute moves as a subprocess
    api_study: str = ""  # the big study moved in-process
    small_study: tuple[str, int] = ("", 0)  # an ordinary import study and its instances

    def instances_in(self, database: str) -> int:
        return sum(s.count for s in self.instance_series if s.database_id == self.db_ids[database])


class Uids:
    def __init__(self, rng: random.Random):
        self.rng = rng

    def __call__(self) -> str:
        return f"2.25.{self.rng.getrandbits(124)}"


def plan_catalog(total: int, big: int, db_ids: dict[str, int], seed: int = 20261203) -> Plan:
    rng = random.Random(seed)
    uid = Uids(rng)
    plan = Plan(total, big, db_ids)
    start = datetime.datetime(2025, 1, 1)
    ordinary = total - 2 * big
    ids = {"patient": 0, "study": 0, "series": 0}

    def next_id(table):
        ids[table] += 1
        return ids[table]

    def add_study(database_id: int, patient: tuple, sizes: list[int], day, study_uid: str,
                  left_in_import: bool):
        """The study's rows in its database, and empty twins in import if it was moved there."""
        homes = [(database_id, sizes)]
        if left_in_import:
            homes.append((db_ids["import"], [0] * len(sizes)))
        series_uids = [uid() for _ in sizes]
        modality = rng.randrange(len(MODALITIES))
        for home, counts in homes:
            patient_row = plan_patient(home, patient)
            study_id = next_id("study")
            plan.studies.append((study_id, home, study_uid, patient_row, day.strftime("%Y%m%d"),
                                 day.strftime("%H%M%S"), "bench study", f"A{study_id}", str(study_id),
                                 "Dr Bench"))
            for number, (series_uid, count) in enumerate(zip(series_uids, counts), 1):
                series_id = next_id("series")
                plan.series.append((series_id, home, series_uid, study_id, MODALITIES[modality][0],
                                    number, f"series {number}", "Bench Hospital", "BENCH1"))
                if count:
                    plan.instance_series.append(SeriesPlan(
                        series_id, home, series_uid, study_uid, modality, count, day,
                        "import" if left_in_import and home != db_ids["import"] else None))

    patient_rows: dict[tuple[int, str], int] = {}

    def plan_patient(database_id: int, patient: tuple) -> int:
        key = (database_id, patient[0])
        if key not in patient_rows:
            patient_rows[key] = next_id("patient")
            plan.patients.append((patient_rows[key], database_id, *patient))
        return patient_rows[key]

    placed, n = 0, 0
    weights = [w for _, w in DATABASES]
    while placed < ordinary:
        n += 1
        patient = (f"P{n:07d}", "", f"BENCH^PATIENT{n}", f"19{rng.randrange(30, 99)}0101",
                   rng.choice("MF"))
        database_id = db_ids[rng.choices([d for d, _ in DATABASES], weights)[0]]
        for _ in range(rng.randint(1, 3)):
            sizes = [rng.randint(60, 140) for _ in range(rng.randint(2, 6))]
            left = ordinary - placed
            while sum(sizes) > left:  # the last study takes what is left
                sizes[-1] -= sum(sizes) - left
                sizes = [s for s in sizes if s > 0]
            if not sizes:
                break
            day = start + datetime.timedelta(minutes=17 * len(plan.studies))
            study_uid = uid()
            add_study(database_id, patient, sizes, day, study_uid,
                      left_in_import=database_id != db_ids["import"])
            if database_id == db_ids["import"] and not plan.small_study[0] and sum(sizes) >= 300:
                plan.small_study = (study_uid, sum(sizes))
            placed += sum(sizes)
    for which in ("cli_study", "api_study"):
        n += 1
        patient = (f"P{n:07d}", "", f"BENCH^BIG{n}", "19700101", "F")
        per = [big // BIG_SERIES + (1 if i < big % BIG_SERIES else 0) for i in range(BIG_SERIES)]
        study_uid = uid()
        add_study(db_ids["import"], patient, per, start + datetime.timedelta(days=380), study_uid, False)
        setattr(plan, which, study_uid)
    assert sum(s.count for s in plan.instance_series) == total
    return plan


def instance_rows(plan: Plan, seed: int = 7):
    """Every instance row (``INSTANCE_COLUMNS``), timestamps as text."""
    rng = random.Random(seed)
    uid = Uids(rng)
    next_id = 0
    for s in plan.instance_series:
        sop_class = MODALITIES[s.modality][1]
        moved_at = None
        if s.distributed_from:
            moved_at = str(s.day + datetime.timedelta(days=2, microseconds=1))
        for number in range(1, s.count + 1):
            next_id += 1
            sha = f"{rng.getrandbits(256):064x}"
            at = s.day + datetime.timedelta(milliseconds=20 * number, microseconds=1)
            yield (next_id, s.database_id, uid(), sop_class, s.id, number, "1.2.840.10008.1.2.1", sha,
                   rng.randint(200_000, 600_000), f"{s.day:%Y/%m/%d}/{sha}.dcm", "dcmtk",
                   f"incoming/{s.study_uid}/{s.uid}/{number:05d}.dcm", "bench", str(at),
                   "bench" if moved_at else None, moved_at, s.distributed_from, "")


def _chunks(rows, size: int):
    chunk = []
    for row in rows:
        chunk.append(row)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def _insert_sql(table: str, columns: tuple[str, ...], param: str) -> str:
    quoted = ", ".join(f'"{c}"' for c in columns)
    return f'INSERT INTO "{table}" ({quoted}) VALUES ({", ".join([param] * len(columns))})'


def _prepare(url: str) -> dict[str, int]:
    """The schema (the migrations) and the two trial databases, through the service's code."""
    from watcher import models
    from watcher.studies import databases

    models.connect(url)
    try:
        for name, _ in DATABASES[1:]:
            databases.create(name, description=f"bench {name}")
        return {d.name: d.id for d in models.StudyDatabase.select()}
    finally:
        models.database.close()


def build_sqlite(path: Path, plan: Plan) -> None:
    conn = sqlite3.connect(path, isolation_level=None)
    try:
        conn.execute("PRAGMA synchronous = OFF")
        conn.execute("PRAGMA cache_size = -1000000")  # 1 GB while building
        conn.execute("BEGIN")
        for table, columns, rows in (("patient", PATIENT_COLUMNS, plan.patients),
                                     ("study", STUDY_COLUMNS, plan.studies),
                                     ("series", SERIES_COLUMNS, plan.series)):
            conn.executemany(_insert_sql(table, columns, "?"), rows)
        written = 0
        for chunk in _chunks(instance_rows(plan), CHUNK):
            conn.executemany(_insert_sql("instance", INSTANCE_COLUMNS, "?"), chunk)
            written += len(chunk)
            if written % COMMIT_EVERY == 0:
                conn.execute("COMMIT")
                LOGGER.info("sqlite catalog: %d of %d instances", written, plan.total)
                conn.execute("BEGIN")
        conn.execute("COMMIT")
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    finally:
        conn.close()


def build_postgres(url: str, plan: Plan) -> None:
    import psycopg

    with psycopg.connect(url) as conn:
        conn.execute("SET synchronous_commit = off")
        with conn.cursor() as cur:
            for table, columns, rows in (("patient", PATIENT_COLUMNS, plan.patients),
                                         ("study", STUDY_COLUMNS, plan.studies),
                                         ("series", SERIES_COLUMNS, plan.series),
                                         ("instance", INSTANCE_COLUMNS, instance_rows(plan))):
                quoted = ", ".join(f'"{c}"' for c in columns)
                with cur.copy(f'COPY "{table}" ({quoted}) FROM STDIN') as copy:
                    for i, row in enumerate(rows, 1):
                        copy.write_row(row)
                        if table == "instance" and i % COMMIT_EVERY == 0:
                            LOGGER.info("postgres catalog: %d of %d instances", i, plan.total)
            for table in ("patient", "study", "series", "instance"):  # ids were given explicitly
                cur.execute(f"SELECT setval(pg_get_serial_sequence('{table}', 'id'), "
                            f'(SELECT max("id") FROM "{table}"))')
        conn.commit()
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("VACUUM ANALYZE")  # what autovacuum would have done by now


# -- timing ------------------------------------------------------------------------------------

@dataclass
class Ran:
    seconds: float
    peak_rss_mb: float
    stdout: str
    code: int


def _peak_kb(pid: int) -> int:
    """VmHWM of a live process (0 once it has exited: a zombie has no memory left to read)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def run_cli(args: list[str], cwd: Path, poll_seconds: float = 0.005) -> Ran:
    """One ``dicom-watcher`` command; wall time from spawn to reaping. Peak RSS is its VmHWM
    read every 5 ms while it runs: the ``ru_maxrss`` of ``wait4`` would not do, since Linux
    counts in it the memory of the forked copy of this (larger) process before the exec."""
    with tempfile.TemporaryFile() as err:
        started = time.perf_counter()
        proc = subprocess.Popen([*service_command(), *args], stdin=subprocess.DEVNULL,
                                stdout=subprocess.PIPE, stderr=err, cwd=cwd)
        peak = [0]
        reader = threading.Thread(target=lambda: peak.append(proc.stdout.read()), daemon=True)
        reader.start()
        while proc.poll() is None:
            peak[0] = max(peak[0], _peak_kb(proc.pid))
            time.sleep(poll_seconds)
        seconds = time.perf_counter() - started
        reader.join()
        proc.stdout.close()
        err.seek(0)
        if proc.returncode not in (0, 3):  # 3: distribute left conflicts behind
            raise RuntimeError(f"dicom-watcher {' '.join(args)} exited with {proc.returncode}: "
                               f"{err.read().decode(errors='replace')[-2000:]}")
    return Ran(seconds, round(peak[0] / 1024, 1), peak[1].decode(), proc.returncode)


def repeat(call, runs: int = RUNS):
    """``runs`` results of ``call()`` -> (median seconds, all seconds, the last result)."""
    results = [call() for _ in range(runs)]
    seconds = [r.seconds for r in results]
    return statistics.median(seconds), seconds, results[-1]


@dataclass
class Timed:
    seconds: float
    value: object = None


def timed(call) -> Timed:
    started = time.perf_counter()
    value = call()
    return Timed(time.perf_counter() - started, value)


def write_config(folder: Path, url: str) -> Path:
    for name in ("drop", "archive", "rejected"):
        (folder / name).mkdir(parents=True, exist_ok=True)
    text = json.dumps  # a JSON string is a valid TOML basic string
    path = folder / "watcher.toml"
    path.write_text(f"[watch]\ndrop_dir = {text(str(folder / 'drop'))}\n"
                    f"[archive]\ndir = {text(str(folder / 'archive'))}\n"
                    f"rejected_dir = {text(str(folder / 'rejected'))}\n"
                    f"[database]\nurl = {text(url)}\n")
    return path


def _row(label: str, db: str, what: str, *, instances: int, catalog: int, seconds: float,
         runs=None, rss=None, target=None, met=None, **extra) -> dict:
    row = make_row(f"catalog {label}", what, files=instances, bytes_=0, seconds=seconds,
                   moves_bytes=False)
    row.update(db=db, catalog_instances=catalog, runs_s=[round(s, 4) for s in (runs or [seconds])],
               peak_rss_mb=rss, target=target, met=met, load_1m=[None, round(os.getloadavg()[0], 2)],
               **extra)
    return row


def measure_backend(backend, folder: Path, total: int, big: int, label: str) -> list[dict]:
    from watcher import models, report
    from watcher.studies import databases, distribute

    rows = []
    folder.mkdir(parents=True, exist_ok=True)
    url = backend.create(folder)
    db = backend.name
    scale = total == FULL_SIZE  # the targets are stated for 1,000,000 instances, a 10,000-instance study

    def add(what, **kw):
        rows.append(_row(label, db, what, catalog=total, **kw))
        LOGGER.info("catalog %s %s: %s", db, what, {k: rows[-1][k] for k in ("seconds", "files_per_s",
                                                                             "peak_rss_mb", "met")})

    started = time.perf_counter()
    db_ids = _prepare(url)
    plan = plan_catalog(total, big, db_ids)
    planned = time.perf_counter() - started
    (build_sqlite(backend.path, plan) if db == "sqlite" else build_postgres(url, plan))
    built = time.perf_counter() - started
    add("build: bulk SQL", instances=total, seconds=built, rate=True, plan_s=round(planned, 2),
        patients=len(plan.patients), studies=len(plan.studies), series=len(plan.series))
    config = ["--config", str(write_config(folder, url))]

    median, runs, ran = repeat(lambda: run_cli(["--help"], folder))
    add("CLI --help (start-up alone)", instances=0, seconds=median, runs=runs, rss=ran.peak_rss_mb)
    for command in ("databases", "status"):
        median, runs, ran = repeat(lambda: run_cli([command, "--json", *config], folder))
        answer = json.loads(ran.stdout)
        listed = answer if command == "databases" else answer["databases"]
        counted = sum(d["instances"] for d in listed)
        if counted != total:
            raise RuntimeError(f"{command} counted {counted} instances, not {total}")
        add(f"CLI {command} --json", instances=total, seconds=median, runs=runs, rss=ran.peak_rss_mb,
            target=f"< {READ_TARGET_S:g} s" if scale else None,
            met=(median < READ_TARGET_S) if scale else None)

    models.connect(url, readonly=True)
    try:
        for what, call in (("databases.listing()", databases.listing),
                           ("report.status()", report.status)):
            median, runs, _ = repeat(lambda: timed(call))
            add(f"in-process {what}", instances=total, seconds=median, runs=runs,
                target=f"< {READ_TARGET_S:g} s" if scale else None,
                met=(median < READ_TARGET_S) if scale else None)
    finally:
        models.database.close()

    small_uid, small_count = plan.small_study
    for what, uid, count in (("ordinary study", small_uid, small_count), ("big study", plan.cli_study, big)):
        ran = run_cli(["distribute", uid, "--to", "trial-a", "--json", *config], folder)
        summary = json.loads(ran.stdout)
        if summary["moved"] != count:
            raise RuntimeError(f"distribute moved {summary['moved']} of {count} instances: {summary}")
        judged = scale and what == "big study"
        add(f"CLI distribute {what} -> trial-a", instances=summary["moved"], seconds=ran.seconds, rate=True,
            rss=ran.peak_rss_mb, target=f">= {MOVE_TARGET_PER_S:,}/s" if judged else None,
            met=(summary["moved"] / ran.seconds >= MOVE_TARGET_PER_S) if judged else None)

    models.connect(url)
    try:
        done = timed(lambda: distribute.distribute(keys=[plan.api_study], to="trial-b", source="import",
                                                   kind="study", actor="bench"))
        if done.value["moved"] != big:
            raise RuntimeError(f"distribute moved {done.value['moved']} of {big}: {done.value}")
        add("in-process distribute big study -> trial-b", instances=big, seconds=done.seconds, rate=True,
            target=f">= {MOVE_TARGET_PER_S:,}/s" if scale else None,
            met=(big / done.seconds >= MOVE_TARGET_PER_S) if scale else None)
        after = {d["name"]: d["instances"] for d in databases.listing()}
        expected = {name: plan.instances_in(name) for name, _ in DATABASES}
        expected["import"] -= small_count + 2 * big
        expected["trial-a"] += small_count + big
        expected["trial-b"] += big
        if after != expected:
            raise RuntimeError(f"after the moves the databases hold {after}, not {expected}")
    finally:
        models.database.close()
    return rows


def measure(quick: bool, backends: tuple[str, ...] = ("sqlite", "postgres"),
            workdir: Path | None = None) -> list[dict]:
    """Every backend's rows; PostgreSQL is skipped (one row saying why) when no server answers."""
    total, big = (QUICK_SIZE, QUICK_BIG) if quick else (FULL_SIZE, FULL_BIG)
    label = f"{total:,}"
    root = Path(tempfile.mkdtemp(prefix="dicom-bench-catalog-", dir=workdir))
    rows = []
    try:
        for name in backends:
            if name == "sqlite":
                backend = Sqlite()
            elif name == "postgres":
                reason = Postgres.unavailable()
                if reason:
                    rows.append(_row(label, name, "skipped", instances=0, catalog=total, seconds=0,
                                     skipped=reason))
                    continue
                backend = Postgres()
                backend.dbname = f"bench_catalog_{os.getpid()}"
            else:
                raise ValueError(f"unknown backend {name!r}; choose from sqlite, postgres")
            try:
                rows += measure_backend(backend, root / name, total, big, label)
            finally:
                backend.drop()
    finally:
        shutil.rmtree(root, ignore_errors=True)
    code = watcher_code()  # the service's code is being changed while benchmarks run
    for row in rows:
        row["watcher_code"] = code
    return rows


def table(rows: list[dict]) -> str:
    """The catalog rows as markdown: seconds are the median (and range) of the runs; instances/s
    only where instances were written or moved (a query's is not a rate)."""
    def seconds(row):
        runs = row["runs_s"]
        spread = f" ({min(runs):.3f}–{max(runs):.3f})" if len(runs) > 1 else ""
        return f"{row['seconds']:.3f}{spread}"

    def met(row):
        return None if row["met"] is None else ("yes" if row["met"] else "**no**")

    lines = []
    for row in rows:
        if row.get("skipped"):
            lines.append((row["db"], f"skipped: {row['skipped']}") + (None,) * 7)
            continue
        lines.append((row["db"], row["what"], row["catalog_instances"], row["files"] or None,
                      seconds(row), row["files_per_s"] if row.get("rate") else None, row["peak_rss_mb"],
                      row["target"], met(row)))
    headers = ("db", "what", "catalog instances", "instances", "seconds (median, min–max)",
               "instances/s", "peak RSS MB", "target", "met")
    return _table(headers, lines)
