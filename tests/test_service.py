"""The real service (subprocess or Service object with a real observer) imports files as they complete."""

import os
import signal
import subprocess
import sys
import time

import pytest

from conftest import wait_for, make_config, write_config_file
from dicomfiles import write
from watcher import models, report
from watcher.models import Instance
from watcher.service import Service



def imported_count():
    return Instance.select().count()


@pytest.fixture(params=[False, True], ids=["events", "polling"])
def service_config(request, tmp_path, db_url):
    cfg = make_config(tmp_path, db_url, watch={"settle_seconds": 1, "rescan_seconds": 2,
                                               "poll": request.param})
    models.connect(cfg.database.url)
    yield cfg
    models.database.close()


def test_file_present_before_start_is_imported(service_config, tmp_path):
    write(service_config.watch.drop_dir / "early.dcm")
    with Service(service_config):
        assert wait_for(lambda: imported_count() == 1)
    assert not (service_config.watch.drop_dir / "early.dcm").exists()


def test_file_copied_in_is_imported(service_config, tmp_path):
    src = write(tmp_path / "outside.dcm")
    with Service(service_config):
        (service_config.watch.drop_dir / "in.dcm").write_bytes(src.read_bytes())
        assert wait_for(lambda: imported_count() == 1)
    assert Instance.get().source == "in.dcm"


def test_slow_write_is_imported_only_when_complete_and_intact(service_config, tmp_path):
    data = write(tmp_path / "big.dcm", rows=128, columns=128).read_bytes()
    target = service_config.watch.drop_dir / "slow.dcm"
    with Service(service_config):
        with open(target, "wb") as f:
            for i in range(0, len(data), len(data) // 8):
                f.write(data[i:i + len(data) // 8])
                f.flush()
                time.sleep(0.6)  # longer than nothing, shorter than settle: a slow copy
                assert imported_count() == 0, "imported before the writer finished"
        assert wait_for(lambda: imported_count() == 1)
    stored = service_config.archive.dir / Instance.get().stored_path
    assert stored.read_bytes() == data


def test_stalled_writer_is_never_imported_early(service_config, tmp_path):
    """A writer that stops longer than settle_seconds mid-file: the completeness proof holds it back."""
    data = write(tmp_path / "big.dcm", rows=64, columns=64).read_bytes()
    target = service_config.watch.drop_dir / "stall.dcm"
    with Service(service_config):
        with open(target, "wb") as f:
            f.write(data[:len(data) // 2])
            f.flush()
            time.sleep(2.5)  # settle_seconds is 1
            assert imported_count() == 0 and target.exists()
            f.write(data[len(data) // 2:])
        assert wait_for(lambda: imported_count() == 1)
    assert (service_config.archive.dir / Instance.get().stored_path).read_bytes() == data


def test_renamed_in_from_part_is_imported(service_config, tmp_path):
    data = write(tmp_path / "x.dcm").read_bytes()
    part = service_config.watch.drop_dir / "upload.dcm.part"
    with Service(service_config):
        part.write_bytes(data)
        time.sleep(2.5)
        assert imported_count() == 0 and part.exists()  # ignored while it has a temp name
        part.rename(service_config.watch.drop_dir / "upload.dcm")
        assert wait_for(lambda: imported_count() == 1)


def test_many_files_dropped_at_once_are_imported_exactly_once(service_config, tmp_path):
    drop = service_config.watch.drop_dir
    with Service(service_config):
        for i in range(1000):
            write(drop / f"s{i // 100}" / f"{i:04d}.dcm", rows=2, columns=2)
        assert wait_for(lambda: imported_count() == 1000, timeout=120)
        time.sleep(1)
    assert Instance.select().count() == 1000
    assert len({i.sop_instance_uid for i in Instance.select()}) == 1000
    assert not any(p.is_file() for p in drop.rglob("*"))


def test_fast_path_commits_before_settle_seconds(tmp_path, db_url):
    cfg = make_config(tmp_path, db_url, watch={"settle_seconds": 5, "rescan_seconds": 60})
    models.connect(cfg.database.url)
    data = write(tmp_path / "x.dcm").read_bytes()
    with Service(cfg):
        tmp = cfg.watch.drop_dir / ".incoming"
        tmp.write_bytes(data)
        started = time.monotonic()
        tmp.rename(cfg.watch.drop_dir / "fast.dcm")
        assert wait_for(lambda: imported_count() == 1, timeout=4.5)
        elapsed = time.monotonic() - started
        closed = cfg.watch.drop_dir / "closed.dcm"
        write(closed)  # written and closed in place: a close-after-write event
        assert wait_for(lambda: imported_count() == 2, timeout=4.5)
    assert elapsed < 5
    models.database.close()


def test_service_heartbeat_is_shown_by_status(service_config):
    from watcher import report
    with Service(service_config):
        nodes = report.status()["nodes"]
        assert nodes[0]["node"] == "test-node" and nodes[0]["state"] == "running"
    assert report.status()["nodes"][0]["state"] == "stopped"


def test_sigterm_exits_zero_promptly_with_nothing_half_done(tmp_path, db_url):
    cfg_path = write_config_file(tmp_path, db_url, watch={"settle_seconds": 1, "rescan_seconds": 1})
    drop = tmp_path / "drop"
    for i in range(200):
        write(drop / f"{i}.dcm", rows=2, columns=2)
    proc = subprocess.Popen([sys.executable, "-m", "watcher", "run", "--config", str(cfg_path)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    time.sleep(1.5)
    proc.send_signal(signal.SIGTERM)
    started = time.monotonic()
    out, err = proc.communicate(timeout=20)
    assert proc.returncode == 0, err.decode()[-2000:]
    assert time.monotonic() - started < 5
    models.connect(f"{db_url}")
    left = {p.name for p in drop.iterdir()}
    sources = {i.source for i in Instance.select()}
    assert left | sources == {f"{i}.dcm" for i in range(200)}
    assert not left & sources  # nothing both imported and still in the drop folder
    models.database.close()


def test_backlog_larger_than_the_queue_is_taken_in_slices(service_config, monkeypatch):
    import watcher.service
    monkeypatch.setattr(watcher.service, "MAX_QUEUED", 40)
    for i in range(300):
        write(service_config.watch.drop_dir / f"{i:03d}.dcm", rows=2, columns=2)
    with Service(service_config) as service:
        assert len(service.schedule) <= 40
        assert wait_for(lambda: imported_count() == 300, timeout=60)


def test_file_moved_in_from_outside_is_imported_before_settle_seconds(tmp_path, db_url):
    cfg = make_config(tmp_path, db_url, watch={"settle_seconds": 5, "rescan_seconds": 60})
    models.connect(cfg.database.url)
    outside = write(tmp_path / "elsewhere" / "x.dcm")
    with Service(cfg):
        time.sleep(5.5)  # so the file itself is settled: only the event can make it wait
        os.utime(outside)  # a fresh change, as a copy that just finished
        outside.rename(cfg.watch.drop_dir / "moved.dcm")
        assert wait_for(lambda: imported_count() == 1, timeout=4)
    models.database.close()


def _children(pid: int) -> list[int]:
    return [int(c) for c in open(f"/proc/{pid}/task/{pid}/children").read().split()]


def test_importer_processes_share_the_work_and_one_that_dies_is_replaced(tmp_path, db_url):
    cfg_path = write_config_file(tmp_path, db_url, watch={"settle_seconds": 1, "rescan_seconds": 1},
                                 **{"import": {"processes": 2, "workers": 2}})
    drop = tmp_path / "drop"
    for i in range(300):
        write(drop / f"a{i}.dcm", rows=2, columns=2)
    log = tmp_path / "service.log"  # (a pipe nobody reads would fill up and stall the service)
    proc = subprocess.Popen([sys.executable, "-m", "watcher", "run", "--config", str(cfg_path)],
                            stdout=subprocess.DEVNULL, stderr=log.open("wb"))
    try:
        assert wait_for(lambda: len(_children(proc.pid)) == 2)
        assert wait_for(lambda: not any(drop.iterdir()), timeout=60)
        first, second = _children(proc.pid)
        os.kill(second, signal.SIGKILL)  # one importer crashes: its share must not be orphaned
        assert wait_for(lambda: len(_children(proc.pid)) == 2 and second not in _children(proc.pid))
        for i in range(300):
            write(drop / f"b{i}.dcm", rows=2, columns=2)
        assert wait_for(lambda: not any(drop.iterdir()), timeout=60)
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)
    assert proc.returncode == 0, log.read_text()[-2000:]
    assert not os.path.exists(f"/proc/{first}")  # the children stopped with their parent
    models.connect(f"{db_url}")
    try:
        sources = [i.source for i in Instance.select()]
        assert sorted(sources) == sorted([f"a{i}.dcm" for i in range(300)] + [f"b{i}.dcm" for i in range(300)])
        nodes = {n["node"]: n["state"] for n in report.status()["nodes"]}
        assert nodes == {"test-node": "stopped", "test-node#1": "stopped"}
    finally:
        models.database.close()


def test_killing_the_service_kills_its_importers(tmp_path, db_url):
    cfg_path = write_config_file(tmp_path, db_url, **{"import": {"processes": 2}})
    proc = subprocess.Popen([sys.executable, "-m", "watcher", "run", "--config", str(cfg_path)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    assert wait_for(lambda: len(_children(proc.pid)) == 2)
    children = _children(proc.pid)
    proc.kill()
    proc.wait()
    assert wait_for(lambda: not any(os.path.exists(f"/proc/{c}") for c in children), timeout=10)


def test_sigterm_to_every_process_at_once_stops_cleanly(tmp_path, db_url):
    """systemd stops a service by signalling all its processes: no importer is restarted."""
    cfg_path = write_config_file(tmp_path, db_url, **{"import": {"processes": 2}})
    log = tmp_path / "service.log"
    proc = subprocess.Popen([sys.executable, "-m", "watcher", "run", "--config", str(cfg_path)],
                            stdout=subprocess.DEVNULL, stderr=log.open("wb"), start_new_session=True)
    assert wait_for(lambda: len(_children(proc.pid)) == 2)
    assert wait_for(lambda: log.read_text().count("watching") == 2)
    os.killpg(proc.pid, signal.SIGTERM)
    assert proc.wait(timeout=30) == 0
    assert "ERROR" not in log.read_text() and "starting it again" not in log.read_text()
