"""The systemd unit and the sd_notify talk: readiness, the watchdog, the hardening score.

The service runs as a real subprocess with $NOTIFY_SOCKET pointing at a datagram
socket this test binds, as systemd would; ``systemd-analyze`` rates and checks the
real unit file.
"""

import glob
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from conftest import wait_for, write_config_file
from dicomfiles import write
from watcher import systemd

UNIT = Path(__file__).resolve().parent.parent / "etc" / "dicom-watcher.service"
MAX_EXPOSURE = 4.0
PR_SET_MDWE, PR_MDWE_REFUSE_EXEC_GAIN = 65, 1


class Listener:
    """The systemd end of $NOTIFY_SOCKET: collects the messages the service sends."""

    def __init__(self, address: str):
        self.address = address
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind("\0" + address[1:] if address.startswith("@") else address)
        self.got: list[tuple[float, str]] = []  # (when, message), in order

    def read(self, seconds: float) -> list[str]:
        """Everything that arrives within ``seconds``."""
        new = []
        deadline = time.monotonic() + seconds
        while (left := deadline - time.monotonic()) > 0:
            self.sock.settimeout(left)
            try:
                data = self.sock.recv(4096)
            except TimeoutError:
                break
            for line in data.decode().splitlines():
                self.got.append((time.monotonic(), line))
                new.append(line)
        return new

    def wait_for(self, message: str, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            if message in self.read(min(left, 0.2)):
                return True
        return False

    def close(self):
        self.sock.close()


@pytest.fixture
def listener(tmp_path):
    lst = Listener(str(tmp_path / "notify.sock"))
    yield lst
    lst.close()


def start(tmp_path, notify_socket: str, processes: int, prefix=()) -> subprocess.Popen:
    """``dicom-watcher run`` on SQLite, told it runs under systemd with a 2 s watchdog."""
    cfg = write_config_file(tmp_path, f"sqlite:///{tmp_path}/watcher.db",
                            watch={"rescan_seconds": 60}, **{"import": {"processes": processes}})
    env = dict(os.environ, NOTIFY_SOCKET=notify_socket, WATCHDOG_USEC="2000000")
    env.pop("WATCHDOG_PID", None)  # systemd sets it to the main pid; unset means "you"
    log = (tmp_path / "service.log").open("wb")
    return subprocess.Popen([*prefix, sys.executable, "-m", "watcher", "run", "--config", str(cfg)],
                            env=env, stdout=subprocess.DEVNULL, stderr=log, cwd=tmp_path)


def stop(proc: subprocess.Popen, tmp_path, signalled=False) -> str:
    """SIGTERM (once: systemd sends one), wait, and return the service's log."""
    if not signalled and proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    return (tmp_path / "service.log").read_text()


def children(pid: int) -> list[int]:
    found = []
    for path in glob.glob(f"/proc/{pid}/task/*/children"):
        found += [int(c) for c in Path(path).read_text().split()]
    return found


# -- sd_notify -----------------------------------------------------------------------

def test_notify_is_a_no_op_without_systemd(monkeypatch):
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    monkeypatch.delenv("WATCHDOG_USEC", raising=False)
    assert systemd.notify("READY=1") is False
    assert systemd.watchdog_seconds() is None


@pytest.mark.parametrize("abstract", [False, True], ids=["path", "abstract"])
def test_notify_sends_one_datagram_to_the_socket(monkeypatch, tmp_path, abstract):
    address = f"@dicom-watcher-test-{uuid.uuid4().hex}" if abstract else str(tmp_path / "n.sock")
    lst = Listener(address)
    try:
        monkeypatch.setenv("NOTIFY_SOCKET", address)
        assert systemd.notify("STATUS=importing\nREADY=1") is True
        assert lst.read(1.0) == ["STATUS=importing", "READY=1"]
    finally:
        lst.close()


def test_notify_to_a_socket_nobody_listens_on_returns_false(monkeypatch, tmp_path):
    monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "gone.sock"))
    assert systemd.notify("READY=1") is False


def test_watchdog_interval_is_only_for_the_process_systemd_names(monkeypatch):
    monkeypatch.setenv("WATCHDOG_USEC", "30000000")
    monkeypatch.delenv("WATCHDOG_PID", raising=False)
    assert systemd.watchdog_seconds() == 30.0
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid()))
    assert systemd.watchdog_seconds() == 30.0
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid() + 1))  # a forked child's view
    assert systemd.watchdog_seconds() is None
    monkeypatch.setenv("WATCHDOG_USEC", "0")
    monkeypatch.delenv("WATCHDOG_PID")
    assert systemd.watchdog_seconds() is None


# -- the service under a (test) systemd ------------------------------------------------

@pytest.mark.parametrize("processes", [1, 2])
def test_service_says_ready_pings_the_watchdog_and_says_stopping(tmp_path, listener, processes):
    proc = start(tmp_path, listener.address, processes)
    try:
        assert listener.wait_for("READY=1", timeout=30), (tmp_path / "service.log").read_text()
        if processes > 1:
            assert len(children(proc.pid)) == processes  # ready only once every importer is
        pings = [m for m in listener.read(3.5) if m == "WATCHDOG=1"]
        assert len(pings) >= 3  # every WATCHDOG_USEC / 2 = 1 s
    finally:
        proc.send_signal(signal.SIGTERM)
        stopping = listener.wait_for("STOPPING=1", timeout=10)
        log = stop(proc, tmp_path, signalled=True)
    assert stopping
    assert proc.returncode == 0, log[-2000:]
    messages = [m for _, m in listener.got]
    assert messages.count("READY=1") == 1
    assert messages.index("READY=1") < messages.index("WATCHDOG=1") < messages.index("STOPPING=1")


def test_watchdog_pings_stop_while_an_importer_is_hung_and_resume_when_it_is_back(tmp_path):
    listener = Listener(f"@dicom-watcher-test-{uuid.uuid4().hex}")
    proc = start(tmp_path, listener.address, processes=2)
    hung = None
    try:
        assert listener.wait_for("READY=1", timeout=30), (tmp_path / "service.log").read_text()
        assert listener.wait_for("WATCHDOG=1", timeout=3)
        hung = children(proc.pid)[1]
        os.kill(hung, signal.SIGSTOP)
        listener.read(5.0)  # the supervisor notices within 3 s (STALE_SECONDS)
        assert "WATCHDOG=1" not in listener.read(3.0)  # (it pinged every second before)
        os.kill(hung, signal.SIGCONT)
        hung = None
        assert listener.wait_for("WATCHDOG=1", timeout=5)
        assert [m for m in listener.read(2.5) if m == "WATCHDOG=1"]  # and goes on
    finally:
        if hung:
            os.kill(hung, signal.SIGCONT)
        log = stop(proc, tmp_path)
        listener.read(0.5)
        listener.close()
    assert proc.returncode == 0, log[-2000:]
    assert "importer 2 of 2 has shown no life" in log
    assert [m for _, m in listener.got][-1] == "STOPPING=1"


def test_watchdog_pings_stop_while_a_dead_importer_is_being_replaced(tmp_path, listener):
    proc = start(tmp_path, listener.address, processes=2)
    try:
        assert listener.wait_for("READY=1", timeout=30), (tmp_path / "service.log").read_text()
        dead = children(proc.pid)[0]
        os.kill(dead, signal.SIGKILL)
        assert wait_for(lambda: dead not in children(proc.pid), timeout=5)
        listener.read(1.0)  # (a ping may have left just before the supervisor saw the death)
        assert "WATCHDOG=1" not in listener.read(1.0)  # it restarts the importer after 2 s
        assert listener.wait_for("WATCHDOG=1", timeout=15)  # back: pings resume
        assert len(children(proc.pid)) == 2
    finally:
        log = stop(proc, tmp_path)
    assert proc.returncode == 0, log[-2000:]


MDWE = [sys.executable, "-c",  # run argv[1:] under PR_SET_MDWE: no memory both writable and executable
        "import ctypes, os, sys\n"
        f"if ctypes.CDLL(None).prctl({PR_SET_MDWE}, {PR_MDWE_REFUSE_EXEC_GAIN}, 0, 0, 0) != 0:\n"
        "    sys.exit(3)\n"
        "os.execv(sys.argv[1], sys.argv[1:])\n"]
WX_MAP = ("import mmap\n"
          "try:\n"
          "    mmap.mmap(-1, 4096, prot=mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC)\n"
          "    print('allowed')\n"
          "except PermissionError:\n"
          "    print('refused')\n")


def test_service_imports_with_memory_deny_write_execute(tmp_path, listener):
    """MemoryDenyWriteExecute=true in the unit: CPython and our ctypes calls must not need
    writable code. The kernel's PR_SET_MDWE is the same rule, kept across exec and fork."""
    probe = subprocess.run([*MDWE, sys.executable, "-c", WX_MAP], capture_output=True, text=True)
    if probe.returncode == 3:
        pytest.skip("this kernel has no PR_SET_MDWE (Linux 6.3+)")
    assert probe.stdout.strip() == "refused", probe  # the rule holds in what the wrapper runs
    proc = start(tmp_path, listener.address, processes=2, prefix=MDWE)
    try:
        assert listener.wait_for("READY=1", timeout=30), (tmp_path / "service.log").read_text()
        write(tmp_path / "drop" / "a.dcm")
        assert wait_for(lambda: not any((tmp_path / "drop").iterdir()), timeout=30)
        assert list((tmp_path / "archive").rglob("*.dcm"))
    finally:
        log = stop(proc, tmp_path)
    assert proc.returncode == 0, log[-2000:]
    assert "Traceback" not in log, log[-2000:]


# -- the unit file ---------------------------------------------------------------------

ANALYZE = shutil.which("systemd-analyze")
needs_analyze = pytest.mark.skipif(ANALYZE is None, reason="systemd-analyze is not installed")


@needs_analyze
def test_unit_is_rated_at_most_4_0_by_systemd_analyze_security(tmp_path):
    unit = tmp_path / UNIT.name
    shutil.copy(UNIT, unit)
    result = subprocess.run([ANALYZE, "security", "--offline=true", str(unit)],
                            capture_output=True, text=True, timeout=60)
    match = re.search(r"Overall exposure level for \S+: (\d+\.\d+)", result.stdout)
    assert match, result.stdout + result.stderr
    assert float(match.group(1)) <= MAX_EXPOSURE, result.stdout


@needs_analyze
def test_unit_passes_systemd_analyze_verify(tmp_path):
    """Checked in a root of its own: the system's units, and a stand-in for the installed command."""
    root = tmp_path / "root"
    system_units = next((p for p in (Path("/usr/lib/systemd/system"), Path("/lib/systemd/system"))
                         if (p / "multi-user.target").exists()), None)
    if system_units is None:
        pytest.skip("no systemd unit folder (multi-user.target) on this machine")
    shutil.copytree(system_units, root / "usr/lib/systemd/system", symlinks=True)
    (root / "etc/systemd/system").mkdir(parents=True)
    shutil.copy(UNIT, root / "etc/systemd/system" / UNIT.name)
    exec_start = re.search(r"^ExecStart=(\S+)", UNIT.read_text(), re.M).group(1)
    command = root / exec_start.lstrip("/")
    command.parent.mkdir(parents=True)
    command.write_text("#!/bin/sh\n")
    command.chmod(0o755)
    result = subprocess.run([ANALYZE, "verify", f"--root={root}", UNIT.name],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and not result.stdout.strip() and not result.stderr.strip(), \
        result.stdout + result.stderr


def test_unit_lets_the_service_write_only_where_its_folders_are():
    text = UNIT.read_text()
    settings = dict(re.findall(r"^(\w+)=(.*)$", text, re.M))
    assert settings["Type"] == "notify" and settings["NotifyAccess"] == "main"
    assert settings["ProtectSystem"] == "strict"
    writable = " ".join(re.findall(r"^ReadWritePaths=(.*)$", text, re.M)).split()
    assert {p.lstrip("-") for p in writable} == {
        "/srv/dicom/drop", "/srv/dicom/archive", "/srv/dicom/rejected", "/srv/dicom/done",
        "/var/lib/dicom-watcher"}
