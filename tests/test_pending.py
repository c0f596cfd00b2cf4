"""What is waiting, and why; is the service alive: ``pending`` and ``status`` tell a person and a monitor."""

import json
import os
import signal
import subprocess
import sys
import time

from pydicom.data import get_testdata_file

from conftest import make_config, wait_for, write_config_file
from dicomfiles import write
from watcher import models
from watcher.models import Rejection, Waiting
from watcher.service import Service


def cli_json(cfg_path, *args):
    """A read command as a person runs it: another process, beside the service."""
    result = subprocess.run([sys.executable, "-m", "watcher", args[0], "--config", str(cfg_path), *args[1:],
                             "--json"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def test_pending_lists_every_file_without_an_outcome_with_its_state_and_why(tmp_path, db_url):
    cfg_path = write_config_file(tmp_path, db_url, watch={"rescan_seconds": 0.5})
    cfg = make_config(tmp_path, db_url, watch={"rescan_seconds": 0.5})
    drop = cfg.watch.drop_dir
    models.connect(cfg.database.url)
    hidden = write(drop / ".hidden" / "a.dcm")
    tilde = write(drop / "~scan.dcm")
    whole = write(tmp_path / "whole.dcm", rows=32, columns=32).read_bytes()
    (drop / "cut.dcm").write_bytes(whole[:len(whole) - 100])
    held = write(drop / "held.dcm")
    with open(held, "r+b"), Service(cfg):
        assert wait_for(lambda: Waiting.select().count() == 2, timeout=30)
        rows = {r["path"]: r for r in cli_json(cfg_path, "pending")}
        status = cli_json(cfg_path, "status")
    assert rows[".hidden/a.dcm"]["state"] == "ignored" and "'.*'" in rows[".hidden/a.dcm"]["detail"]
    assert rows["~scan.dcm"]["state"] == "ignored" and "'~*'" in rows["~scan.dcm"]["detail"]
    assert rows["cut.dcm"]["state"] == "incomplete" and rows["cut.dcm"]["detail"]
    assert rows["held.dcm"]["state"] == "open-for-writing"
    assert rows["held.dcm"]["node"] == "test-node" and rows["held.dcm"]["next_attempt"]
    assert set(rows) == {".hidden/a.dcm", "~scan.dcm", "cut.dcm", "held.dcm"}
    assert status["pending"]["ignored"] == 2 and status["pending"]["incomplete"] == 1
    assert status["pending"]["open-for-writing"] == 1
    assert hidden.exists() and tilde.exists()
    assert Waiting.select().count() == 0  # a stopped service holds nothing back
    models.database.close()


def test_image_without_pixel_data_rows_or_columns_is_rejected_as_missing_attribute(config):
    """The TINY_ALPHA files of pydicom: CT Image Storage objects that are structurally whole
    but have no Rows, Columns or Pixel Data. Not truncated: missing what their class needs."""
    from watcher.pipeline import ingest
    tiny = get_testdata_file("dicomdirtests/TINY_ALPHA/PT000000/ST000000/SE000000/IM00000J")
    path = config.watch.drop_dir / "IM00000J"
    path.write_bytes(open(tiny, "rb").read())
    assert ingest(path, config).outcome == "pending"
    outcome = ingest(path, config, final=True)
    assert outcome.outcome == "rejected" and outcome.reason == "missing-attribute"
    assert "Rows, Columns, Pixel Data" in outcome.detail
    assert Rejection.get().reason == "missing-attribute"


def test_status_check_tells_a_monitor_whether_the_service_is_alive(tmp_path, db_url):
    cfg_path = write_config_file(tmp_path, db_url)

    def check():
        return subprocess.run([sys.executable, "-m", "watcher", "status", "--check", "--config", str(cfg_path)],
                              capture_output=True, text=True, timeout=60)

    before = check()
    assert before.returncode == 1 and "has the service run yet?" in before.stderr  # no database yet
    log = open(tmp_path / "service.log", "w")
    proc = subprocess.Popen([sys.executable, "-m", "watcher", "run", "--config", str(cfg_path)],
                            stdout=log, stderr=subprocess.STDOUT)
    try:
        assert wait_for(lambda: check().returncode == 0, timeout=30)
        assert check().stdout.startswith("ok:")
        os.kill(proc.pid, signal.SIGKILL)  # its importers die with it; nobody writes "stopped"
        proc.wait(timeout=30)
        started = time.monotonic()
        assert wait_for(lambda: check().returncode == 1, timeout=40, step=1)
        assert time.monotonic() - started < 30
        dead = check()
        assert "not responding" in dead.stdout and dead.stdout.count("\n") == 1
        status = subprocess.run([sys.executable, "-m", "watcher", "status", "--config", str(cfg_path)],
                                capture_output=True, text=True, timeout=60)
        assert "not responding" in status.stdout and "running" not in status.stdout
    finally:
        if proc.poll() is None:
            proc.kill()
        log.close()


def test_ignored_file_that_looks_like_dicom_is_warned_about_once_after_a_day(tmp_path, db_url, caplog):
    """``.hidden/a.dcm`` and ``report.tmp`` are DICOM hidden by the ignore patterns; Thumbs.db is
    not DICOM. Seen by a service whose clock says two days have passed: two WARNINGs, each
    naming its pattern, and no more on the next look."""
    import logging
    cfg = make_config(tmp_path, db_url, watch={"rescan_seconds": 120})
    models.connect(cfg.database.url)
    write(cfg.watch.drop_dir / ".hidden" / "a.dcm")
    write(cfg.watch.drop_dir / "report.tmp")
    (cfg.watch.drop_dir / "Thumbs.db").write_bytes(b"\0" * 600)
    caplog.set_level(logging.WARNING)
    two_days_on = lambda: time.time() + 2 * 86400
    with Service(cfg, clock=two_days_on) as service:
        assert wait_for(lambda: len([r for r in caplog.records if "ignored for" in r.getMessage()]) == 2)
        service.check_ignored()
    warned = [r.getMessage() for r in caplog.records if "ignored for" in r.getMessage()]
    assert len(warned) == 2, warned
    assert any("'.hidden/a.dcm'" in m and "'.*'" in m for m in warned)
    assert any("'report.tmp'" in m and "'*.tmp'" in m for m in warned)
    models.database.close()


def test_ignored_file_is_not_warned_about_before_a_day(tmp_path, caplog):
    import logging
    cfg = make_config(tmp_path, f"sqlite:///{tmp_path}/w.db", watch={"rescan_seconds": 120})
    models.connect(cfg.database.url)
    write(cfg.watch.drop_dir / ".hidden" / "a.dcm")
    caplog.set_level(logging.WARNING)
    with Service(cfg) as service:
        service.check_ignored()
    assert not [r for r in caplog.records if "ignored for" in r.getMessage()]
    models.database.close()
