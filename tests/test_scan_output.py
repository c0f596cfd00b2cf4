"""What ``scan``, ``retry`` and ``export`` tell a person: progress on a terminal, what a scan
waits for, and a --json summary a script can read."""

import json
import os
import pty
import select
import subprocess
import sys
import time

from conftest import write_config_file
from dicomfiles import write


def watcher(cfg, *args, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "watcher", args[0], "--config", str(cfg), *args[1:]],
                          capture_output=True, text=True, timeout=120, **kwargs)


def test_scan_json_summarises_every_outcome(tmp_path):
    cfg = write_config_file(tmp_path, f"sqlite:///{tmp_path}/w.db")
    drop = tmp_path / "drop"
    for i in range(3):
        write(drop / f"a{i}.dcm")
    (drop / "notes.txt").write_text("not DICOM")
    result = watcher(cfg, "scan", "--final", "--json")
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)
    assert summary["imported"] == 3 and summary["rejected"] == 1 and summary["pending"] == 0
    assert summary["undisposed"] == {}


def test_scan_on_a_terminal_shows_progress_and_what_it_waits_for(tmp_path):
    # settling long enough that a loaded machine still starts the scan within it
    cfg = write_config_file(tmp_path, f"sqlite:///{tmp_path}/w.db", watch={"settle_seconds": 4})
    drop = tmp_path / "drop"
    for i in range(40):
        write(drop / "series" / f"im{i}.dcm")
    master, slave = pty.openpty()
    proc = subprocess.Popen([sys.executable, "-m", "watcher", "scan", "--config", str(cfg)],
                            stdout=subprocess.PIPE, stderr=slave, text=True)
    os.close(slave)
    shown = b""
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        ready, _, _ = select.select([master], [], [], 0.5)
        if ready:
            try:
                chunk = os.read(master, 65536)
            except OSError:  # the other end closed: the scan is over
                break
            if not chunk:
                break
            shown += chunk
        elif proc.poll() is not None:
            break
    proc.wait(timeout=60)
    os.close(master)
    text = shown.decode(errors="replace")
    assert proc.returncode == 0, text
    assert "40 of 40 files done" in text, text
    assert "waiting for" in text and "files to settle" in text, text  # fresh files settle first
    assert "emptied folders to be quiet" in text, text  # the emptied series/ folder (not --final)


def test_scan_not_on_a_terminal_prints_no_progress_line(tmp_path):
    cfg = write_config_file(tmp_path, f"sqlite:///{tmp_path}/w.db")
    write(tmp_path / "drop" / "a.dcm")
    result = watcher(cfg, "scan", "--final")
    assert result.returncode == 0 and "\r" not in result.stderr and "files done" not in result.stderr


def test_scan_final_removes_emptied_folders_without_waiting(tmp_path):
    """--final says the folder is at rest: a disc copy's emptied folders go at once, however
    deep (each level used to wait settle_seconds after its child was removed)."""
    cfg = write_config_file(tmp_path, f"sqlite:///{tmp_path}/w.db", watch={"settle_seconds": 5})
    deep = tmp_path / "drop" / "disc" / "DICOM" / "PAT1" / "STUDY1" / "SER1"
    path = write(deep / "IM1")
    old = time.time() - 60
    os.utime(path, (old, old))
    result = watcher(cfg, "scan", "--final")
    assert result.returncode == 0, result.stderr
    assert not list((tmp_path / "drop").iterdir())
    assert "emptied folders to be quiet" not in result.stderr


def test_retry_and_export_print_a_json_summary(tmp_path):
    cfg = write_config_file(tmp_path, f"sqlite:///{tmp_path}/w.db")
    drop = tmp_path / "drop"
    original = write(drop / "ct.dcm").read_bytes()
    (drop / "junk.txt").write_text("junk")
    assert watcher(cfg, "scan", "--final").returncode == 0
    import pydicom
    uid = pydicom.dcmread(tmp_path / "archive" / next(
        str(p.relative_to(tmp_path / "archive")) for p in (tmp_path / "archive").rglob("*.dcm"))).StudyInstanceUID
    exported = watcher(cfg, "export", uid, str(tmp_path / "out"), "--json")
    assert exported.returncode == 0, exported.stderr
    summary = json.loads(exported.stdout)
    assert summary["copied"] == 1 and len(summary["files"]) == 1
    assert open(summary["files"][0], "rb").read() == original
    retried = watcher(cfg, "retry", "--json")
    assert retried.returncode == 0, retried.stderr
    assert json.loads(retried.stdout) == {"put_back": 1, "sources": ["junk.txt"]}
    assert (drop / "junk.txt").read_text() == "junk"
