"""A person races the real service: what gets removed is what was imported, and nothing else.

Each test runs ``dicom-watcher run`` as a subprocess (two importer processes, as by
default on this machine) or a real ``Service``, and a second real process that does
what people do at the worst moment: renames a new file over the one being
imported, writes over it in place, runs ``verify --repair`` in a loop, starts the
service a second time, or makes a folder impossible to write.
"""

import hashlib
import json
import logging
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from conftest import make_config, wait_for, write_config_file
from dicomfiles import write
from watcher import models
from watcher.models import Event, Instance, Rejection

IS_ROOT = os.geteuid() == 0


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def start_service(cfg_path: Path, *extra) -> subprocess.Popen:
    """The service, its log in a file (a pipe nobody reads would fill up and block it)."""
    log = open(cfg_path.with_name(f"service-{time.monotonic_ns()}.log"), "w+")
    proc = subprocess.Popen([sys.executable, "-m", "watcher", *extra, "run", "--config", str(cfg_path)],
                            stdout=log, stderr=subprocess.STDOUT, text=True)
    proc.log = log
    return proc


def stop(proc: subprocess.Popen) -> str:
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=60)
    proc.log.seek(0)
    err = proc.log.read()
    proc.log.close()
    assert proc.returncode == 0, err[-3000:]
    return err


def cli(cfg_path: Path, *args, timeout=120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "watcher", args[0], "--config", str(cfg_path), *args[1:]],
                          capture_output=True, text=True, timeout=timeout)


def heartbeat_seen(db_url: str) -> bool:
    try:
        return models.Heartbeat.select().where(models.Heartbeat.state == "running").exists()
    except Exception:
        return False


REPLACER = textwrap.dedent("""
    import os, random, sys, time
    staging, drop, mode, n = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
    rng = random.Random(7)
    for i in range(n):
        name = os.path.join(drop, f"f{i}.dcm")
        os.rename(os.path.join(staging, f"v1_{i}.dcm"), name)
        time.sleep(rng.uniform(0, 0.03))
        new = os.path.join(staging, f"v2_{i}.dcm")
        if mode == "rename":  # rsync, mv -f, a re-export: a new file renamed over the name
            os.rename(new, name)
        else:  # cp: the same inode truncated and written again
            with open(new, "rb") as f:
                data = f.read()
            with open(name, "wb") as f:
                f.write(data)
""")


@pytest.mark.parametrize("mode", ["rename", "cp"])
def test_file_replaced_while_being_imported_is_imported_in_its_turn(tmp_path, db_url, mode):
    """The last version written under each name always ends in the database; no name is
    removed unimported, and every stored original is one whole version."""
    n = 120
    cfg = write_config_file(tmp_path, db_url, watch={"rescan_seconds": 2})
    staging = tmp_path / "staging"
    finals, versions = {}, {}
    for i in range(n):
        v1 = write(staging / f"v1_{i}.dcm", rows=16, columns=16).read_bytes()
        v2 = write(staging / f"v2_{i}.dcm", rows=16, columns=16).read_bytes()
        finals[f"f{i}.dcm"] = sha(v2)
        versions[sha(v1)], versions[sha(v2)] = v1, v2
    proc = start_service(cfg)
    try:
        models.connect(db_url)
        assert wait_for(lambda: heartbeat_seen(db_url), timeout=30)
        subprocess.run([sys.executable, "-c", REPLACER, str(staging), str(tmp_path / "drop"), mode, str(n)],
                       check=True, timeout=120)
        imported = lambda: {i.sha256 for i in Instance.select(Instance.sha256)}
        assert wait_for(lambda: set(finals.values()) <= imported(), timeout=90), (
            sorted(set(finals.values()) - imported())[:5], sorted(os.listdir(tmp_path / "drop"))[:10])
        assert wait_for(lambda: not list((tmp_path / "drop").iterdir()), timeout=30)
    finally:
        err = stop(proc)
    assert "Traceback" not in err, err[-3000:]
    assert Rejection.select().count() == 0, [(r.source, r.detail) for r in Rejection.select()]
    for i in Instance.select():  # each stored original is exactly one version's bytes
        assert (tmp_path / "archive" / i.stored_path).read_bytes() == versions[i.sha256]
    models.database.close()


REPAIRER = textwrap.dedent("""
    import os, sys
    from pathlib import Path
    from watcher import config, models, verify
    cfg = config.load(sys.argv[1])
    models.connect(cfg.database.url)
    repairs = removed = 0
    while not os.path.exists(sys.argv[2]):
        found = verify.verify(cfg.archive.dir, rehash=False)
        removed += len(verify.repair(cfg.archive.dir, found))
        repairs += 1
        if len(sys.argv) > 3:  # (rounds so far: a test may pace its drops by them)
            Path(sys.argv[3]).write_text(str(repairs))
    print(repairs, removed)
""")


def test_verify_repair_in_a_loop_during_a_heavy_import_loses_nothing(tmp_path, db_url):
    """Files copied with their old mtime (cp -a, rsync -a) while an administrator runs
    ``verify --repair`` over and over: every original a row points at is still there."""
    n, batches = 1500, 3
    cfg = write_config_file(tmp_path, db_url, watch={"rescan_seconds": 2})
    staging = tmp_path / "staging"
    old = time.time() - 7200
    for i in range(n):
        path = write(staging / f"s{i % batches}" / f"{i}.dcm", rows=4, columns=4)
        os.utime(path, (old, old))
    proc = start_service(cfg)
    done, rounds = tmp_path / "done-repairing", tmp_path / "repair-rounds"
    counted = lambda: int(rounds.read_text() or 0) if rounds.exists() else 0  # noqa: E731
    try:
        models.connect(db_url)
        assert wait_for(lambda: heartbeat_seen(db_url), timeout=30)
        repairer = subprocess.Popen([sys.executable, "-c", REPAIRER, str(cfg), str(done), str(rounds)],
                                    stdout=subprocess.PIPE, text=True)
        assert wait_for(lambda: counted() >= 1, timeout=60)  # repairing already
        for b in range(batches):  # each batch dropped in while the repairs go on, a round apart
            before = counted()
            os.rename(staging / f"s{b}", tmp_path / "drop" / f"s{b}")
            assert wait_for(lambda: counted() > before, timeout=60)
        wait_for(lambda: Instance.select().count() == n, timeout=120)
        done.touch()
        repairs, _ = map(int, repairer.communicate(timeout=60)[0].split())
    finally:
        stop(proc)
    assert repairs >= 1 + batches
    assert Instance.select().count() == n
    result = cli(cfg, "verify", "--json")
    found = json.loads(result.stdout)
    assert result.returncode == 0 and found["missing"] == [] and found["mismatched"] == [], found
    assert not any(list((tmp_path / "drop" / f"s{b}").iterdir()) for b in range(batches))
    models.database.close()


def test_second_service_on_one_database_is_refused_and_a_killed_one_blocks_nothing(tmp_path, db_url):
    cfg = write_config_file(tmp_path, db_url)
    first = start_service(cfg)
    try:
        models.connect(db_url)
        assert wait_for(lambda: heartbeat_seen(db_url), timeout=30)
        started = time.monotonic()
        second = cli(cfg, "run", timeout=30)
        assert second.returncode != 0 and time.monotonic() - started < 15
        assert f"pid {first.pid}" in second.stderr and "already imports" in second.stderr, second.stderr
        scan = cli(cfg, "scan", "--final", timeout=30)
        assert scan.returncode != 0 and f"pid {first.pid}" in scan.stderr, scan.stderr
    finally:
        first.kill()  # kill -9: no clean-up of any kind
        first.wait(timeout=30)
        first.log.close()
    third = start_service(cfg)
    try:
        write(tmp_path / "drop" / "after.dcm")
        assert wait_for(lambda: Instance.select().count() == 1, timeout=30)
    finally:
        stop(third)
    models.database.close()


def test_two_scans_at_once_import_each_file_exactly_once(tmp_path, db_url):
    """Two administrators run ``scan --final`` at the same moment: one is refused at once,
    naming the other, or waits its turn; either way every file is imported once, none lost."""
    cfg = write_config_file(tmp_path, db_url)
    written = {}
    for i in range(150):
        path = write(tmp_path / "drop" / f"s{i // 50}" / f"f{i}.dcm")
        written[path.name] = sha(path.read_bytes())
    scans = [subprocess.Popen([sys.executable, "-m", "watcher", "scan", "--final", "--config", str(cfg)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    results = [(p.wait(timeout=120), *p.communicate()) for p in scans]
    codes = sorted(code for code, _, _ in results)
    assert codes[0] == 0, results
    if codes[1] != 0:  # refused: says who holds the database
        refused = next(err for code, _, err in results if code != 0)
        assert "already imports" in refused and "pid" in refused, refused
    models.connect(db_url)
    rows = list(Instance.select())
    assert len(rows) == len(written) == len({r.sop_instance_uid for r in rows})
    assert {Path(r.source).name: r.sha256 for r in rows} == written
    assert not [p for p in (tmp_path / "drop").rglob("*") if p.is_file()]
    models.database.close()


@pytest.fixture
def immutable():
    """chattr +i: not even root may add, remove or rename entries of such a folder."""
    if not IS_ROOT:
        pytest.skip("chattr +i needs root")
    made = []

    def make(folder: Path):
        folder.mkdir(parents=True, exist_ok=True)
        result = subprocess.run(["chattr", "+i", str(folder)], capture_output=True, text=True)
        if result.returncode != 0:
            pytest.skip(f"chattr +i does not work here: {result.stderr.strip()}")
        made.append(folder)

    def release(folder: Path):
        subprocess.run(["chattr", "-i", str(folder)], check=True)
        made.remove(folder)

    make.release = release
    yield make
    for folder in made:
        subprocess.run(["chattr", "-i", str(folder)])


def test_file_that_cannot_be_removed_is_reported_once_and_scan_fails_naming_it(tmp_path, db_url, immutable):
    cfg = write_config_file(tmp_path, db_url)
    locked = tmp_path / "drop" / "locked"
    write(locked / "a.dcm")
    (tmp_path / "drop" / "junk.txt").write_text("not dicom " * 30)
    immutable(locked)
    rejected_dir = tmp_path / "rejected"
    immutable(rejected_dir)
    started = time.monotonic()
    result = cli(cfg, "scan", "--final", timeout=60)
    assert time.monotonic() - started < 30
    assert result.returncode == 1, result.stderr
    assert "locked/a.dcm" in result.stderr and "junk.txt" in result.stderr
    assert result.stderr.count("Traceback") == 0, result.stderr[-2000:]
    models.connect(db_url)
    assert [e.outcome for e in Event.select()] == ["imported"]  # the rejection did not happen
    assert Rejection.select().count() == 0
    assert (locked / "a.dcm").exists() and (tmp_path / "drop" / "junk.txt").exists()
    models.database.close()


def test_service_retries_an_undisposable_file_slowly_with_one_warning_and_one_event(
        tmp_path, db_url, immutable, caplog, monkeypatch):
    import watcher.service
    from watcher.service import Service
    monkeypatch.setattr(watcher.service, "DISPOSE_RETRY_SECONDS", 3.0)
    cfg = make_config(tmp_path, db_url, watch={"rescan_seconds": 0.5}, **{"import": {"processes": 1}})
    models.connect(cfg.database.url)
    locked = cfg.watch.drop_dir / "locked"
    write(locked / "a.dcm")
    (locked / "junk.txt").write_text("not dicom " * 30)
    immutable(locked)
    caplog.set_level(logging.WARNING, logger="watcher")
    with Service(cfg):
        assert wait_for(lambda: Instance.select().count() == 1, timeout=30)
        time.sleep(5)  # ten rescans, and at least one slow retry
        warnings = [r for r in caplog.records if r.levelno >= logging.WARNING and "locked" in r.getMessage()]
        assert len(warnings) == 2, [r.getMessage() for r in warnings]  # one per file
        assert [e.outcome for e in Event.select()] == ["imported"]
        immutable.release(locked)
        assert wait_for(lambda: not (locked / "a.dcm").exists() and not (locked / "junk.txt").exists(),
                        timeout=30)
    assert sorted(e.outcome for e in Event.select()) == ["imported", "rejected"]
    assert Rejection.get().source == "locked/junk.txt"
    models.database.close()


def test_rejected_path_taken_by_a_folder_gets_a_free_name(config):
    from watcher.pipeline import ingest
    drop, rejected = config.watch.drop_dir, config.archive.rejected_dir
    (rejected / "x.txt").mkdir(parents=True)  # a folder where the file would go
    (rejected / "sub").write_text("a file where a folder would go")
    (drop / "x.txt").write_text("junk " * 50)
    (drop / "sub").mkdir()
    (drop / "sub" / "y.txt").write_text("more junk " * 50)
    assert ingest(drop / "x.txt", config).outcome == "rejected"
    assert ingest(drop / "sub" / "y.txt", config).outcome == "rejected"
    assert (rejected / "x.txt.1").read_text() == "junk " * 50
    assert (rejected / "sub.1" / "y.txt").read_text() == "more junk " * 50
    assert sorted(r.path for r in Rejection.select()) == [str(rejected / "sub.1" / "y.txt"),
                                                          str(rejected / "x.txt.1")]


JUNK_WRITER = textwrap.dedent("""
    import os, sys, time
    staging, drop, rounds = sys.argv[1], sys.argv[2], int(sys.argv[3])
    names = ["x.txt", "x.txt.1", "x.txt.2"]
    os.makedirs(os.path.join(drop, "r"), exist_ok=True)
    for r in range(rounds):
        for name in names:
            target = os.path.join(drop, "r", name)
            deadline = time.monotonic() + 30
            while os.path.lexists(target) and time.monotonic() < deadline:
                time.sleep(0.002)
            tmp = os.path.join(staging, f"{r}-{name}")
            with open(tmp, "w") as f:
                f.write(f"junk {r} {name} " * 20)
            os.rename(tmp, target)
""")


def test_rejected_files_racing_for_one_name_never_replace_each_other(tmp_path, db_url):
    """Two importer processes reject files whose free names collide (x.txt.1 is both the
    second x.txt and the first x.txt.1): every rejected file is kept, each with its row."""
    rounds = 100
    cfg = write_config_file(tmp_path, db_url, watch={"rescan_seconds": 1})
    staging = tmp_path / "staging"
    staging.mkdir()
    proc = start_service(cfg)
    try:
        models.connect(db_url)
        assert wait_for(lambda: heartbeat_seen(db_url), timeout=30)
        subprocess.run([sys.executable, "-c", JUNK_WRITER, str(staging), str(tmp_path / "drop"), str(rounds)],
                       check=True, timeout=300)
        assert wait_for(lambda: Rejection.select().count() == 3 * rounds, timeout=60), Rejection.select().count()
    finally:
        stop(proc)
    kept = [p for p in (tmp_path / "rejected").rglob("*") if p.is_file()]
    contents = {p.read_text() for p in kept}
    assert len(kept) == 3 * rounds and len(contents) == 3 * rounds
    for r in Rejection.select():
        assert Path(r.path).exists() and sha(Path(r.path).read_bytes()) == r.sha256
    assert Event.select().where(Event.outcome == "rejected").count() == 3 * rounds
    models.database.close()


def test_file_with_an_mtime_in_the_future_is_imported(tmp_path, db_url):
    """cp -p from a skewed clock, FAT or ISO time zones: the settle logic measures change."""
    cfg = write_config_file(tmp_path, db_url)
    future = time.time() + 86400
    path = write(tmp_path / "drop" / "future.dcm")
    os.utime(path, (future, future))
    started = time.monotonic()
    result = cli(cfg, "scan", "--final", timeout=60)
    assert result.returncode == 0 and "imported 1" in result.stdout, result.stderr
    assert time.monotonic() - started < 30
    path = write(tmp_path / "drop" / "future2.dcm")
    os.utime(path, (future, future))
    proc = start_service(cfg)
    try:
        models.connect(db_url)
        assert wait_for(lambda: Instance.select().count() == 2, timeout=30)
    finally:
        stop(proc)
    models.database.close()


@pytest.fixture
def rejected_elsewhere(tmp_path, db_url):
    """A config whose rejected folder is on another file system (tmpfs): moves are copies."""
    shm = Path("/dev/shm")
    if not shm.is_dir() or os.stat(shm).st_dev == os.stat(tmp_path).st_dev:
        pytest.skip("no second file system at /dev/shm")
    import tempfile
    elsewhere = Path(tempfile.mkdtemp(dir=shm))
    cfg = make_config(tmp_path, db_url, archive={"rejected_dir": str(elsewhere / "rejected")})
    models.connect(cfg.database.url)
    yield cfg
    models.database.close()
    import shutil
    shutil.rmtree(elsewhere)


def test_rejection_to_another_file_system_never_takes_a_file_from_its_writer(rejected_elsewhere):
    """A file still being written looks truncated; even once it counts as final, its copy to
    another file system and the unlink of its source wait for the writer to close it."""
    from watcher.pipeline import ingest
    cfg = rejected_elsewhere
    whole = write(cfg.watch.drop_dir.parent / "whole.dcm", rows=64, columns=64).read_bytes()
    path = cfg.watch.drop_dir / "slow.dcm"
    with open(path, "wb") as writer:
        writer.write(whole[:len(whole) // 2])
        writer.flush()
        assert ingest(path, cfg, final=True).outcome == "pending"
        writer.write(whole[len(whole) // 2:])
    assert path.read_bytes() == whole  # nothing of the writer's was lost
    assert ingest(path, cfg).outcome == "imported"
    junk = cfg.watch.drop_dir / "junk.txt"
    junk.write_text("not dicom " * 40)
    assert ingest(junk, cfg).outcome == "rejected"
    assert not junk.exists()
    assert (cfg.archive.rejected_dir / "junk.txt").read_text() == "not dicom " * 40
