"""Log lines a person (and journald) can use: priorities, process names, one traceback per
distinct error, SQL only when asked for."""

import io
import logging
import os
import signal
import subprocess
import sys

from conftest import wait_for, write_config_file
from dicomfiles import write
from watcher import logs


def run_cli(cfg, *args, stderr_path, env=None):
    with open(stderr_path, "w") as err:
        return subprocess.run([sys.executable, "-m", "watcher", *args[:-1], args[-1], "--config", str(cfg)],
                              stdout=subprocess.PIPE, stderr=err, text=True, timeout=120,
                              env={**os.environ, **(env or {})})


def test_lines_carry_their_syslog_priority_when_stderr_is_the_journal(tmp_path):
    cfg = write_config_file(tmp_path, f"sqlite:///{tmp_path}/w.db")
    write(tmp_path / "drop" / "a.dcm")
    (tmp_path / "drop" / "junk.txt").write_text("junk")
    err = tmp_path / "stderr"
    err.touch()
    st = os.stat(err)
    result = run_cli(cfg, "scan", stderr_path=err, env={"JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino}"})
    assert result.returncode == 0
    lines = err.read_text().splitlines()
    assert any(line.startswith("<6>") and "imported" in line for line in lines), lines
    assert any(line.startswith("<4>") and "rejected" in line for line in lines), lines
    assert all(line[:1] == "<" and line[2:3] == ">" for line in lines), lines


def test_lines_have_no_priority_prefix_when_stderr_is_not_the_journal(tmp_path):
    cfg = write_config_file(tmp_path, f"sqlite:///{tmp_path}/w.db")
    write(tmp_path / "drop" / "a.dcm")
    err = tmp_path / "stderr"
    result = run_cli(cfg, "scan", stderr_path=err, env={"JOURNAL_STREAM": "1:2"})  # someone else's
    assert result.returncode == 0
    assert not [line for line in err.read_text().splitlines() if line.startswith("<")]


def test_each_importer_process_names_itself_in_its_lines(tmp_path):
    cfg = write_config_file(tmp_path, f"sqlite:///{tmp_path}/w.db", **{"import": {"processes": 2}})
    log = tmp_path / "service.log"
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "watcher", "run", "--config", str(cfg)],
                                stdout=out, stderr=subprocess.STDOUT)
    try:
        assert wait_for(lambda: log.read_text().count("watching ") == 2, timeout=30)
        for i in range(20):
            write(tmp_path / "drop" / f"f{i}.dcm")
        assert wait_for(lambda: log.read_text().count(" imported ") == 20, timeout=30)
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)
    watching = [line for line in log.read_text().splitlines() if "watching " in line]
    assert {line.split()[2] for line in watching} == {"test-node", "test-node#1"}, watching
    imported = [line for line in log.read_text().splitlines() if " imported " in line]
    assert {line.split()[2] for line in imported} <= {"test-node", "test-node#1"}


def test_the_same_error_prints_its_traceback_once():
    out = io.StringIO()
    logs.setup(stream=out)
    log = logging.getLogger("watcher.test")
    try:
        for attempt in range(3):
            for name in ("a.dcm", "b.dcm"):
                try:
                    raise PermissionError(13, "Permission denied")
                except PermissionError:
                    log.warning("retry %s", name, exc_info=True)
        try:
            raise ValueError("another error")
        except ValueError:
            log.error("giving up", exc_info=True)
    finally:
        logs.setup()  # back to stderr
    text = out.getvalue()
    assert text.count("Traceback") == 2, text  # one for each distinct error
    assert text.count("traceback shown before") == 5, text
    assert text.count("retry ") == 6


def test_v_shows_our_debug_lines_and_only_vv_shows_sql(tmp_path):
    cfg = write_config_file(tmp_path, f"sqlite:///{tmp_path}/w.db")
    write(tmp_path / "drop" / "a.dcm")
    err1, err2 = tmp_path / "v.log", tmp_path / "vv.log"
    assert run_cli(cfg, "-v", "scan", stderr_path=err1).returncode == 0
    write(tmp_path / "drop" / "b.dcm")
    assert run_cli(cfg, "-vv", "scan", stderr_path=err2).returncode == 0
    v, vv = err1.read_text(), err2.read_text()
    assert " DEBUG watcher." in v and " DEBUG peewee" not in v and "SELECT" not in v, v[-2000:]
    assert "SELECT" in vv or "INSERT" in vv, vv[-2000:]
