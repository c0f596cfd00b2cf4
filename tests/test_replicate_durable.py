"""Hostile tests of a replication's durable batch (archive.make_durable, commit.commit_all,
pipeline.ingest_objects with sync=False): a batch's fetched originals wait unsynced under
temporary names in archive/.tmp, one syncfs makes them all durable, only then they take their
final content-addressed names, then their rows are committed. A final name is trusted as
"already stored", so it must never be given to bytes that are not durable.

The ingest process is stopped (SIGSTOP) at exact instants of its batch by a ``sitecustomize``
that only the test's replication sees (on PYTHONPATH, which the ingest process inherits), and
killed there: a crash at that instant. ``strace`` shows the order of the system calls."""

import contextlib
import ctypes
import errno
import hashlib
import json
import os
import re
import shutil
import signal
import stat
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from conftest import wait_for
from test_replicate import a_study, instances_of, site  # noqa: F401 (site: a fixture)
from test_replicate_hostile import (FakeSource, alive, assert_exactly_once, command, incoming_left,
                                    ingest_children, sent_of)

ROOT = Path(__file__).parent.parent
PG_ONLY = pytest.mark.parametrize("db_url", ["postgresql"], indirect=True)  # (conftest's fixture, one of its two)


# --- stopping the ingest process at an exact instant of its batch ------------------------

HOOK = textwrap.dedent('''
    """Loaded by every Python of the test's replication; acts only in its ingest process."""
    import json, os, signal
    from pathlib import Path

    def _ingest_process():
        try:
            return b"watcher.ingest_child" in Path("/proc/self/cmdline").read_bytes()
        except OSError:
            return False

    _point = os.environ.get("DW_STOP_AT", "")
    if _ingest_process() and (_point or os.environ.get("DW_SYNCFS_EIO")):
        import ctypes, errno
        from watcher import archive, pipeline
        _marks = Path(os.environ["DW_MARKS"])
        _batch = []  # (temporary, final) of the batch being made durable
        _skip = int(os.environ.get("DW_STOP_SKIP", "0"))

        def _stop(point, **state):
            """At the first instant ``point`` is reached with 2 or more waiting (once): say
            so, with the state, and stop (SIGSTOP): the test looks, then kills or continues."""
            if point != _point:
                return
            global _skip
            if _skip:  # (DW_STOP_SKIP: that many such instants go by first)
                _skip -= 1
                return
            try:
                fd = os.open(_marks / (point + ".taken"), os.O_WRONLY | os.O_CREAT | os.O_EXCL)
            except FileExistsError:
                return
            os.close(fd)
            tmp = _marks / (point + ".tmp")
            tmp.write_text(json.dumps(dict(state, pid=os.getpid(), batch=_batch)))
            os.rename(tmp, _marks / point)
            os.kill(os.getpid(), signal.SIGSTOP)

        _link = archive._link_inode
        def _link_inode(fd, dest):
            _link(fd, dest)
            _stop("after_link", linked=str(dest))
        archive._link_inode = _link_inode

        _sync = archive.sync_file_system
        def sync_file_system(path):
            if os.environ.get("DW_SYNCFS_EIO"):  # a disk that fails its writes
                raise OSError(errno.EIO, os.strerror(errno.EIO), str(path))
            _sync(path)
            if len(_batch) >= 2:
                _stop("after_syncfs")
        archive.sync_file_system = sync_file_system

        _place = archive._place
        def _placed(tmp, final):
            _place(tmp, final)
            if len(_batch) >= 2 and str(tmp) == _batch[0][0]:
                _stop("mid_rename")
        archive._place = _placed

        _durable = archive.make_durable
        def make_durable(stored):
            _batch[:] = [(str(s.unsynced), str(s.folder / Path(s.relpath).name))
                         for s in stored if s.unsynced is not None]
            _durable(stored)
            if len(_batch) >= 2:
                _stop("before_commit")
        archive.make_durable = make_durable

        _commit = pipeline.commit_all
        def commit_all(records):
            results = _commit(records)
            if len(_batch) >= 2:
                _stop("after_commit")
            return results
        pipeline.commit_all = commit_all
''')


def hooked(tmp_path: Path, **env) -> tuple[dict, Path]:
    """The environment of a replication whose ingest process runs HOOK; the marks' folder."""
    hook, marks = tmp_path / "hook", tmp_path / "marks"
    hook.mkdir(exist_ok=True)
    marks.mkdir(exist_ok=True)
    (hook / "sitecustomize.py").write_text(HOOK)
    path = os.pathsep.join(p for p in (str(hook), os.environ.get("PYTHONPATH")) if p)
    return os.environ | {"PYTHONPATH": path, "DW_MARKS": str(marks)} | env, marks


def sha_of(path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def day_files(archive_dir: Path) -> list[Path]:
    return [p for p in archive_dir.glob("[0-9][0-9][0-9][0-9]/*/*/*") if p.is_file()]


def waiting_room(site) -> list[Path]:
    tmp = site.config.archive.dir / ".tmp"
    return list(tmp.iterdir()) if tmp.is_dir() else []


def clean(site) -> dict:
    """``verify --json``, which must find nothing at all: no missing or mismatched file, no
    orphan, no temporary file."""
    found = json.loads(site.cli("verify", "--json"))
    assert (found["missing"], found["mismatched"], found["orphans"], found["temporary"]) == (
        [], [], [], []), found
    return found


def rows_are_right(site, sent: dict) -> None:
    """Every row (of any study) points at a file holding exactly the bytes that were sent."""
    from watcher.models import Instance
    for row in Instance.select():
        path = site.config.archive.dir / row.stored_path
        assert path.is_file(), f"{row.sop_instance_uid}: its file {row.stored_path} is missing"
        assert path.read_bytes() == sent[row.sop_instance_uid], row.stored_path
        assert row.stored_path.endswith(f"/{row.sha256}.dcm")


_frozen: list[int] = []  # ingest processes stopped by HOOK: killed after each test, whatever happened


@pytest.fixture(autouse=True)
def no_frozen_process_left():
    yield
    while _frozen:
        pid = _frozen.pop()
        if alive(pid):
            os.kill(pid, signal.SIGKILL)


def stopped_at(proc, marks: Path, point: str, timeout: float = 30) -> dict:
    """The state HOOK wrote when the ingest process of ``proc`` stopped itself at ``point``."""
    assert wait_for(lambda: (marks / point).exists() or proc.poll() is not None, timeout=timeout,
                    step=0.005), f"the ingest process never reached {point}"
    if not (marks / point).exists():
        err = proc.communicate()[1] or ""
        pytest.fail(f"the run ended before any batch of 2 or more reached {point}: {err[-2000:]}")
    state = json.loads((marks / point).read_text())
    _frozen.append(state["pid"])
    return state


@contextlib.contextmanager
def replicating(site, root: str, study: str, env: dict, *args: str):
    """``replicate`` of ``study`` from ``root`` as a process of its own (its output in pipes);
    killed if it still runs when the block ends."""
    proc = subprocess.Popen([*command(site, root, study), *args], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        yield proc
    finally:
        proc.kill()  # (nothing, if it has ended)
        proc.wait()


# --- a crash at each instant of a batch --------------------------------------------------

@PG_ONLY
@pytest.mark.parametrize("point", ["after_syncfs", "mid_rename", "before_commit", "after_commit"])
def test_a_crash_at_each_instant_of_a_durable_batch_loses_and_duplicates_nothing(
        site, tmp_path, point):
    """The ingest process is frozen at one instant of a batch of 2 or more and killed (kill -9)
    there. At that instant: no final name is given before the sync; once named, the bytes are
    the right ones; no row is committed before its original is named. After the kill: the
    command says the ingest process ended and exits 1, every row points at its bytes, and a run
    again stores each instance exactly once, leaving no temporary, no orphan, nothing in
    .incoming."""
    study, files = a_study(tmp_path / "src", 40, series=2)
    env, marks = hooked(tmp_path, DW_STOP_AT=point)
    archive_dir = site.config.archive.dir
    with FakeSource(files) as source:
        sent = sent_of(source)
        with replicating(site, source.root, study, env) as proc:
            state = stopped_at(proc, marks, point)
            batch = state["batch"]
            temporaries = [Path(t) for t, _ in batch]
            finals = [Path(f) for _, f in batch]
            named = [f.exists() for f in finals]
            committed = {r.stored_path for r in instances_of(study)}
            batch_rows = {str(f.relative_to(archive_dir)) for f in finals} & committed
            if point == "after_syncfs":  # synced, not named yet
                assert all(t.exists() for t in temporaries) and not any(named), batch
                assert not batch_rows
            elif point == "mid_rename":  # the first named, the others still waiting
                assert named == [True] + [False] * (len(batch) - 1), (named, batch)
                assert all(t.exists() for t in temporaries[1:]) and not batch_rows
            else:  # all named (and their folder fsynced); committed only after
                assert all(named) and not any(t.exists() for t in temporaries), batch
                assert bool(batch_rows) == (point == "after_commit"), batch_rows
            for f in finals:  # a final name always holds the bytes its name says
                if f.exists():
                    assert sha_of(f) == f.name.removesuffix(".dcm")
            os.kill(state["pid"], signal.SIGKILL)
            _, err = proc.communicate(timeout=30)
        assert proc.returncode == 1, err[-2000:]
        assert "the ingest process ended (killed by signal 9)" in err and "Traceback" not in err, err[-2000:]
        rows_are_right(site, sent)
        before = len(instances_of(study))
        assert before < 40
        [report] = site.replicate("--from", source.root, "--study", study)
        assert (report["stored"], report["present"], report["failed"]) == (40 - before, before, 0), report
        assert_exactly_once(site, study, sent)
    assert not waiting_room(site) and not incoming_left(site)
    clean(site)


# --- the order of the system calls ---------------------------------------------------------

STRACED = re.compile(r"^(?P<call>\w+)\((?P<args>.*)\) += (?P<ret>-?\d+)")


@PG_ONLY
def test_no_final_name_is_given_before_a_sync_that_covers_it_nor_a_row_before_its_folder_fsync(
        site, tmp_path):
    """strace of a whole replication: each original linked into archive/.tmp unsynced is
    renamed to its final name only after a syncfs of the archive's file system made since its
    link; its day folder is fsynced after the rename and before the transaction's COMMIT."""
    if not shutil.which("strace"):
        pytest.skip("strace is needed")
    study, files = a_study(tmp_path / "src", 30, series=2)
    logs = tmp_path / "strace"
    logs.mkdir()
    with FakeSource(files) as source:
        sent = sent_of(source)
        done = subprocess.run(  # (-ff: a file a process, so that no call is split in two lines)
            ["strace", "-ff", "-qq", "-y", "-s", "120", "-o", str(logs / "trace"), "-e",
             "signal=none", "-e", "trace=linkat,rename,renameat,renameat2,syncfs,fsync,fdatasync,sendto",
             *command(site, source.root, study)], cwd=ROOT, capture_output=True, text=True,
            timeout=60)
        assert done.returncode == 0, done.stderr[-2000:]
        assert_exactly_once(site, study, sent)
    archive_dir = str(site.config.archive.dir)
    final = re.compile(re.escape(archive_dir) + r"/(\d{4}/\d\d/\d\d)/[0-9a-f]{64}\.dcm")
    linked, synced, renamed, dir_synced, commits = {}, [], {}, [], []
    for trace in logs.iterdir():  # (trace.<pid>)
        pid = int(trace.suffix[1:])
        for n, line in enumerate(trace.read_text().splitlines()):
            m = STRACED.match(line)
            if not m or int(m["ret"]) < 0:
                continue
            call, args = m["call"], m["args"]
            if call == "linkat" and f"{archive_dir}/.tmp>" in args:
                name = re.search(r'<[^>]*/\.tmp>, "([^"]+)"', args)[1]
                linked[f"{archive_dir}/.tmp/{name}"] = (n, pid)
            elif call == "syncfs" and archive_dir in args:
                synced.append((n, pid))
            elif call.startswith("rename") and f"{archive_dir}/.tmp/" in args and final.search(args):
                tmp = re.search(r'"(' + re.escape(archive_dir) + r'/\.tmp/[^"]+)"', args)[1]
                renamed[tmp] = (n, pid, final.search(args)[1])
            elif call == "fsync" and re.search(re.escape(archive_dir) + r"/\d{4}/\d\d/\d\d>", args):
                dir_synced.append((n, pid, re.search(r"/(\d{4}/\d\d/\d\d)>", args)[1]))
            elif call == "sendto" and "COMMIT" in args:
                commits.append((n, pid))
    shared = [t for t in renamed if t in linked]
    assert len(shared) == 30, f"{len(shared)} of 30 originals were linked unsynced and renamed"
    for tmp in shared:
        (at_link, pid), (at_rename, rpid, day) = linked[tmp], renamed[tmp]
        assert rpid == pid
        assert any(at_link < n < at_rename and p == pid for n, p in synced), (
            f"{tmp} was given its final name with no syncfs since its link")
        later = [n for n, p, d in dir_synced if n > at_rename and p == pid and d == day]
        assert later, f"the folder of {tmp}'s final name was not fsynced after the rename"
        its_commit = min((n for n, p in commits if n > at_rename and p == pid), default=None)
        assert its_commit is not None and later[0] < its_commit, (
            f"{tmp}: its batch was committed before its folder was fsynced")
    # one syncfs a batch, not one an original (the point of the change)
    assert len(synced) < len(shared)


# --- a disk that fails its writes (EIO) at the batch's sync --------------------------------

class _FailingLibc:
    """libc whose syncfs(2) fails with EIO, as on a disk whose writes fail."""

    @staticmethod
    def syncfs(fd):
        ctypes.set_errno(errno.EIO)
        return -1


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_a_batch_whose_sync_fails_with_eio_is_an_outage_as_a_store_is_and_names_nothing(
        config, monkeypatch):
    """EIO from the storage is an outage of the archive (archive.FULL_DISK): met by one
    object's own fsync (ingest_object), the import stops with Unavailable. Met by a batch's one
    syncfs (make_durable), it must be the same; and no final name, no row, no temporary stays."""
    from test_pipeline import incoming_objects
    from watcher import archive
    from watcher.errors import Unavailable
    from watcher.models import Instance
    from watcher.origin import from_replication
    from watcher.pipeline import ingest_object, ingest_objects, is_unavailable
    origin = from_replication("someone", "http://127.0.0.1:1/dicom-web/")
    objects = incoming_objects(config, 3)
    fsync = os.fsync

    def failing_fsync(fd):  # (a file's, not a folder's)
        if stat.S_ISREG(os.fstat(fd).st_mode):
            raise OSError(errno.EIO, os.strerror(errno.EIO))
        return fsync(fd)

    with monkeypatch.context() as patched:
        patched.setattr(os, "fsync", failing_fsync)
        with pytest.raises(Unavailable, match="Input/output error"):
            ingest_object(objects[0][0], origin, config)  # (the reference: one object, synced alone)
    monkeypatch.setattr(archive, "_libc", _FailingLibc)
    outcomes = ingest_objects([dict(path=p, origin=origin) for p, _ in objects], config)
    assert not Instance.select().exists()
    assert not list((config.archive.dir / ".tmp").iterdir()) and not day_files(config.archive.dir)
    assert [p.read_bytes() for p, _ in objects] == [data for _, data in objects]  # untouched
    assert all(is_unavailable(o) for o in outcomes), (
        f"EIO at the batch's syncfs is taken for a fault of each object, not an outage: {outcomes}")


@PG_ONLY
def test_a_replication_whose_archive_fails_its_writes_stops_at_once_and_says_why(site, tmp_path):
    """The archive's disk fails its writes (EIO at every batch's syncfs): the replication
    stops at the first batch, as at any outage of the archive (exit 1, "unavailable", run it
    again once fixed), rather than fetching the whole study only to fail every instance."""
    study, files = a_study(tmp_path / "src", 120, series=12)
    env, _ = hooked(tmp_path, DW_SYNCFS_EIO="1")
    with FakeSource(files) as source:
        done = subprocess.run(command(site, source.root, study) + ["--json"], cwd=ROOT, env=env,
                              capture_output=True, text=True, timeout=60)
        fetched = [r for r in source.requests if "/series/" in r]
    assert done.returncode == 1 and "Traceback" not in done.stderr, done.stderr[-2000:]
    assert not instances_of(study) and not waiting_room(site) and not incoming_left(site)
    assert not day_files(site.config.archive.dir)
    report = json.loads(done.stdout)[0] if done.stdout.strip() else None
    assert report is None, (
        f"the run went on through the study: {len(fetched)} fetches, listed {report['listed']}, "
        f"failed {report['failed']}, first error: {report['errors'][0]}")
    assert "stopped, the archive or the database is unavailable" in done.stderr, done.stderr[-2000:]
    assert "Input/output error" in done.stderr


# --- an archive that runs out of room (inodes) at any point of a batch ---------------------

@pytest.fixture
def archive_on_tmpfs(db_url, tmp_path):
    """The site's archive on a tmpfs of its own (root only), whose inodes a test may ration:
    on tmpfs a file, a folder and each extra hard link take one, so the fetch (a file), the
    batch's link into .tmp and the day's folders (make_durable) can each be the one refused."""
    if os.geteuid() != 0 or not shutil.which("mount"):
        pytest.skip("mounting a tmpfs needs root")
    mnt = tmp_path / "archive"  # (conftest's archive.dir)
    mnt.mkdir(parents=True, exist_ok=True)
    # (room: archive.RESERVE_BYTES, 1 GiB, is never taken by a fetch; tmpfs uses RAM as written)
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1300m,nr_inodes=100000", "tmpfs",
                       str(mnt)]).returncode:
        pytest.skip("cannot mount a tmpfs here")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)])


def free_inodes(mnt: Path, k: int) -> None:
    fs = os.statvfs(mnt)
    used = fs.f_files - fs.f_ffree
    subprocess.run(["mount", "-o", f"remount,nr_inodes={used + k}", str(mnt)], check=True)


@PG_ONLY
def test_an_archive_out_of_inodes_at_any_point_stops_cleanly_and_resumes_exactly_once(
        archive_on_tmpfs, site, tmp_path):
    """The archive's file system runs out of inodes after a few of a run's files (the fetch's
    file, the batch's link into .tmp and the day's folders each take one on tmpfs): the run
    stops and says the disk is full; nothing half-imported (every row has its bytes), nothing
    left in .tmp or .incoming; with room again, a run again stores each instance once."""
    mnt = archive_on_tmpfs
    site.cli("verify", "--repair", "--json")  # (marks the archive, makes its lock files)
    for folder in (".tmp", ".incoming"):
        (mnt / folder).mkdir(exist_ok=True)
    sent = {}
    for k in (2, 6, 12, 18):
        study, files = a_study(tmp_path / f"src{k}", 12)
        with FakeSource(files) as source:
            sent.update(sent_of(source))
            free_inodes(mnt, k)
            out = site.output("--from", source.root, "--study", study, code=1)
            free_inodes(mnt, 100000)
            assert "No space left on device" in out and "Traceback" not in out, out[-2000:]
            rows_are_right(site, sent)
            assert not waiting_room(site) and not incoming_left(site), (waiting_room(site), incoming_left(site))
            [report] = site.replicate("--from", source.root, "--study", study)
            assert report["complete"] and report["failed"] == 0, report
            assert_exactly_once(site, study, sent_of(source))
    clean(site)


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_a_batch_whose_day_folder_cannot_be_made_for_want_of_room_is_an_outage_and_leaves_nothing(
        archive_on_tmpfs, config):
    """The batch's originals are linked into .tmp, then the disk has no inode left for the day's
    folder (make_durable): an outage (Unavailable), no row, no temporary, no final name."""
    from test_pipeline import incoming_objects
    from watcher import archive
    from watcher.errors import Unavailable
    from watcher.models import Instance
    from watcher.origin import from_replication
    from watcher.pipeline import ingest_objects, is_unavailable
    objects = incoming_objects(config, 3)
    for name in (".tmp",):
        (archive_on_tmpfs / name).mkdir()
    for name in archive.LOCKS[:2]:
        (archive_on_tmpfs / name).touch()
    archive._known_dirs.clear()
    free_inodes(archive_on_tmpfs, 3)  # (the three links into .tmp: no folder can be made)
    origin = from_replication("someone", "http://127.0.0.1:1/dicom-web/")
    outcomes = ingest_objects([dict(path=p, origin=origin) for p, _ in objects], config)
    free_inodes(archive_on_tmpfs, 1000)
    causes = [o.__cause__ for o in outcomes]  # (an outage, as store_original's own errors are)
    assert all(isinstance(o, Unavailable) for o in outcomes), outcomes
    assert all(isinstance(c, OSError) and c.errno == errno.ENOSPC for c in causes), causes
    assert all(re.fullmatch(r"\d{4}(/\d\d){0,2}", os.path.relpath(c.filename, archive_on_tmpfs))
               for c in causes), [c.filename for c in causes]  # (the day's folders: make_durable)
    assert all(is_unavailable(o) for o in outcomes)
    assert not Instance.select().exists()
    assert not list((archive_on_tmpfs / ".tmp").iterdir()) and not day_files(archive_on_tmpfs)
    assert [p.read_bytes() for p, _ in objects] == [data for _, data in objects]


@PG_ONLY
def test_the_archive_remounted_read_only_while_a_batch_waits_stops_the_run_and_resumes_once(
        archive_on_tmpfs, site, tmp_path):
    """The archive's file system turns read-only (ext4's errors=remount-ro after a disk error)
    while a batch's original waits unsynced in .tmp: no final name is given, the run stops and
    says the archive is read-only; writable again, a run again completes the study exactly
    once and leaves nothing in .tmp or .incoming."""
    mnt = archive_on_tmpfs
    study, files = a_study(tmp_path / "src", 30)
    env, marks = hooked(tmp_path, DW_STOP_AT="after_link")
    with FakeSource(files) as source:
        sent = sent_of(source)
        with replicating(site, source.root, study, env) as proc:
            state = stopped_at(proc, marks, "after_link")
            subprocess.run(["mount", "-o", "remount,ro", str(mnt)], check=True)
            try:
                os.kill(state["pid"], signal.SIGCONT)
                _, err = proc.communicate(timeout=60)
            finally:
                subprocess.run(["mount", "-o", "remount,rw", str(mnt)], check=True)
        assert proc.returncode == 1 and "Traceback" not in err, err[-2000:]
        assert "unavailable" in err and "Read-only file system" in err, err[-2000:]
        assert not day_files(mnt) and not instances_of(study)
        [report] = site.replicate("--from", source.root, "--study", study)
        assert report["complete"] and report["stored"] == 30, report
        assert_exactly_once(site, study, sent)
    assert not waiting_room(site) and not incoming_left(site)
    clean(site)


# --- another version of an instance arrives while its series is fetched -------------------

@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_an_instance_that_conflicts_mid_series_is_rejected_once_counted_once_and_leaves_no_orphan(
        site, tmp_path):
    """While a series is fetched from a source without checksums (an Orthanc), a folder import
    (scan) brings another version of one of its instances (same SOP Instance UID, other bytes).
    The replicated one is a conflict: kept in the rejected folder once, counted once (by its
    UID) as failed, and the archive keeps no original that no row points at."""
    import pydicom
    from dicomfiles import ct, write
    from watcher.models import Rejection
    study, files = a_study(tmp_path / "src", 5)
    victim = pydicom.dcmread(files[0])
    other = ct(study_uid=victim.StudyInstanceUID, series_uid=victim.SeriesInstanceUID,
               sop_uid=victim.SOPInstanceUID, PatientName="Other^Version")
    staged = write(tmp_path / "staged" / "other.dcm", other)
    scanned = []
    with FakeSource(files) as source:
        normal = source.series_body

        def scan_first(uid, datas):  # (listed already: the replication fetches the whole series)
            if not scanned:
                os.rename(staged, site.config.watch.drop_dir / "other.dcm")
                scanned.append(subprocess.run(
                    [sys.executable, "-m", "watcher", "scan", "--config", str(site.config_path),
                     "--final", "--json"], cwd=ROOT, capture_output=True, text=True, timeout=60))
            yield from normal(uid, datas)

        source.series_body = scan_first
        [report] = site.replicate("--from", source.root, "--study", study, code=1)
    assert json.loads(scanned[0].stdout)["imported"] == 1, scanned[0].stderr[-2000:]
    uid = str(victim.SOPInstanceUID)
    assert [r.sop_instance_uid for r in instances_of(study)].count(uid) == 1
    assert (report["listed"], report["stored"], report["failed"]) == (5, 4, 1), report
    assert len(report["errors"]) == 1 and report["errors"][0].startswith(f"{uid}: rejected as conflict"), report["errors"]
    rejected = [p for p in site.config.archive.rejected_dir.rglob("*") if p.is_file()]
    assert len(rejected) == 1 and Rejection.select().count() == 1, (rejected, Rejection.select().count())
    assert not waiting_room(site) and not incoming_left(site)
    found = json.loads(site.cli("verify", "--json"))
    assert found["orphans"] == [], found


# --- side by side: two replications and a folder import of the same instances --------------

def test_two_replications_and_a_scan_of_the_same_instances_at_once_store_each_once(site, tmp_path):
    """The same study replicated twice at once while a folder import (scan) takes the very same
    files from the drop folder: each instance once, each row's bytes right, both replications
    complete (stored or present), the drop folder emptied, nothing in .tmp or .incoming, no
    orphan."""
    study, files = a_study(tmp_path / "src", 80, series=2)
    for f in files:
        shutil.copy(f, site.config.watch.drop_dir / f.name)
    old = time.time() - 60  # (settled already)
    for f in site.config.watch.drop_dir.iterdir():
        os.utime(f, (old, old))
    with FakeSource(files) as source:
        sent = sent_of(source)
        runs = [subprocess.Popen(command(site, source.root, study) + ["--json"], cwd=ROOT,
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                for _ in range(2)]
        runs.append(subprocess.Popen([sys.executable, "-m", "watcher", "scan", "--config",
                                      str(site.config_path), "--final", "--json"], cwd=ROOT,
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
        try:
            outs = [p.communicate(timeout=60) for p in runs]
        finally:
            for p in runs:
                if p.poll() is None:
                    p.kill()
                p.wait()
    for p, (out, err) in zip(runs, outs):
        assert p.returncode == 0 and "Traceback" not in err, (p.args[3:5], p.returncode, err[-2000:])
    reports = [json.loads(out)[0] for out, _ in outs[:2]]
    scanned = json.loads(outs[2][0])
    for r in reports:
        assert r["complete"] and r["stored"] + r["present"] == 80 and r["listed"] == 80, r
    assert scanned["imported"] + scanned["duplicate"] == 80, scanned
    assert sum(r["stored"] for r in reports) + scanned["imported"] == 80
    assert_exactly_once(site, study, sent)
    assert not list(site.config.watch.drop_dir.iterdir())
    assert not waiting_room(site) and not incoming_left(site)
    clean(site)


# --- an administrator at work while a batch waits in .tmp ----------------------------------

def blocked_on_a_lock(pid: int) -> bool:
    """``pid`` waits for a kernel lock (flock) another process holds (/proc/locks: "->")."""
    return any(line.split()[1] == "->" and line.split()[5] == str(pid)
               for line in Path("/proc/locks").read_text().splitlines() if "->" in line)


@PG_ONLY
def test_verify_repair_while_a_batch_waits_unsynced_waits_for_it_and_removes_nothing_of_it(
        site, tmp_path):
    """The ingest process is frozen with a batch's original linked into .tmp, not yet synced nor
    named. ``verify --repair`` sees it as a temporary file, but waits for the batch (its lock)
    before removing anything: the batch is then named and committed, the repair removes none
    of it, and the replication completes."""
    study, files = a_study(tmp_path / "src", 30)
    env, marks = hooked(tmp_path, DW_STOP_AT="after_link")
    with FakeSource(files) as source:
        sent = sent_of(source)
        proc = subprocess.Popen(command(site, source.root, study) + ["--json"], cwd=ROOT, env=env,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        repair = None
        try:
            state = stopped_at(proc, marks, "after_link")
            linked = Path(state["linked"])
            assert linked.exists() and linked.stat().st_nlink == 2  # (and its .incoming name)
            repair = subprocess.Popen([sys.executable, "-m", "watcher", "verify", "--repair", "--json",
                                       "--config", str(site.config_path)], cwd=ROOT,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            assert wait_for(lambda: blocked_on_a_lock(repair.pid) or repair.poll() is not None,
                            timeout=30), "the repair never waited for the batch's lock"
            assert repair.poll() is None and linked.exists()
            os.kill(state["pid"], signal.SIGCONT)
            out, err = proc.communicate(timeout=60)
            repaired, repair_err = repair.communicate(timeout=60)
        finally:
            for p in (proc, repair):
                if p is not None and p.poll() is None:
                    p.kill()
                    p.wait()
    assert proc.returncode == 0, err[-2000:]
    [report] = json.loads(out)
    assert report["complete"] and report["stored"] == 30, report
    assert repair.returncode == 0, repair_err[-2000:]
    assert json.loads(repaired)["removed"] == []  # (by then the batch was named and committed)
    assert not linked.exists()
    assert_exactly_once(site, study, sent)
    assert not waiting_room(site) and not incoming_left(site)
    clean(site)


@PG_ONLY
def test_the_day_folder_removed_while_a_synced_batch_waits_to_be_named(site, tmp_path):
    """An administrator removes today's folder of the archive (rm -rf) while a batch, synced,
    waits in .tmp for its final names: the batch is named in the folder made again and
    committed, whole; what the administrator removed is reported by verify as missing (nothing
    hidden), and nothing else is wrong."""
    study, files = a_study(tmp_path / "src", 40, series=2)
    env, marks = hooked(tmp_path, DW_STOP_AT="after_syncfs", DW_STOP_SKIP="1")  # (a 2nd batch)
    archive_dir = site.config.archive.dir
    with FakeSource(files) as source:
        sent = sent_of(source)
        with replicating(site, source.root, study, env, "--json") as proc:
            state = stopped_at(proc, marks, "after_syncfs")
            day = Path(state["batch"][0][1]).parent
            gone = sorted(str(p.relative_to(archive_dir)) for p in day.glob("*.dcm"))
            assert gone, "no batch was committed before the one that waits"
            shutil.rmtree(day)
            os.kill(state["pid"], signal.SIGCONT)
            out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err[-2000:]
    [report] = json.loads(out)
    assert report["complete"] and report["stored"] == 40, report
    rows = {r.stored_path: r for r in instances_of(study)}
    assert len(rows) == 40
    for _, final in state["batch"]:  # the batch that waited: named, committed, its bytes right
        rel = str(Path(final).relative_to(archive_dir))
        assert Path(final).read_bytes() == sent[rows[rel].sop_instance_uid]
    for rel, row in rows.items():
        if rel not in gone:
            assert (archive_dir / rel).read_bytes() == sent[row.sop_instance_uid]
    found = json.loads(site.cli("verify", "--json", code=1))  # (exit 1: files are missing)
    assert (sorted(found["missing"]), found["mismatched"], found["orphans"], found["temporary"]) == (
        gone, [], [], []), found
    assert not waiting_room(site) and not incoming_left(site)


@PG_ONLY
def test_the_waiting_room_removed_under_a_batch_loses_nothing_and_reports_truthfully(site, tmp_path):
    """An administrator clears archive/.tmp ("temporary files") while a batch's first original
    waits there, unsynced: that original is never given a final name; every row still has its
    bytes; the run's report stays true (no instance counted twice, none named after a file of
    ours), and a run again completes the study exactly once."""
    study, files = a_study(tmp_path / "src", 40)
    env, marks = hooked(tmp_path, DW_STOP_AT="after_link")
    with FakeSource(files) as source:
        sent = sent_of(source)
        with replicating(site, source.root, study, env, "--json") as proc:
            state = stopped_at(proc, marks, "after_link")
            linked = Path(state["linked"])
            assert linked.exists() and linked.parent.name == ".tmp"
            shutil.rmtree(linked.parent)
            os.kill(state["pid"], signal.SIGCONT)
            out, err = proc.communicate(timeout=60)
        assert "Traceback" not in err, err[-2000:]
        rows_are_right(site, sent)
        assert not waiting_room(site) and not incoming_left(site)
        [report] = json.loads(out)
        [again] = site.replicate("--from", source.root, "--study", study)
        assert again["complete"] and again["stored"] + again["present"] == 40, again
        assert_exactly_once(site, study, sent)
        clean(site)
    assert report["listed"] == 40 and report["stored"] + report["failed"] <= 40, (
        proc.returncode, report["listed"], report["stored"], report["failed"], report["errors"])
    assert all(e.split(":")[0] in sent for e in report["errors"]), report["errors"]


@PG_ONLY
def test_a_run_started_while_a_dead_runs_ingest_holds_a_batch_in_tmp_spares_it_and_both_finish_once(
        site, tmp_path):
    """kill -9 of the command while its ingest process has a batch's original waiting unsynced
    in .tmp (the ingest process lives on, frozen here); another run of the same study starts
    and cleans up after dead runs: it must leave the live batch's temporary alone. The orphaned
    ingest process then finishes its batch and ends; the new run completes: each instance
    once, nothing left in .tmp or .incoming, no orphan."""
    study, files = a_study(tmp_path / "src", 40, series=2)
    env, marks = hooked(tmp_path, DW_STOP_AT="after_link")
    with FakeSource(files) as source:
        sent = sent_of(source)
        first = subprocess.Popen(command(site, source.root, study), cwd=ROOT, env=env,
                                 stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        second = orphan = None
        try:
            state = stopped_at(first, marks, "after_link")
            orphan, linked = state["pid"], Path(state["linked"])
            first.kill()
            first.wait()
            second = subprocess.Popen(command(site, source.root, study) + ["--json"], cwd=ROOT,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            assert wait_for(lambda: ingest_children(second.pid) or second.poll() is not None,
                            timeout=30, step=0.005)
            assert linked.exists(), "the new run removed a live batch's temporary"
            os.kill(orphan, signal.SIGCONT)
            out, err = second.communicate(timeout=60)
            assert wait_for(lambda: not alive(orphan), timeout=30), "the orphaned ingest process lives on"
        finally:
            if orphan is not None and alive(orphan):
                os.kill(orphan, signal.SIGKILL)
            for p in (first, second):
                if p is not None and p.poll() is None:
                    p.kill()
                    p.wait()
    assert second.returncode == 0 and "Traceback" not in err, err[-2000:]
    [report] = json.loads(out)
    assert report["complete"] and report["stored"] + report["present"] == 40, report
    assert_exactly_once(site, study, sent)
    assert not waiting_room(site) and not incoming_left(site)
    clean(site)
