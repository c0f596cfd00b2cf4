"""The DICOM receiver (C-STORE SCP) against its peers, in one run: dicom-watcher, DCMTK
``storescp``, Orthanc and pynetdicom alone.

Each peer is started as a process of its own on a free port (pynetdicom alone: a parent with
two SCP processes, a port each), with its storage under the scratch folder, and is measured
from outside in three cases, each on a fresh start:

- **small**: ``small_count`` ~25 KB CT instances (``corpus.small_instances``) sent by
  ``senders`` concurrent DCMTK ``storescu`` processes (one association each; the sender of
  folder i sends to port i of a peer with several). objects/s is
  the objects over the wall time from launching the senders to the last one's exit; CPU-ms
  per object is the receiver's process tree (utime + stime of the process, its live and
  exited children) over the same window, idle background work included.
- **large**: ``large_count`` objects of ``large_size`` bytes (``corpus.make_large``) sent by
  one ``storescu``: MB/s, and the peak memory of the receiver's tree (the largest VmHWM of
  one process, and the tree's summed PSS sampled every 20 ms).
- **latency**: one association from pynetdicom's SCU (in this process, TCP_NODELAY on its
  socket), C-STOREs paced at ``paced_rate`` per second; each ``send_c_store`` is timed
  (p50 / p99 of the round trip).

Nothing is counted on faith: every C-STORE must be answered with Success (``storescu -v``
logs each response; the SCU's statuses are checked), and the receiver must then hold every
object (dicom-watcher: one ``instance`` row per object with its stored file in the archive,
no rejection; storescp and pynetdicom alone: one file per object in its folder; Orthanc:
``/statistics`` ``CountInstances`` and its storage files). A shortfall raises.

The peers: dicom-watcher ``run`` with a ``[dicom]`` section on SQLite (its defaults
otherwise: importer processes, workers); ``storescp --fork`` (defaults: no fsync, the data
set decoded and written again); Orthanc (Debian's ``orthanc`` package) with a generated
config: its ports, storage and index under scratch, no plugins, defaults otherwise (SQLite
index, fsync of each file); pynetdicom alone (``bench/pynetdicom_peer.py``), the ceiling of
the library our receiver is built on, doing nothing with what it receives: two minimal
pynetdicom SCP processes (dicom-watcher spreads associations over its importer processes: one
association each here), configured as watcher/receive.py configures its receiver (each data
set written to a temporary file as it arrives, PDUs of 256 kB, TCP_NODELAY), whose C-STORE
handler only keeps pynetdicom's file (a hard link, no fsync). They listen on a port each
rather than sharing one: two processes accepting on one socket race for each connection
(dicom-watcher arbitrates in ``_AcceptingOn.get_request``), so both associations could land in
one. It takes part in every case; the large and paced ones send to its first port only.
DCMTK leaves Nagle's algorithm on unless ``TCP_NODELAY=1`` is in its environment, so every
DCMTK process here (storescu, storescp and Orthanc, which uses DCMTK's network code) gets it.
A peer that is not installed is skipped, saying so.

``measure(scratch, quick, rounds)`` returns rows (``results.make_row`` plus ``peer``,
``case``, ``round`` and the case's figures); ``table(rows)`` prints each figure's median
(and range over the rounds) per peer and the ratios dicom-watcher / storescp,
dicom-watcher / Orthanc and dicom-watcher / pynetdicom alone (how much of the gap to the
others is pynetdicom's own). ``profile(scratch, quick)`` runs the small case once with
dicom-watcher under py-spy and returns where its CPU goes.
"""

from __future__ import annotations

import collections
import io
import json
import logging
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import pydicom

from .backends import Sqlite
from .corpus import make_large, small_instances
from .process import Sampler, ServiceRun, _top_of_service, descendants, service_command
from .results import _cell, _table, make_row

LOGGER = logging.getLogger(__name__)

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
SENDER_TIMEOUT = 1800.0  # seconds for one storescu
DCMTK_ENV = {"TCP_NODELAY": "1"}  # see the module docstring
WATCHER, STORESCP, ORTHANC, PYNETDICOM = "dicom-watcher", "storescp", "Orthanc", "pynetdicom alone"
PEERS = (WATCHER, STORESCP, ORTHANC, PYNETDICOM)
COMPARED = (STORESCP, ORTHANC, PYNETDICOM)  # the table's ratios: dicom-watcher / each
CALLING_AE = "BENCHSCU"


@dataclass(frozen=True)
class Plan:
    small_count: int = 2_000
    senders: int = 2
    large_size: int = 200_000_000
    large_count: int = 3
    paced_rate: float = 50.0  # C-STOREs per second on the one association
    paced_count: int = 500


FULL = Plan()
QUICK = Plan(small_count=300, large_size=20_000_000, large_count=1, paced_count=100)


# -- the peers -----------------------------------------------------------------------------

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env() -> dict:
    return {**os.environ, **DCMTK_ENV}


class Peer:
    """One receiver process on free ports (one unless ``port_count`` says more), storing under
    ``workdir``. The sender of folder i sends to ``ports[i % port_count]``."""

    name = "?"
    ae_title = "ANY-SCP"
    port_count = 1

    def __init__(self, workdir: Path, log_dir: Path | None = None):
        shutil.rmtree(workdir, ignore_errors=True)
        workdir.mkdir(parents=True)
        self.workdir, self.log_dir = workdir, log_dir
        self.ports = [free_port() for _ in range(self.port_count)]
        self.port = self.ports[0]
        self.proc: subprocess.Popen | None = None
        self.pid: int | None = None
        self.log_path = workdir / "receiver.log"
        self.exit_code: int | None = None

    def start(self) -> None:
        raise NotImplementedError

    def stored(self) -> int:
        """How many objects the receiver holds now; raises if what it holds is inconsistent."""
        raise NotImplementedError

    def _popen(self, command: list[str], env: dict | None = None) -> None:
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                                         cwd=self.workdir, env=env)
        self.pid = self.proc.pid

    def wait_ready(self, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        while not all(echo(port, self.ae_title) for port in self.ports):
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.proc.returncode}; log:\n{self.log_tail()}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"{self.name} does not answer C-ECHO after {timeout} s; log:\n{self.log_tail()}")
            time.sleep(0.1)

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.exit_code = self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            LOGGER.error("%s did not stop within 60 s of SIGTERM: killed", self.name)
            self.proc.kill()
            self.exit_code = self.proc.wait()

    def cleanup(self) -> None:
        self.stop()
        if self.log_dir is not None and self.log_path.exists():
            self.log_dir.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(self.log_path, self.log_dir / f"{self.workdir.name}.log")
        shutil.rmtree(self.workdir, ignore_errors=True)

    def log_tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.cleanup()


class WatcherPeer(Peer):
    """``dicom-watcher run`` with a ``[dicom]`` section, SQLite, archive under scratch."""

    name = WATCHER
    ae_title = "ARCHIVE"

    def __init__(self, workdir: Path, log_dir: Path | None = None, command: list[str] | None = None):
        super().__init__(workdir, log_dir)
        self.run = ServiceRun(workdir / "service", Sqlite(), command=command)
        self.wrapped = command is not None
        self.log_path = self.run.log_path
        with self.run.config_path.open("a") as config:
            config.write(f'[dicom]\nae_title = "{self.ae_title}"\nport = {self.port}\nbind = "127.0.0.1"\n')

    def start(self) -> None:
        self.run.start()
        if self.wrapped and self.run.pid == self.run.proc.pid:
            # ServiceRun falls back to the wrapper's pid when its one heartbeat query fails
            # (the database busy at start-up): ask again, or SIGTERM would go to py-spy.
            deadline = time.monotonic() + 60
            while not (rows := self.run.backend.query("SELECT pid FROM heartbeat WHERE node = 'bench'")):
                if time.monotonic() > deadline:
                    raise RuntimeError("no heartbeat pid for the service under the wrapper")
                time.sleep(0.1)
            self.run.pid = _top_of_service(rows[0][0])
        self.proc, self.pid = self.run.proc, self.run.pid  # the service (not a py-spy wrapper)
        self.wait_ready()

    def stored(self) -> int:
        backend = self.run.backend
        rejected = (backend.query("SELECT count(*) FROM rejection") or [[None]])[0][0]
        if rejected:
            reasons = backend.rejection_reasons()
            raise RuntimeError(f"dicom-watcher rejected {rejected} received objects: {reasons}")
        paths = [row[0] for row in backend.query("SELECT stored_path FROM instance") or []]
        missing = [p for p in paths if not (self.run.archive / p).is_file()]
        if missing:
            raise RuntimeError(f"{len(missing)} instance rows without their file, e.g. {missing[:3]}")
        return len(paths)

    def stop(self) -> None:
        if self.run.proc is None or self.run.proc.poll() is not None:
            return
        stopped = self.run.stop()
        self.exit_code = stopped.exit_code
        self.log_problems = stopped.log_problems
        if stopped.log_problems:
            LOGGER.warning("dicom-watcher's log has %d ERROR/Traceback lines, e.g. %s",
                           stopped.log_problems, stopped.log_sample[:2])

    def cleanup(self) -> None:
        self.stop()
        if self.log_dir is not None:
            self.run.keep_log = self.log_dir / f"{self.workdir.name}.log"
        self.run.cleanup()
        shutil.rmtree(self.workdir, ignore_errors=True)


def storescp_supports_fork() -> bool:
    text = subprocess.run(["storescp", "--help"], capture_output=True, text=True).stdout
    return "--fork" in text


class StorescpPeer(Peer):
    """DCMTK ``storescp`` (``--fork`` when this build has it), files into ``workdir/out``."""

    name = STORESCP

    def start(self) -> None:
        self.out = self.workdir / "out"
        self.out.mkdir()
        fork = ["--fork"] if storescp_supports_fork() else []
        self._popen(["storescp", *fork, "--output-directory", str(self.out), str(self.port)], env=_env())
        self.wait_ready()

    def stored(self) -> int:
        return sum(1 for _ in self.out.iterdir())


class PynetdicomPeer(Peer):
    """bench/pynetdicom_peer.py: one minimal pynetdicom SCP process per port, below one parent
    (the tree measured), each keeping every file pynetdicom writes in ``workdir/out``."""

    name = PYNETDICOM
    port_count = 2  # the small case's senders: one association per process, as dicom-watcher's

    def start(self) -> None:
        self.out = self.workdir / "out"
        script = Path(__file__).with_name("pynetdicom_peer.py")
        self._popen([sys.executable, str(script), str(self.workdir), *map(str, self.ports)])
        self.wait_ready()

    def stored(self) -> int:
        return sum(1 for _ in self.out.iterdir())


def orthanc_binary() -> str | None:
    return shutil.which("Orthanc") or (shutil.which("Orthanc", path="/usr/sbin:/usr/local/sbin"))


class OrthancPeer(Peer):
    """Orthanc with a generated config: its ports, storage and index here, no plugins, its
    defaults otherwise. Stops the system service first if one runs (not ours to share)."""

    name = ORTHANC
    ae_title = "ORTHANC"

    def start(self) -> None:
        stop_system_orthanc()
        self.http_port = free_port()
        self.storage = self.workdir / "storage"
        config = {"Name": "dicom-bench", "StorageDirectory": str(self.storage),
                  "IndexDirectory": str(self.workdir / "index"), "DicomAet": self.ae_title,
                  "DicomPort": self.port, "HttpPort": self.http_port, "Plugins": [],
                  "RemoteAccessAllowed": False}
        path = self.workdir / "orthanc.json"
        path.write_text(json.dumps(config, indent=2))
        self._popen([orthanc_binary(), str(path)], env=_env())
        self.wait_ready()

    def statistics(self) -> dict:
        url = f"http://127.0.0.1:{self.http_port}/statistics"
        with urllib.request.urlopen(url, timeout=30) as answer:
            return json.load(answer)

    def stored(self) -> int:
        count = int(self.statistics()["CountInstances"])
        files = sum(len(names) for _, _, names in os.walk(self.storage))
        if files < count:
            raise RuntimeError(f"Orthanc counts {count} instances but its storage holds {files} files")
        return count


def stop_system_orthanc() -> None:
    """apt may have started Orthanc's own service (it listens on 4242/8042): stop it."""
    try:
        active = subprocess.run(["systemctl", "is-active", "orthanc"], capture_output=True, text=True,
                                timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        active = ""
    if active == "active":
        LOGGER.warning("stopping the system's orthanc service (apt started it)")
        subprocess.run(["systemctl", "stop", "orthanc"], capture_output=True, timeout=60)


def available_peers() -> tuple[dict[str, type[Peer]], dict[str, str]]:
    """The peers that can run, and why each other one is skipped."""
    peers, skipped = {WATCHER: WatcherPeer}, {}
    if shutil.which("storescu") is None:
        raise SystemExit("DCMTK's storescu is needed to send (apt-get install dcmtk)")
    if shutil.which("storescp"):
        peers[STORESCP] = StorescpPeer
    else:
        skipped[STORESCP] = "DCMTK's storescp is not installed"
    if orthanc_binary():
        peers[ORTHANC] = OrthancPeer
    else:
        skipped[ORTHANC] = "Orthanc is not installed (apt-get install -y orthanc)"
    peers[PYNETDICOM] = PynetdicomPeer
    return peers, skipped


# -- measuring a process tree from /proc ---------------------------------------------------------

def _stat(pid: int) -> list[str]:
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()


def tree_cpu_seconds(pid: int) -> float:
    """utime + stime of ``pid``, of every descendant (zombies too), and of the children each has
    reaped (cutime + cstime). Descendants are read before their parent: a child reaped in
    between is counted twice rather than not at all (rare; it errs on the receiver's side)."""
    ticks = 0
    for member in [*descendants(pid), pid]:
        try:
            fields = _stat(member)
        except OSError:
            continue
        ticks += sum(int(fields[i]) for i in (11, 12, 13, 14))
    return ticks / CLOCK_TICKS


# -- the senders -------------------------------------------------------------------------------

def quiet_pynetdicom() -> None:
    logging.getLogger("pynetdicom").setLevel(logging.WARNING)


def echo(port: int, ae_title: str) -> bool:
    from pynetdicom import AE
    from pynetdicom.sop_class import Verification

    quiet_pynetdicom()
    ae = AE(ae_title=CALLING_AE)
    ae.add_requested_context(Verification)
    ae.acse_timeout = ae.network_timeout = 5
    logger = logging.getLogger("pynetdicom")
    level, logger.level = logger.level, logging.CRITICAL  # "connection refused" until it listens
    try:
        assoc = ae.associate("127.0.0.1", port, ae_title=ae_title)
    except OSError:
        return False
    finally:
        logger.setLevel(level)
    if not assoc.is_established:
        return False
    try:
        return getattr(assoc.send_c_echo(), "Status", None) == 0x0000
    finally:
        assoc.release()


SUCCESS_LINE = "Received Store Response (Success)"
RESPONSE = re.compile(r"Received Store Response \(([^)]*)\)")


def storescu(folders: list[Path], peer: Peer, logs: Path) -> float:
    """One ``storescu -v`` per folder, all at once (folder i to the peer's port i, modulo its
    ports); wall seconds until the last exits. Raises unless each exited 0 and answered Success
    for every file of its folder."""
    logs.mkdir(parents=True, exist_ok=True)
    procs = []
    started = time.perf_counter()
    for index, folder in enumerate(folders):
        log = (logs / f"storescu-{index}.log").open("wb")
        port = peer.ports[index % len(peer.ports)]
        command = ["storescu", "-v", "-aet", CALLING_AE, "-aec", peer.ae_title, "127.0.0.1", str(port),
                   "+sd", str(folder)]
        procs.append((subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=log, stderr=log, env=_env()),
                      log, folder, logs / f"storescu-{index}.log"))
    for proc, log, *_ in procs:
        try:
            proc.wait(timeout=SENDER_TIMEOUT)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()
    seconds = time.perf_counter() - started
    for proc, _, folder, log_path in procs:
        expected = sum(1 for _ in folder.iterdir())
        statuses = collections.Counter(RESPONSE.findall(log_path.read_text(errors="replace")))
        if proc.returncode != 0 or statuses.get("Success", 0) != expected or len(statuses) > 1:
            tail = "\n".join(log_path.read_text(errors="replace").splitlines()[-15:])
            raise RuntimeError(f"storescu to {peer.name} exited {proc.returncode}, answers {dict(statuses)} "
                               f"for {expected} files:\n{tail}")
    return seconds


def paced_c_stores(datasets: list, peer: Peer, rate: float) -> list[float]:
    """One association, one C-STORE every 1/rate s; each round trip in ms. Raises unless every
    status is Success."""
    from pynetdicom import AE
    from pynetdicom.sop_class import CTImageStorage
    from pydicom.uid import ExplicitVRLittleEndian

    quiet_pynetdicom()
    ae = AE(ae_title=CALLING_AE)
    ae.add_requested_context(CTImageStorage, ExplicitVRLittleEndian)
    assoc = ae.associate("127.0.0.1", peer.port, ae_title=peer.ae_title)
    if not assoc.is_established:
        raise RuntimeError(f"no association with {peer.name}")
    sock = getattr(getattr(assoc.dul, "socket", None), "socket", None)
    if sock is not None:  # pynetdicom leaves Nagle on: measure the receiver, not the sender's delay
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    times, failed = [], []
    try:
        start = time.perf_counter()
        for index, ds in enumerate(datasets):
            delay = start + index / rate - time.perf_counter()
            if delay > 0:
                time.sleep(delay)
            sent = time.perf_counter()
            status = getattr(assoc.send_c_store(ds), "Status", None)
            times.append((time.perf_counter() - sent) * 1000)
            if status != 0x0000:
                failed.append(status)
    finally:
        if assoc.is_established:
            assoc.release()
    if failed:
        raise RuntimeError(f"{len(failed)} of {len(datasets)} C-STOREs to {peer.name} failed: {failed[:5]}")
    return times


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100)."""
    ordered = sorted(values)
    rank = max(1, -(-len(ordered) * q // 100))
    return ordered[int(rank) - 1]


# -- the inputs ----------------------------------------------------------------------------------

@dataclass
class Inputs:
    small_folders: list[Path]
    small_count: int
    small_bytes: int
    large_folder: Path
    large_count: int
    large_bytes: int
    paced: list  # pydicom datasets, in memory


def make_inputs(root: Path, plan: Plan) -> Inputs:
    """The small objects split over one folder per sender, the large ones, the paced ones."""
    folders = [root / "small" / f"sender{i}" for i in range(plan.senders)]
    for folder in folders:
        folder.mkdir(parents=True)
    size = 0
    for index, (rel, data) in enumerate(small_instances(plan.small_count, seed=11)):
        (folders[index % plan.senders] / rel.name).write_bytes(data)
        size += len(data)
    large = make_large(root / "large", (plan.large_size,) * plan.large_count, seed=12)
    paced = [pydicom.dcmread(io.BytesIO(data)) for _, data in small_instances(plan.paced_count, seed=13)]
    os.sync()
    return Inputs(folders, plan.small_count, size, root / "large", len(large),
                  sum(p.stat().st_size for p in large), paced)


# -- the cases -----------------------------------------------------------------------------------

def _checked(peer: Peer, expected: int) -> int:
    """The receiver's count once every sender was answered; raises on a shortfall."""
    stored = peer.stored()
    if stored != expected:
        raise RuntimeError(f"{peer.name} holds {stored} objects, {expected} were sent and acknowledged")
    return stored


def _load() -> float:
    return round(os.getloadavg()[0], 2)


def case_small(peer: Peer, inputs: Inputs, logs: Path) -> dict:
    load = _load()
    before = tree_cpu_seconds(peer.pid)
    seconds = storescu(inputs.small_folders, peer, logs)
    time.sleep(0.3)  # storescp's forked children exit and are reaped
    cpu = tree_cpu_seconds(peer.pid) - before
    stored = _checked(peer, inputs.small_count)
    row = make_row("receive small", f"{peer.name} receive", files=stored, bytes_=inputs.small_bytes,
                   seconds=seconds, procs=len(inputs.small_folders))
    row.update(cpu_seconds=round(cpu, 3), cpu_ms_per_object=round(cpu * 1000 / stored, 3),
               load_1m=[load, _load()])
    return row


def case_large(peer: Peer, inputs: Inputs, logs: Path) -> dict:
    load = _load()
    before = tree_cpu_seconds(peer.pid)
    with Sampler(peer.pid) as memory:
        seconds = storescu([inputs.large_folder], peer, logs)
        time.sleep(0.3)
    cpu = tree_cpu_seconds(peer.pid) - before
    stored = _checked(peer, inputs.large_count)
    row = make_row("receive large", f"{peer.name} receive", files=stored, bytes_=inputs.large_bytes,
                   seconds=seconds)
    row.update(cpu_seconds=round(cpu, 3), peak_rss_mb=round(memory.hwm_kb / 1024, 1),
               tree_peak_pss_mb=round(memory.tree_pss_kb / 1024, 1), load_1m=[load, _load()])
    return row


def case_latency(peer: Peer, inputs: Inputs, plan: Plan) -> dict:
    load = _load()
    times = paced_c_stores(inputs.paced, peer, plan.paced_rate)
    stored = _checked(peer, len(inputs.paced))
    row = make_row("receive paced", f"{peer.name} receive", files=stored, bytes_=0,
                   seconds=len(times) / plan.paced_rate, moves_bytes=False)
    row.update(files_per_s=plan.paced_rate, latency_ms={
        "p50": round(percentile(times, 50), 2), "p99": round(percentile(times, 99), 2),
        "max": round(max(times), 2), "mean": round(statistics.fmean(times), 2)}, load_1m=[load, _load()])
    return row


CASES = ("small", "large", "paced")


def measure(scratch: Path, quick: bool = False, rounds: int = 1, log_dir: Path | None = None,
            plan: Plan | None = None) -> list[dict]:
    """Every case on every peer, ``rounds`` times, peers interleaved within each case and round;
    a fresh receiver for each. Rows for skipped peers say why."""
    plan = plan or (QUICK if quick else FULL)
    peers, skipped = available_peers()
    for name, why in skipped.items():
        LOGGER.warning("skipping %s: %s", name, why)
    LOGGER.info("receive: generating inputs (%d small, %d x %d MB, %d paced)", plan.small_count,
                plan.large_count, plan.large_size // 10**6, plan.paced_count)
    inputs = make_inputs(scratch / "receive-inputs", plan)
    rows = []
    try:
        for round_ in range(1, rounds + 1):
            for case in CASES:
                for name, factory in peers.items():
                    slug = f"{re.sub(r'[^a-z]+', '', name.lower())}-{case}-r{round_}"
                    LOGGER.info("receive %s: %s, round %d of %d, load %.2f", case, name, round_, rounds,
                                _load())
                    with factory(scratch / "receive" / slug, log_dir) as peer:
                        peer.start()
                        if case == "small":
                            row = case_small(peer, inputs, scratch / "receive" / "logs" / slug)
                        elif case == "large":
                            row = case_large(peer, inputs, scratch / "receive" / "logs" / slug)
                        else:
                            row = case_latency(peer, inputs, plan)
                        peer.stop()
                        row.update(peer=name, case=case, round=round_, exit_code=peer.exit_code,
                                   log_problems=getattr(peer, "log_problems", None))
                        if name == WATCHER:  # others edit watcher/ while benchmarks run
                            row["watcher_code"] = peer.run.code
                    LOGGER.info("%s", row)
                    rows.append(row)
    finally:
        shutil.rmtree(scratch / "receive-inputs", ignore_errors=True)
    for name, why in skipped.items():
        rows.append({"corpus": "receive", "what": f"{name} receive", "peer": name, "skipped": why})
    return rows


# -- the table -----------------------------------------------------------------------------------

# (case, label, how a row gives it, higher is better)
FIGURES = (
    ("small", "small objects: objects/s", lambda r: r["files_per_s"], True),
    ("small", "small objects: CPU-ms per object (receiver tree)", lambda r: r["cpu_ms_per_object"], False),
    ("large", "large objects: MB/s", lambda r: r["mb_per_s"], True),
    ("large", "large objects: peak RSS MB (largest process)", lambda r: r["peak_rss_mb"], False),
    ("large", "large objects: peak PSS MB (whole tree)", lambda r: r["tree_peak_pss_mb"], False),
    ("paced", "paced C-STORE round trip p50 ms", lambda r: r["latency_ms"]["p50"], False),
    ("paced", "paced C-STORE round trip p99 ms", lambda r: r["latency_ms"]["p99"], False),
)


def _spread(values: list[float]) -> tuple[float | None, str]:
    if not values:
        return None, "–"
    middle = statistics.median(values)
    text = _cell(float(middle))
    if len(values) > 1:
        text += f" ({_cell(float(min(values)))}–{_cell(float(max(values)))})"
    return middle, text


def table(rows: list[dict], plan_note: str = "") -> str:
    """One line per figure: each peer's median (min–max over the rounds), and the ratios
    dicom-watcher / storescp, dicom-watcher / Orthanc and dicom-watcher / pynetdicom alone (of
    the medians)."""
    measured = [r for r in rows if not r.get("skipped")]
    names = [name for name in PEERS if any(r["peer"] == name for r in measured)]
    lines = []
    for case, label, get, _ in FIGURES:
        cells, medians = [], {}
        for name in names:
            values = [get(r) for r in measured if r["peer"] == name and r["case"] == case]
            medians[name], text = _spread([v for v in values if v is not None])
            cells.append(text)
        ratios = []
        for other in COMPARED:
            if other in names and medians.get(WATCHER) and medians.get(other):
                ratios.append(f"{medians[WATCHER] / medians[other]:.2f}")
            else:
                ratios.append(None)
        lines.append((label, *cells, *ratios))
    headers = ("figure", *names, *(f"{WATCHER} / {other}" for other in COMPARED))
    out = _table(headers, lines)
    rounds = max((r.get("round", 1) for r in measured), default=0)
    counts = {case: next((r["files"] for r in measured if r["case"] == case), None) for case in CASES}
    sizes = next((r["bytes"] / 1e6 for r in measured if r["case"] == "large"), 0)
    out += (f"\n\n{rounds} round(s), median (min–max); each case on a fresh receiver. small: "
            f"{counts['small']} objects from {next((r['procs'] for r in measured if r['case'] == 'small'), '?')}"
            f" concurrent storescu; large: {counts['large']} objects, {sizes:,.0f} MB in all, one storescu; "
            f"paced: {counts['paced']} C-STOREs on one pynetdicom association. Every object was "
            f"acknowledged with Success and found stored. For objects/s and MB/s higher is better, "
            f"for the rest lower.")
    for row in rows:
        if row.get("skipped"):
            out += f"\n{row['peer']}: skipped: {row['skipped']}"
    codes = list(dict.fromkeys(r["watcher_code"] for r in measured if r.get("watcher_code")))
    if codes:
        changed = " (it changed during the run: the rounds measured different code!)" if len(codes) > 1 else ""
        out += f"\ndicom-watcher code{changed}: {', '.join(codes)}"
    problems = [r for r in measured if r.get("log_problems")]
    if problems:
        out += f"\ndicom-watcher logged ERROR/Traceback lines in {len(problems)} run(s): see its logs"
    return out + (f"\n{plan_note}" if plan_note else "")


# -- where dicom-watcher's receiver spends its CPU -------------------------------------------------

def pyspy_path() -> str | None:
    beside = Path(sys.executable).with_name("py-spy")
    return str(beside) if beside.exists() else shutil.which("py-spy")


def summarize(raw: Path, top: int = 30) -> str:
    """py-spy's collapsed stacks (active samples only, no --idle): samples per thread, and the
    top frames by own and by cumulative samples over every thread."""
    per_thread, own, cumulative = collections.Counter(), collections.Counter(), collections.Counter()
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        frames, samples = stack.split(";"), int(count)
        while frames and frames[0].startswith("process "):
            frames = frames[1:]
        thread = re.sub(r"\d+", "N", frames[0].split(":", 1)[-1].strip()) if frames and \
            frames[0].startswith("thread") else "?"
        body = frames[1:] if frames and frames[0].startswith("thread") else frames
        per_thread[thread] += samples
        if body:
            own[body[-1]] += samples
        for frame in set(body):
            cumulative[frame] += samples
    total = max(sum(per_thread.values()), 1)
    out = [f"py-spy, active (non-idle) samples only, {total:,} in all", "", "By thread:"]
    out += [f"  {100 * n / total:5.1f} %  {name}" for name, n in per_thread.most_common(12)]
    for title, counter in (("own", own), ("cumulative", cumulative)):
        out += ["", f"Top {top} by {title} samples (% of all active samples):"]
        out += [f"  {100 * n / total:5.1f} %  {frame}" for frame, n in counter.most_common(top)]
    return "\n".join(out)


def profile(scratch: Path, quick: bool = False, log_dir: Path | None = None,
            plan: Plan | None = None) -> tuple[dict, str]:
    """The small case once, dicom-watcher under ``py-spy record`` (every process of the service,
    every thread, 100 samples/s, active samples only): (its row, the summary)."""
    plan = plan or (QUICK if quick else FULL)
    pyspy = pyspy_path()
    if pyspy is None:
        raise SystemExit("py-spy is not installed: pip install py-spy")
    out_dir = log_dir or scratch
    out_dir.mkdir(parents=True, exist_ok=True)
    raw = out_dir / "receive-profile.pyspy.txt"
    command = [pyspy, "record", "--rate", "100", "--threads", "--subprocesses", "--function",
               "--format", "raw", "--output", str(raw), "--", *service_command()]
    inputs = make_inputs(scratch / "receive-inputs", plan)
    try:
        with WatcherPeer(scratch / "receive" / "profile", log_dir, command=command) as peer:
            peer.start()
            row = case_small(peer, inputs, scratch / "receive" / "logs" / "profile")
            peer.stop()
            row.update(peer=WATCHER, case="small (under py-spy)", round=1)
    finally:
        shutil.rmtree(scratch / "receive-inputs", ignore_errors=True)
    for _ in range(100):  # py-spy writes its file once the service has exited
        if raw.exists():
            break
        time.sleep(0.1)
    return row, f"raw stacks: {raw}\n\n" + summarize(raw)
