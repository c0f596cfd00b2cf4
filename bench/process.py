"""The real service as a subprocess: ``dicom-watcher run --config X``, watched from outside.

A ``ServiceRun`` owns one run's folders (drop, archive, rejected, staging), writes the
config, starts the service with its stderr in a log file, waits for its heartbeat row,
reads its memory and CPU from /proc and stops it with SIGTERM.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from .backends import Backend

LOGGER = logging.getLogger(__name__)
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
PROBLEM = re.compile(r"\b(ERROR|CRITICAL)\b|Traceback")


def service_command() -> list[str]:
    """``dicom-watcher`` beside this Python (the venv's console script), else ``python -m watcher``."""
    script = Path(sys.executable).with_name("dicom-watcher")
    return [str(script)] if script.exists() else [sys.executable, "-m", "watcher"]


def watcher_code() -> str:
    """Which service code a run used: git HEAD, ``+dirty`` and a hash of the package's .py files
    (the service is being changed while benchmarks run)."""
    spec = importlib.util.find_spec("watcher")
    package = Path(spec.origin).parent
    digest = hashlib.sha256()
    for path in sorted(package.rglob("*.py")):
        digest.update(path.relative_to(package).as_posix().encode() + b"\0" + path.read_bytes())
    try:
        head = subprocess.run(["git", "-C", str(package), "rev-parse", "--short", "HEAD"],
                              capture_output=True, text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(package), "status", "--porcelain", "--", "."],
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        head, dirty = "", ""
    return f"{head or 'no-git'}{'+dirty' if dirty else ''} py:{digest.hexdigest()[:10]}"


def load_1m() -> float:
    return round(os.getloadavg()[0], 2)


def descendants(pid: int) -> list[int]:
    """Every live process below ``pid`` (worker processes, if the service starts any)."""
    found, stack = [], [pid]
    while stack:
        parent = stack.pop()
        for children in Path(f"/proc/{parent}/task").glob("*/children"):
            try:
                pids = [int(child) for child in children.read_text().split()]
            except OSError:
                continue
            found += pids
            stack += pids
    return found


def _top_of_service(pid: int) -> int:
    """The service's own process: the heartbeat names an importer, which may be a child forked
    by the service (same command line) rather than the service itself."""
    try:
        while True:
            parent = int(_stat_fields(pid)[1])
            if Path(f"/proc/{parent}/cmdline").read_bytes() != Path(f"/proc/{pid}/cmdline").read_bytes():
                return pid
            pid = parent
    except (OSError, ValueError):
        return pid


def _stat_fields(pid: int) -> list[str]:
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()


@dataclass
class ProcStats:
    """The service process (as asked: children excluded) and its whole process tree."""

    peak_rss_mb: float  # VmHWM of the service process, or of its largest child (importer processes)
    rss_mb: float  # VmRSS
    cpu_seconds: float  # utime + stime, children excluded
    tree_cpu_seconds: float  # + live descendants' utime + stime + reaped children's (cutime + cstime)
    tree_pss_mb: float  # proportional set size of the tree now: shared pages counted once
    processes: int

    @classmethod
    def read(cls, pid: int) -> "ProcStats":
        status = Path(f"/proc/{pid}/status").read_text()
        kb = {m.group(1): int(m.group(2)) for m in re.finditer(r"^(Vm\w+):\s+(\d+) kB", status, re.M)}
        fields = _stat_fields(pid)
        own = int(fields[11]) + int(fields[12])  # utime, stime: fields 14 and 15 of proc(5)
        tree, pss_kb, pids = own + int(fields[13]) + int(fields[14]), 0, [pid, *descendants(pid)]
        peak_kb = kb["VmHWM"]
        for member in pids:
            try:
                if member != pid:
                    child = _stat_fields(member)
                    tree += int(child[11]) + int(child[12])
                    hwm = re.search(r"^VmHWM:\s+(\d+) kB", Path(f"/proc/{member}/status").read_text(), re.M)
                    peak_kb = max(peak_kb, int(hwm.group(1)))
                rollup = Path(f"/proc/{member}/smaps_rollup").read_text()
                pss_kb += int(re.search(r"^Pss:\s+(\d+) kB", rollup, re.M).group(1))
            except (OSError, AttributeError):  # gone meanwhile
                continue
        return cls(round(peak_kb / 1024, 1), round(kb["VmRSS"] / 1024, 1), own / CLOCK_TICKS,
                   tree / CLOCK_TICKS, round(pss_kb / 1024, 1), len(pids))


@dataclass
class Stopped:
    exit_code: int | None
    stop_seconds: float
    killed: bool
    log_problems: int  # lines with ERROR/CRITICAL/Traceback
    log_warnings: int
    log_sample: list[str] = field(default_factory=list)


class ServiceRun:
    """One run of the service on a fresh database and empty folders under ``workdir``."""

    def __init__(self, workdir: Path, backend: Backend, *, workers: int | None = None, settle_seconds: float = 2,
                 rescan_seconds: float = 5, incomplete_seconds: float | None = None,
                 command: list[str] | None = None, keep_log: Path | None = None, code: str | None = None):
        shutil.rmtree(workdir, ignore_errors=True)
        self.workdir = workdir
        self.drop = workdir / "drop"
        self.staging = workdir / "staging"
        self.archive = workdir / "archive"
        for folder in (self.drop, self.staging):
            folder.mkdir(parents=True)
        self.backend = backend
        self.workers = workers
        self.log_path = workdir / "service.log"
        self.config_path = workdir / "watcher.toml"
        self.command = command or service_command()  # a profiler may wrap the service
        self.keep_log = keep_log  # where the service's log is copied on cleanup
        self.proc: subprocess.Popen | None = None
        self.pid: int | None = None
        self.given_code = code  # which code a baseline command runs (else watcher_code() at start)
        self.code = ""
        self.peak_tree_pss_mb = 0.0  # sampled: the tree's PSS at its highest reading
        self.max_processes = 0
        self.server_started = backend.server_started()  # another PostgreSQL restart shows up here
        url = backend.create(workdir)
        incomplete = "" if incomplete_seconds is None else f"incomplete_seconds = {incomplete_seconds}\n"
        text = json.dumps  # a JSON string is a valid TOML basic string
        self.config_path.write_text(
            "[watch]\n"
            f"drop_dir = {text(str(self.drop))}\nsettle_seconds = {settle_seconds}\n"
            f"rescan_seconds = {rescan_seconds}\n{incomplete}"
            "[archive]\n"
            f"dir = {text(str(self.archive))}\nrejected_dir = {text(str(workdir / 'rejected'))}\n"
            "[database]\n"
            f"url = {text(url)}\n"
            "[import]\n"
            + ("" if workers is None else f"workers = {workers}\n") + 'node = "bench"\n')

    # -- life cycle ------------------------------------------------------------------
    def start(self, heartbeat_timeout: float = 600) -> float:
        """Start the service and wait for its heartbeat row; returns seconds until it appeared."""
        started = time.perf_counter()
        self.code = self.given_code or watcher_code()
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(
                [*self.command, "run", "--config", str(self.config_path)],
                stdin=subprocess.DEVNULL, stdout=log, stderr=log, cwd=self.workdir)
        while not self.backend.has_heartbeat():
            if self.proc.poll() is not None:
                raise RuntimeError(f"the service exited with {self.proc.returncode} before its "
                                   f"heartbeat; its log:\n{self.log_tail()}")
            if time.perf_counter() - started > heartbeat_timeout:
                raise RuntimeError(f"no heartbeat within {heartbeat_timeout} s; log:\n{self.log_tail()}")
            time.sleep(0.05)
        rows = self.backend.query("SELECT pid FROM heartbeat WHERE node = 'bench'")
        self.pid = _top_of_service(rows[0][0]) if rows else self.proc.pid  # not proc.pid under py-spy
        return time.perf_counter() - started

    def server_restarted(self) -> bool:
        """Did the database server restart since this run began (someone else's test, say)?"""
        return self.backend.server_started() != self.server_started

    def stats(self) -> ProcStats:
        """Read /proc now; also keeps the highest tree PSS seen (see ``sample``)."""
        stats = ProcStats.read(self.pid)
        self.peak_tree_pss_mb = max(self.peak_tree_pss_mb, stats.tree_pss_mb)
        self.max_processes = max(self.max_processes, stats.processes)
        return stats

    def stop(self, timeout: float = 60) -> Stopped:
        """SIGTERM the service (not a wrapper) and wait for it; SIGKILL after ``timeout``."""
        started = time.perf_counter()
        os.kill(self.pid, signal.SIGTERM)
        killed = False
        try:
            code = self._wait_service(timeout)
        except subprocess.TimeoutExpired:
            LOGGER.error("the service did not stop within %s s of SIGTERM; its threads:\n%s",
                         timeout, self.dump_threads())
            os.kill(self.pid, signal.SIGKILL)
            killed, code = True, self._wait_service(30)
        seconds = time.perf_counter() - started
        if self.pid != self.proc.pid:  # a wrapper (py-spy) writes its output, then exits as it did
            wrapper_code = self.proc.wait(timeout=300)
            code = wrapper_code if code is None else code
        problems, warnings, sample = self.log_problems()
        self.backend.close()
        return Stopped(code, round(seconds, 3), killed, problems, warnings, sample)

    def dump_threads(self) -> str:
        """Every thread's stack (py-spy dump), appended to the kept log too; for a hung stop."""
        pyspy = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
        try:
            dump = subprocess.run([pyspy, "dump", "--pid", str(self.pid)], capture_output=True,
                                  text=True, timeout=60)
            text = dump.stdout + dump.stderr
        except (OSError, subprocess.SubprocessError) as exc:
            text = f"(no stack dump: {exc})"
        with self.log_path.open("a") as log:
            log.write(f"\n--- bench: no exit {time.strftime('%H:%M:%S')} after SIGTERM; py-spy dump ---\n"
                      f"{text}\n")
        return text

    def _wait_service(self, timeout: float) -> int | None:
        if self.pid == self.proc.pid:
            return self.proc.wait(timeout=timeout)
        deadline = time.monotonic() + timeout  # not our child: wait for /proc to forget it
        while Path(f"/proc/{self.pid}").exists() and _state(self.pid) != "Z":
            if time.monotonic() > deadline:
                raise subprocess.TimeoutExpired("service", timeout)
            time.sleep(0.05)
        return None  # its parent (the wrapper) collects the exit code

    def cleanup(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            for pid in {self.pid, self.proc.pid} - {None}:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            self.proc.wait()
        if self.keep_log is not None and self.log_path.exists():
            self.keep_log.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(self.log_path, self.keep_log)
        try:
            self.backend.drop()
        except Exception as exc:
            LOGGER.warning("could not drop the %s database: %s", self.backend.name, exc)
        shutil.rmtree(self.workdir, ignore_errors=True)

    def __enter__(self) -> "ServiceRun":
        return self

    def __exit__(self, *exc) -> None:
        self.cleanup()

    # -- what it left ------------------------------------------------------------------
    def files_in_drop(self) -> list[str]:
        return sorted(str(Path(root, name).relative_to(self.drop))
                      for root, _, names in os.walk(self.drop) for name in names)

    def archive_temporaries(self) -> int:
        tmp = self.archive / ".tmp"
        return len(list(tmp.iterdir())) if tmp.is_dir() else 0

    def log_problems(self, sample: int = 5) -> tuple[int, int, list[str]]:
        problems, warnings, lines = 0, 0, []
        with self.log_path.open(errors="replace") as log:
            for line in log:
                if PROBLEM.search(line):
                    problems += 1
                    if len(lines) < sample:
                        lines.append(line.rstrip()[:300])
                elif " WARNING " in line or "Warning: " in line:  # logging, or warnings.warn
                    warnings += 1
        return problems, warnings, lines

    def log_tail(self, lines: int = 20) -> str:
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])


def _state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return "X"


class Sampler:
    """Every ``interval`` s over ``pid``'s process tree: the largest VmRSS and VmHWM of one
    process, and the tree's PSS, each at its highest."""

    def __init__(self, pid: int, interval: float = 0.02, pss: bool = True):
        self.pid, self.interval, self.pss = pid, interval, pss
        self.rss_kb = self.hwm_kb = self.tree_pss_kb = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="rss-sampler", daemon=True)

    def sample(self) -> None:
        pss = 0
        for member in [self.pid, *descendants(self.pid)]:
            try:
                status = Path(f"/proc/{member}/status").read_text()
                kb = dict(re.findall(r"^(VmRSS|VmHWM):\s+(\d+) kB", status, re.M))
                self.rss_kb = max(self.rss_kb, int(kb.get("VmRSS", 0)))
                self.hwm_kb = max(self.hwm_kb, int(kb.get("VmHWM", 0)))
                if self.pss:
                    found = re.search(r"^Pss:\s+(\d+) kB", Path(f"/proc/{member}/smaps_rollup").read_text(),
                                      re.M)
                    pss += int(found.group(1)) if found else 0
            except OSError:
                continue
        self.tree_pss_kb = max(self.tree_pss_kb, pss)

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            self.sample()

    def __enter__(self) -> "Sampler":
        self.sample()
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
