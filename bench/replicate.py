"""Replication (issue 15) in one run: ``dicom-watcher replicate`` pulling from another
dicom-watcher and from Orthanc over loopback, beside the durable-copy limit of the same files
on the same disk.

The sources, each a process of its own on free ports of 127.0.0.1, storing under scratch:

- **a second dicom-watcher**: ``run`` with ``[http]`` on its own SQLite catalog and archive;
  the corpus is copied into its drop folder and imported by ``scan --final`` before it starts;
  a manager account (``users add --manager --password-stdin``) gives the token
  (``users token``). Its root: ``/dicom-web/import/``. Replication checks every original's
  sha256 against its API.
- **Orthanc** (``/usr/sbin/Orthanc``) with its DICOMweb plugin, the same small corpus uploaded
  by ``POST /instances`` (not timed as part of a case).

The cases, each into a fresh local site (a config, an empty SQLite catalog and archive: no
service runs there), each the real command ``dicom-watcher replicate --from URL [--token T]
--study UID… --json`` as a subprocess:

- **small from dicom-watcher** and **small from Orthanc**: ``small_count`` CT instances of
  ~0.5 MB (``corpus.small_instances``, 500 × 500 16-bit pixels): instances/s and MB/s over the
  command's wall time (start-up and the QIDO-RS listing included).
- **large from dicom-watcher**: one instance of ``large_size`` bytes (``corpus.make_large``,
  written 1 MiB at a time): MB/s, the replicate process's peak RSS (its maximum RSS as GNU
  ``time`` reports it, exact; and VmHWM sampled every 20 ms) and the source service's (the largest VmRSS
  of one of its processes, and its tree's PSS, sampled over the case).

The limit: ``bench/limits.py``'s ``copy_hash_fsync`` (read, sha256, write, fsync, rename) of
the same input files to the same disk, on 1 and on 2 processes, warm (the files were just
written), measured before the cases and again after them; a case is held against the higher
of the two 2-process measurements (the stricter), the 1-process one shown beside it.

Nothing is counted on faith: every report must say complete with every instance stored, and
the target catalog must then hold one instance row per input, with the inputs' sha256s and
their files in its archive. ``measure(scratch, quick, log_dir)`` returns rows (``make_row``
plus ``case``, ``source``, ``load_1m`` [start, end] and the case's figures); ``table(rows)``
prints them and the targets, met or not.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import httpx

from .backends import Sqlite
from .corpus import make_large, small_instances
from .limits import _copy_files, run_in_processes, split_by_size
from .process import Sampler, ServiceRun, descendants, service_command, watcher_code
from .receive import free_port, orthanc_binary, stop_system_orthanc, tree_cpu_seconds
from .results import _cell, _table, make_row

LOGGER = logging.getLogger(__name__)

ORTHANC_PLUGIN = Path("/usr/share/orthanc/plugins/libOrthancDicomWeb.so")
PASSWORD = "bench replication password"
TARGET_VS_LIMIT = 0.5  # issue 15: small instances at >= 50 % of the durable-copy limit
TARGET_RSS_MB = 100.0  # issue 15: the replicate process under 100 MB with a 2 GB instance
WATCHER, ORTHANC = "dicom-watcher", "Orthanc"


@dataclass(frozen=True)
class Plan:
    small_count: int = 2_000
    small_side: int = 500  # rows = columns: 500 x 500 x 2 bytes, ~0.5 MB an instance
    large_size: int = 2_000_000_000
    rounds: int = 3  # small from dicom-watcher, each round after a 2-process limit of its own


FULL = Plan()
QUICK = Plan(small_count=200, large_size=200_000_000, rounds=1)


def _load() -> float:
    return round(os.getloadavg()[0], 2)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


# -- the inputs ----------------------------------------------------------------------------------

@dataclass
class Inputs:
    small: list[Path]
    small_studies: list[str]
    large: Path
    large_study: str
    sha256: dict[Path, str]

    def size(self, paths: list[Path]) -> int:
        return sum(p.stat().st_size for p in paths)


def make_inputs(root: Path, plan: Plan) -> Inputs:
    import pydicom

    small, studies = [], {}
    for rel, data in small_instances(plan.small_count, seed=21, rows=plan.small_side,
                                     columns=plan.small_side):
        path = root / "small" / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        small.append(path)
        if rel.parent not in studies:  # one series folder: read a UID from its first file
            studies[rel.parent] = str(pydicom.dcmread(path, stop_before_pixels=True).StudyInstanceUID)
    [large] = make_large(root / "large", (plan.large_size,), seed=22)
    large_study = str(pydicom.dcmread(large, stop_before_pixels=True).StudyInstanceUID)
    os.sync()
    sums = {p: _sha256(p) for p in [*small, large]}
    return Inputs(small, list(dict.fromkeys(studies.values())), large, large_study, sums)


# -- the sources -----------------------------------------------------------------------------------

class WatcherSource:
    """A second dicom-watcher: ``run`` with ``[http]``, its own catalog and archive."""

    name = WATCHER

    def __init__(self, workdir: Path, log_dir: Path | None):
        self.port = free_port()
        self.run = ServiceRun(workdir, Sqlite(), keep_log=log_dir / "replicate-source.log" if log_dir else None)
        with self.run.config_path.open("a") as config:
            config.write(f'[http]\nbind = "127.0.0.1"\nport = {self.port}\n')
        self.url = f"http://127.0.0.1:{self.port}"
        self.root = f"{self.url}/dicom-web/import/"
        self.token = ""
        self.pid: int | None = None

    def cli(self, *args: str, input: str | None = None, timeout: float = 3600) -> str:
        done = subprocess.run([*service_command(), *args, "--config", str(self.run.config_path)],
                              input=input, capture_output=True, text=True, timeout=timeout)
        if done.returncode != 0:
            raise RuntimeError(f"dicom-watcher {' '.join(args)} exited {done.returncode}:\n"
                               f"{done.stdout[-2000:]}\n{done.stderr[-2000:]}")
        return done.stdout

    def import_(self, paths: list[Path], root: Path) -> float:
        """Copy the files into the drop folder and ``scan --final`` them; seconds of the scan."""
        for path in paths:
            target = self.run.drop / path.relative_to(root)
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(path, target)
        os.sync()
        started = time.perf_counter()
        self.cli("scan", "--final", "--json")
        seconds = time.perf_counter() - started
        held = self.run.backend.query("SELECT count(*) FROM instance")[0][0]
        if held != len(paths):
            raise RuntimeError(f"the source dicom-watcher holds {held} instances after scan, "
                               f"{len(paths)} were dropped: {self.run.backend.rejection_reasons()}")
        return seconds

    def start(self) -> None:
        self.cli("users", "add", "bench", "--manager", "--password-stdin", input=PASSWORD + "\n")
        self.token = self.cli("users", "token", "bench").strip().splitlines()[-1]
        self.run.start()
        self.pid = self.run.pid = self.run.proc.pid  # (the heartbeat may still name the scan's pid)
        deadline = time.monotonic() + 120
        while not _answers(f"{self.url}/healthz"):
            if self.run.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the source dicom-watcher's web app does not answer; log:\n"
                                   f"{self.run.log_tail()}")
            time.sleep(0.1)

    def stop(self) -> dict:
        stopped = self.run.stop()
        if stopped.log_problems:
            LOGGER.warning("the source dicom-watcher logged %d ERROR/Traceback lines, e.g. %s",
                           stopped.log_problems, stopped.log_sample[:2])
        return {"exit_code": stopped.exit_code, "log_problems": stopped.log_problems,
                "log_sample": stopped.log_sample}

    def cleanup(self) -> None:
        self.run.cleanup()


class OrthancSource:
    """Orthanc with its DICOMweb plugin, its storage and index under ``workdir``."""

    name = ORTHANC

    def __init__(self, workdir: Path, log_dir: Path | None):
        shutil.rmtree(workdir, ignore_errors=True)
        workdir.mkdir(parents=True)
        self.workdir, self.log_dir = workdir, log_dir
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.root = f"{self.url}/dicom-web/"
        self.token = ""
        self.proc: subprocess.Popen | None = None
        self.pid: int | None = None
        self.log_path = workdir / "orthanc.log"

    def start(self) -> None:
        stop_system_orthanc()
        config = {"Name": "bench-replication-source", "StorageDirectory": str(self.workdir / "storage"),
                  "IndexDirectory": str(self.workdir / "index"), "HttpPort": self.port,
                  "DicomPort": free_port(), "Plugins": [str(ORTHANC_PLUGIN)], "RemoteAccessAllowed": False,
                  "AuthenticationEnabled": False, "DicomWeb": {"Enable": True, "Root": "/dicom-web/"}}
        (self.workdir / "orthanc.json").write_text(json.dumps(config, indent=2))
        with self.log_path.open("wb") as log:
            self.proc = subprocess.Popen([orthanc_binary(), str(self.workdir / "orthanc.json")],
                                         stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT)
        self.pid = self.proc.pid
        deadline = time.monotonic() + 60
        while not _answers(f"{self.root}studies"):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"Orthanc does not answer; log:\n{self.log_path.read_text()[-2000:]}")
            time.sleep(0.1)

    def upload(self, paths: list[Path]) -> float:
        """POST /instances every file (2 at once); seconds. Raises unless Orthanc holds them all."""
        def post(client: httpx.Client, path: Path) -> None:
            answer = client.post(f"{self.url}/instances", content=path.read_bytes())
            if answer.status_code != 200:
                raise RuntimeError(f"Orthanc refused {path}: HTTP {answer.status_code} {answer.text[:200]}")

        started = time.perf_counter()
        with httpx.Client(timeout=300) as client, ThreadPoolExecutor(2) as pool:
            list(pool.map(lambda p: post(client, p), paths))
        seconds = time.perf_counter() - started
        count = int(httpx.get(f"{self.url}/statistics", timeout=30).json()["CountInstances"])
        if count != len(paths):
            raise RuntimeError(f"Orthanc holds {count} instances, {len(paths)} were uploaded")
        return seconds

    def stop(self) -> dict:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return {"exit_code": self.proc.returncode if self.proc else None}

    def cleanup(self) -> None:
        self.stop()
        if self.log_dir is not None and self.log_path.exists():
            self.log_dir.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(self.log_path, self.log_dir / "replicate-orthanc.log")
        shutil.rmtree(self.workdir, ignore_errors=True)


def _answers(url: str) -> bool:
    try:
        return httpx.get(url, timeout=5).status_code == 200
    except httpx.HTTPError:
        return False


def orthanc_unavailable() -> str | None:
    if not orthanc_binary():
        return "Orthanc is not installed (apt-get install -y orthanc)"
    if not ORTHANC_PLUGIN.is_file():
        return (f"Orthanc's DICOMweb plugin is not installed ({ORTHANC_PLUGIN}; "
                "apt-get install -y orthanc-dicomweb)")
    return None


# -- one replication ------------------------------------------------------------------------------

def replicate_once(source, studies: list[str], expected: list[Path], inputs: Inputs, workdir: Path,
                   log_dir: Path | None, label: str) -> dict:
    """``dicom-watcher replicate`` from ``source`` into a fresh site under ``workdir``, timed and
    sampled; the target then checked against ``expected``. Returns the row."""
    target = ServiceRun(workdir, Sqlite(), keep_log=log_dir / f"replicate-{label}.log" if log_dir else None)
    try:
        command = [*service_command(), "replicate", "--config", str(target.config_path), "--from", source.root,
                   "--json", *(["--token", source.token] if source.token else []),
                   *[arg for uid in studies for arg in ("--study", uid)]]
        out_path = workdir / "replicate.json"
        load = _load()
        source_cpu = tree_cpu_seconds(source.pid)
        with Sampler(source.pid) as source_memory:
            seconds, usage, memory, peak = _run(command, out_path, target, source)
        source_cpu = tree_cpu_seconds(source.pid) - source_cpu
        reports = json.loads(out_path.read_text())
        stored = sum(r["stored"] for r in reports)
        if stored != len(expected) or not all(r["complete"] for r in reports) or \
                any(r["failed"] or r["present"] for r in reports):
            raise RuntimeError(f"replicate from {source.name}: stored {stored} of {len(expected)}: {reports}")
        size = _check_target(target, expected, inputs)
        # the same again: everything is present, nothing is fetched: start-up, listing, checks
        again, *_ = _run(command, out_path, target, source)
        reports = json.loads(out_path.read_text())
        if sum(r["present"] for r in reports) != len(expected) or any(r["stored"] for r in reports):
            raise RuntimeError(f"replicate again from {source.name} did not find everything present: {reports}")
        load_after = _load()
        row = make_row(f"replicate {label.split('-')[0]}", f"replicate from {source.name}",
                       files=stored, bytes_=size, seconds=seconds)
        cpu = usage.ru_utime + usage.ru_stime
        row.update(case=label, source=source.name, studies=len(reports),
                   replicate_peak_rss_mb=peak if peak is not None else round(memory.hwm_kb / 1024, 1),
                   replicate_sampled_hwm_mb=round(memory.hwm_kb / 1024, 1),
                   source_peak_rss_mb=round(source_memory.rss_kb / 1024, 1),
                   source_tree_peak_pss_mb=round(source_memory.tree_pss_kb / 1024, 1),
                   replicate_cpu_seconds=round(cpu, 2), source_cpu_seconds=round(source_cpu, 2),
                   replicate_cpu_ms_per_instance=round(cpu * 1000 / stored, 2),
                   source_cpu_ms_per_instance=round(source_cpu * 1000 / stored, 2),
                   again_seconds=round(again, 3),
                   net_files_per_s=round(stored / (seconds - again), 1) if seconds > again else None,
                   net_mb_per_s=round(size / 1e6 / (seconds - again), 1) if seconds > again else None,
                   load_1m=[load, load_after])
        problems, _, sample = target.log_problems()
        if problems:
            row["replicate_log_problems"] = sample
        LOGGER.info("%s", row)
        return row
    finally:
        target.cleanup()


def _run(command: list[str], out_path: Path, target: ServiceRun,
         source) -> tuple[float, object, Sampler, float | None]:
    """One replicate process: (wall seconds, its rusage from wait4 (CPU), its sampled memory,
    its peak RSS in MB as GNU time reports it, or None without /usr/bin/time).

    Not ``ru_maxrss`` from our own wait4: Linux carries the spawning process's high-water mark
    (the mm the child had before exec, shared with this one under vfork) into the child's, so
    it says this benchmark's RSS, not the command's. GNU time (a 1 MB process) spawns it instead."""
    maxrss_path = out_path.with_suffix(".maxrss")
    timed = ["/usr/bin/time", "-f", "%M", "-o", str(maxrss_path)] if Path("/usr/bin/time").exists() else []
    with out_path.open("wb") as out, target.log_path.open("ab") as log:
        started = time.perf_counter()
        proc = subprocess.Popen([*timed, *command], stdin=subprocess.DEVNULL, stdout=out, stderr=log)
        with Sampler(proc.pid, pss=False) as memory:
            _, status, usage = os.wait4(proc.pid, 0)
            seconds = time.perf_counter() - started
        proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise RuntimeError(f"replicate from {source.name} exited {proc.returncode}:\n"
                           f"{out_path.read_text()[-2000:]}\n{target.log_tail()}")
    peak = None
    if timed:
        found = re.findall(r"^(\d+)$", maxrss_path.read_text(), re.M)
        peak = round(int(found[-1]) / 1024, 1) if found else None
    return seconds, usage, memory, peak


def _check_target(target: ServiceRun, expected: list[Path], inputs: Inputs) -> int:
    """One instance row per input with the input's sha256, its file in the archive at its
    size; the bytes stored."""
    rows = target.backend.query("SELECT stored_path, sha256 FROM instance") or []
    wanted = sorted(inputs.sha256[p] for p in expected)
    if sorted(sha for _, sha in rows) != wanted:
        raise RuntimeError(f"the target holds {len(rows)} instances whose sha256s are not the "
                           f"{len(expected)} inputs'")
    sizes = [(target.archive / stored).stat().st_size for stored, _ in rows]
    if sum(sizes) != sum(p.stat().st_size for p in expected):
        raise RuntimeError("the target's stored files do not add up to the inputs' size")
    return sum(sizes)


# -- the durable-copy limit -----------------------------------------------------------------------

def copy_limit(paths: list[Path], dest: Path, corpus: str, procs: int, when: str) -> dict:
    shutil.rmtree(dest, ignore_errors=True)
    dest.mkdir(parents=True)
    load = _load()
    try:
        seconds, files, copied = run_in_processes(_copy_files, split_by_size(paths, procs), dest)
    finally:
        shutil.rmtree(dest, ignore_errors=True)
    row = make_row(corpus, "copy_hash_fsync", files=files, bytes_=copied, seconds=seconds, procs=procs,
                   cache="warm")
    row.update(case=f"limit {when}", load_1m=[load, _load()])
    LOGGER.info("%s", row)
    return row


# -- the run ----------------------------------------------------------------------------------------

def _others() -> list[str]:
    """Other benchmark, test and service processes on the machine now (not this one's tree)."""
    ours = {os.getpid(), *descendants(os.getpid())}
    found = subprocess.run(["ps", "-eo", "pid=,etimes=,args="], capture_output=True, text=True).stdout
    lines = []
    for line in found.splitlines():
        pid, _, rest = line.strip().partition(" ")
        if int(pid) not in ours and re.search(r"pytest|-m bench|watcher|Orthanc|storescp", rest):
            lines.append(f"{pid} {rest.strip()[:160]}")
    return lines


def measure(scratch: Path, quick: bool = False, log_dir: Path | None = None,
            plan: Plan | None = None) -> list[dict]:
    plan = plan or (QUICK if quick else FULL)
    logging.getLogger("httpx").setLevel(logging.WARNING)  # a line per request otherwise
    work = scratch / "replicate"
    shutil.rmtree(work, ignore_errors=True)
    rows: list[dict] = [{"corpus": "context", "what": "started", "others": _others(), "load_1m": [_load(), None],
                         "plan": vars(plan), "watcher_code": watcher_code()}]
    LOGGER.info("replicate: generating %d x %.1f MB and 1 x %d MB", plan.small_count,
                plan.small_side ** 2 * 2 / 1e6, plan.large_size // 10**6)
    started = time.perf_counter()
    inputs = make_inputs(work / "inputs", plan)
    rows.append(make_row("replicate inputs", "generate", files=len(inputs.small) + 1,
                         bytes_=inputs.size(inputs.small) + inputs.large.stat().st_size,
                         seconds=time.perf_counter() - started))
    source = WatcherSource(work / "source-watcher", log_dir)
    orthanc = None
    why_no_orthanc = orthanc_unavailable()
    try:
        load = _load()
        seconds = source.import_([*inputs.small, inputs.large], work / "inputs")
        rows.append(make_row("replicate inputs", "source dicom-watcher: scan", files=len(inputs.small) + 1,
                             bytes_=inputs.size(inputs.small) + inputs.large.stat().st_size, seconds=seconds)
                    | {"load_1m": [load, _load()]})
        source.start()
        if why_no_orthanc is None:
            orthanc = OrthancSource(work / "source-orthanc", log_dir)
            orthanc.start()
            load = _load()
            seconds = orthanc.upload(inputs.small)
            rows.append(make_row("replicate inputs", "source Orthanc: POST /instances", files=len(inputs.small),
                                 bytes_=inputs.size(inputs.small), seconds=seconds, procs=2)
                        | {"load_1m": [load, _load()]})
        else:
            LOGGER.warning("skipping Orthanc: %s", why_no_orthanc)
        limits = work / "limit-copy"
        rows.append(copy_limit([inputs.large], limits, "replicate large", 1, "before"))
        rows.append(copy_limit(inputs.small, limits, "replicate small", 1, "before"))
        for round_ in range(1, plan.rounds + 1):  # (this machine's speed drifts minute to minute)
            limit = copy_limit(inputs.small, limits, "replicate small", 2, "before" if round_ == 1 else
                               f"round {round_}")
            row = replicate_once(source, inputs.small_studies, inputs.small, inputs,
                                 work / "target-small-w", log_dir, "small-from-watcher")
            row.update(round=round_, paired_limit_files_per_s=limit["files_per_s"],
                       vs_paired_limit=round(row["mb_per_s"] / limit["mb_per_s"], 3))
            rows += [limit, row]
        if orthanc is not None:
            rows.append(replicate_once(orthanc, inputs.small_studies, inputs.small, inputs,
                                       work / "target-small-o", log_dir, "small-from-orthanc"))
        rows.append(replicate_once(source, [inputs.large_study], [inputs.large], inputs, work / "target-large",
                                   log_dir, "large-from-watcher"))
        for procs in (1, 2):
            rows.append(copy_limit(inputs.small, limits, "replicate small", procs, "after"))
        rows[-1]["source_stopped"] = source.stop()
        if orthanc is not None:
            orthanc.stop()
    finally:
        source.cleanup()
        if orthanc is not None:
            orthanc.cleanup()
        shutil.rmtree(work, ignore_errors=True)
    if why_no_orthanc:
        rows.append({"corpus": "replicate small", "what": "replicate from Orthanc", "source": ORTHANC,
                     "skipped": why_no_orthanc})
    rows.append({"corpus": "context", "what": "ended", "others": _others(), "load_1m": [None, _load()],
                 "watcher_code": watcher_code()})
    add_limits(rows)
    return rows


def add_limits(rows: list[dict]) -> None:
    """Each replication row gets ``limit`` (the stricter of the 2-process copies of its corpus,
    before and after; one process for the lone large file) and ``vs_limit``."""
    for row in rows:
        if not row.get("case", "").endswith(("-watcher", "-orthanc")):
            continue
        procs = 1 if row["corpus"] == "replicate large" else 2
        limits = [r for r in rows if r["what"] == "copy_hash_fsync" and r["corpus"] == row["corpus"]
                  and r["procs"] == procs]
        if limits:
            best = max(limits, key=lambda r: r["mb_per_s"])
            row["limit_mb_per_s"] = best["mb_per_s"]
            row["limit_files_per_s"] = best["files_per_s"]
            row["limit"] = f"copy_hash_fsync {procs} procs warm ({best['case']})"
            row["vs_limit"] = round(row["mb_per_s"] / best["mb_per_s"], 3)
        single = [r for r in rows if r["what"] == "copy_hash_fsync" and r["corpus"] == row["corpus"]
                  and r["procs"] == 1]
        if single:
            row["vs_limit_1proc"] = round(row["mb_per_s"] / max(r["mb_per_s"] for r in single), 3)


# -- the table ------------------------------------------------------------------------------------

def _median_round(rounds: list[dict]) -> dict | None:
    """The round whose ratio to its own limit is the median (the lower middle of an even
    count), with its limit in MB/s."""
    if not rounds:
        return None
    middle = sorted(rounds, key=lambda r: r["vs_paired_limit"])[(len(rounds) - 1) // 2]
    return middle | {"paired_limit_mb_per_s": middle["mb_per_s"] / middle["vs_paired_limit"]}


def _met(ok: bool) -> str:
    return "**met**" if ok else "**not met**"


def table(rows: list[dict]) -> str:
    lines = []
    for row in rows:
        if row.get("skipped") or row["corpus"] == "context" or row["what"] == "generate":
            continue
        load = row.get("load_1m") or [None, None]
        case = row.get("case") or row["what"]
        lines.append((f"{case} #{row['round']}" if row.get("round") else case, row["what"], row["procs"], row["files"],
                      round(row["bytes"] / 1e6), row["seconds"], row["files_per_s"], row["mb_per_s"],
                      f"{row['vs_limit'] * 100:.0f} %" if row.get("vs_limit") is not None else None,
                      row.get("again_seconds"), row.get("net_files_per_s"),
                      f"{row['replicate_cpu_seconds']} / {row['source_cpu_seconds']}"
                      if row.get("source") else None,
                      row.get("replicate_peak_rss_mb"), row.get("source_peak_rss_mb"),
                      row.get("source_tree_peak_pss_mb"), f"{load[0]} → {load[1]}"))
    headers = ("case", "what", "procs", "instances", "MB", "s", "instances/s", "MB/s", "vs limit",
               "again s", "net instances/s", "CPU s replicate / source",
               "replicate peak RSS MB", "source peak RSS MB (one process)", "source tree PSS MB", "load 1m")
    out = _table(headers, lines)
    by_case = {r.get("case"): r for r in rows if r.get("case")}
    notes = []
    large = by_case.get("large-from-watcher")
    rounds = [r for r in rows if r.get("case") == "small-from-watcher" and r.get("vs_limit") is not None]
    small = _median_round(rounds)
    if small:
        net = small["net_mb_per_s"] / small["paired_limit_mb_per_s"] if small.get("net_mb_per_s") else 0
        each = "; ".join(f"round {r['round']}: {_cell(r['files_per_s'])} instances/s, "
                         f"{r['vs_paired_limit'] * 100:.0f} % of {_cell(r['paired_limit_files_per_s'])}"
                         for r in rounds)
        strict = sorted(r["vs_limit"] for r in rounds)[len(rounds) // 2]
        notes.append(
            f"small from dicom-watcher, {len(rounds)} rounds, each against the 2-process durable-copy "
            f"limit measured just before it ({each}). The median round: {_cell(small['files_per_s'])} "
            f"instances/s, {_cell(small['mb_per_s'])} MB/s = {small['vs_paired_limit'] * 100:.0f} % of its "
            f"limit (net of start-up and listing, {_cell(small['net_files_per_s'])} instances/s = "
            f"{net * 100:.0f} %; CPU per instance: replicate {small['replicate_cpu_ms_per_instance']} ms, "
            f"source {small['source_cpu_ms_per_instance']} ms). Against the highest limit of the whole run "
            f"({small['limit']}: {_cell(small['limit_files_per_s'])} files/s), the median round is "
            f"{strict * 100:.0f} %, and against the 1-process copy {small['vs_limit_1proc'] * 100:.0f} %. "
            f"Target ≥ {TARGET_VS_LIMIT * 100:.0f} % (the median round, against its own limit and "
            f"against the highest): {_met(min(small['vs_paired_limit'], strict) >= TARGET_VS_LIMIT)}")
    orthanc = by_case.get("small-from-orthanc")
    if small and orthanc:
        notes.append(
            f"small from Orthanc: {_cell(orthanc['files_per_s'])} instances/s, {_cell(orthanc['mb_per_s'])} "
            f"MB/s ({orthanc['vs_limit'] * 100:.0f} % of the limit; CPU per instance: replicate "
            f"{orthanc['replicate_cpu_ms_per_instance']} ms, Orthanc {orthanc['source_cpu_ms_per_instance']} "
            f"ms); from dicom-watcher / from Orthanc: {small['files_per_s'] / orthanc['files_per_s']:.2f}")
    if large:
        notes.append(
            f"large ({large['bytes'] / 1e6:,.0f} MB) from dicom-watcher: {_cell(large['mb_per_s'])} MB/s "
            f"({large['vs_limit'] * 100:.0f} % of a 1-process copy); replicate peak RSS "
            f"{large['replicate_peak_rss_mb']} MB (GNU time's maximum RSS; VmHWM sampled every 20 ms: "
            f"{large['replicate_sampled_hwm_mb']} MB), target < {TARGET_RSS_MB:.0f} MB: "
            f"{_met(large['replicate_peak_rss_mb'] < TARGET_RSS_MB)}; source service peak RSS "
            f"{large['source_peak_rss_mb']} MB in one process, its tree's PSS "
            f"{large['source_tree_peak_pss_mb']} MB")
    for row in rows:
        if row.get("skipped"):
            notes.append(f"{row['what']}: skipped: {row['skipped']}")
    codes = list(dict.fromkeys(r["watcher_code"] for r in rows if r.get("watcher_code")))
    if codes:
        changed = " (it changed during the run!)" if len(codes) > 1 else ""
        notes.append(f"dicom-watcher code{changed}: {', '.join(codes)}")
    notes.append("Each case is the real `dicom-watcher replicate … --json` process into a fresh SQLite "
                 "site, timed from launch to exit (start-up and listing included); every instance "
                 "checked stored with its input's sha256. 'again s': the same command run a second "
                 "time (everything present, nothing fetched: start-up, listing, checks); 'net' = "
                 "instances / (s - again s). CPU: the replicate process (rusage, the first run) and the "
                 "source's process tree, over the first run. MB = 10^6 bytes.")
    return out + "\n\n" + "\n".join(f"- {n}" for n in notes)
