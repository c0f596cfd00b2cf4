"""Replication from a real Orthanc (with its DICOMweb plugin), through the real command:
originals arrive byte for byte, each exactly once, whoever is killed on the way."""

import base64
import datetime
import getpass
import hashlib
import http.server
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest
import xxhash
from click.testing import CliRunner

from conftest import wait_for, write_config_file
from dicomfiles import ct, write
from watcher import models, replication_config, timings
from watcher.cli import cli
from watcher.cli_replicate import replicate
from watcher.config import load
from watcher.errors import ConfigError
from watcher.models import Event, Instance, Series, Study, StudyDatabase

ORTHANC = shutil.which("Orthanc") or shutil.which("Orthanc", path="/usr/sbin:/usr/local/sbin")
PLUGIN = Path("/usr/share/orthanc/plugins/libOrthancDicomWeb.so")
REQUIRE = os.environ.get("WATCHER_REQUIRE_ORTHANC") == "1"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Orthanc:
    def __init__(self, url: str):
        self.url = url
        self.root = f"{url}/dicom-web/"

    def upload(self, paths) -> dict[str, bytes]:
        """POST /instances each file; {SOP Instance UID: the bytes uploaded}."""
        sent = {}
        with httpx.Client(timeout=30) as client:
            for path in paths:
                data = Path(path).read_bytes()
                answer = client.post(f"{self.url}/instances", content=data)
                assert answer.status_code == 200, answer.text
                sent[_sop_of(path)] = data
        return sent


def _sop_of(path) -> str:
    import pydicom
    return str(pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID)


@pytest.fixture(scope="module")
def orthanc(tmp_path_factory):
    """An Orthanc of our own, with DICOMweb, on free ports of 127.0.0.1."""
    if not ORTHANC or not PLUGIN.is_file():
        why = f"Orthanc ({ORTHANC or 'not found'}) or its DICOMweb plugin ({PLUGIN}) is missing"
        if REQUIRE:
            pytest.fail(f"WATCHER_REQUIRE_ORTHANC=1 but {why}")
        pytest.skip(why)
    work = tmp_path_factory.mktemp("orthanc")
    http = free_port()
    config = {"Name": "replication-source", "StorageDirectory": str(work / "storage"),
              "IndexDirectory": str(work / "index"), "HttpPort": http, "DicomPort": free_port(),
              "Plugins": [str(PLUGIN)], "RemoteAccessAllowed": False,
              "AuthenticationEnabled": False, "DicomWeb": {"Enable": True, "Root": "/dicom-web/"}}
    (work / "orthanc.json").write_text(json.dumps(config))
    with open(work / "orthanc.log", "wb") as log:
        proc = subprocess.Popen([ORTHANC, str(work / "orthanc.json")], stdout=log,
                                stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{http}"

    def up():
        try:
            return httpx.get(f"{url}/dicom-web/studies", timeout=2).status_code == 200
        except httpx.HTTPError:
            return proc.poll() is not None

    assert wait_for(up, timeout=30) and proc.poll() is None, (work / "orthanc.log").read_text()
    yield Orthanc(url)
    proc.terminate()
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


@pytest.fixture
def site(tmp_path, db_url):
    """A config file and its database; ``site.replicate(*args, code=0)`` -> the JSON report."""
    path = write_config_file(tmp_path, db_url)
    cfg = load(path)
    models.connect(cfg.database.url)

    def run(command, *args, code=0):
        result = CliRunner().invoke(command, [*args, "--config", str(path)])
        models.connect(cfg.database.url)
        assert result.exit_code == code, result.output + repr(result.exception)
        assert result.exception is None or isinstance(result.exception, SystemExit)  # no traceback
        return result.stdout if "--json" in args else result.output

    class Site:
        config, config_path = cfg, path

        @staticmethod
        def replicate(*args, code=0):
            return json.loads(run(replicate, *args, "--json", code=code))

        @staticmethod
        def output(*args, code=0):
            return run(replicate, *args, code=code)

        @staticmethod
        def cli(*args, code=0):
            return run(cli, *args, code=code)

    return Site


def resumes_exactly_once(site, orthanc, study: str, sent: dict, before: int) -> None:
    """Run again after an interruption that left ``before`` instances of ``study``: the rest is
    stored, nothing twice, every original byte for byte, the incoming folder empty (the dead
    run's too)."""
    [report] = site.replicate("--from", orthanc.root, "--study", study)
    assert (report["stored"], report["present"], report["failed"]) == (len(sent) - before, before, 0)
    rows = instances_of(study)
    assert sorted(r.sop_instance_uid for r in rows) == sorted(sent)
    for r in rows:
        assert (site.config.archive.dir / r.stored_path).read_bytes() == sent[r.sop_instance_uid]
    assert not list((site.config.archive.dir / ".incoming").iterdir())


def children_of(pid: int) -> list[int]:
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rpartition(")")[2].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            found.append(int(stat.parent.name))
    return found


def a_study(folder: Path, n: int, series: int = 1, **attributes) -> tuple[str, list[Path]]:
    """``n`` instances of a new study in ``series`` series, written below ``folder``."""
    study = ct().StudyInstanceUID
    uids = [ct().SeriesInstanceUID for _ in range(series)]
    files = [write(folder / f"{study[-10:]}-{i}.dcm", ct(study_uid=study, series_uid=uids[i % series],
                                                          **attributes)) for i in range(n)]
    return study, files


def instances_of(study: str) -> list[Instance]:
    return list(Instance.select().join(Series).join(Study).where(Study.study_instance_uid == study))


def test_replicated_originals_are_byte_identical_with_origin_and_history(site, orthanc, tmp_path):
    study, files = a_study(tmp_path / "src", 4, series=2)
    sent = orthanc.upload(files)
    [report] = site.replicate("--from", orthanc.root, "--study", study)
    assert (report["listed"], report["stored"], report["present"], report["failed"]) == (4, 4, 0, 0)
    rows = instances_of(study)
    assert {r.sop_instance_uid for r in rows} == set(sent)
    for r in rows:
        assert (site.config.archive.dir / r.stored_path).read_bytes() == sent[r.sop_instance_uid]
        assert r.sha256 == hashlib.sha256(sent[r.sop_instance_uid]).hexdigest()  # (hashed as fetched)
        assert r.stored_path.endswith(f"/{r.sha256}.dcm")
        assert r.xxh3 == xxhash.xxh3_128(sent[r.sop_instance_uid]).hexdigest()
        assert (r.origin, r.creator, r.remote_host) == ("replication", getpass.getuser(), orthanc.root)
        assert r.database_id == models.IMPORT_ID
    [event] = Event.select().where(Event.outcome == "replicated")
    assert (event.source, event.actor) == (study, getpass.getuser())
    assert event.detail.startswith(f"4 instances ({sum(map(len, sent.values()))} bytes) from "
                                   f"{orthanc.root} by {getpass.getuser()}: listed 4, stored 4, "
                                   "already present 0, failed 0")
    assert not list((site.config.archive.dir / ".incoming").iterdir())  # no leftovers


def test_replicating_again_fetches_nothing(site, orthanc, tmp_path):
    study, files = a_study(tmp_path / "src", 3)
    orthanc.upload(files)
    site.replicate("--from", orthanc.root, "--study", study)
    stored = {r.sop_instance_uid: (r.id, r.stored_path) for r in instances_of(study)}
    [again] = site.replicate("--from", orthanc.root, "--study", study)
    assert (again["listed"], again["stored"], again["present"], again["failed"]) == (3, 0, 3, 0)
    assert {r.sop_instance_uid: (r.id, r.stored_path) for r in instances_of(study)} == stored
    assert Event.select().where(Event.outcome == "replicated").count() == 1  # nothing happened
    assert not Event.select().where(Event.outcome == "duplicate").exists()  # nothing was fetched


def test_killed_replication_resumes_with_every_instance_exactly_once(site, orthanc, tmp_path):
    study, files = a_study(tmp_path / "src", 150, series=3)
    sent = orthanc.upload(files)
    command = [sys.executable, "-m", "watcher", "replicate", "--config", str(site.config_path), "--from", orthanc.root, "--study", study]
    proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            cwd=Path(__file__).parent.parent)
    try:
        assert wait_for(lambda: len(instances_of(study)) >= 10 or proc.poll() is not None, timeout=30)
        helpers = children_of(proc.pid)  # (its ingest process)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait()
    # the ingest process commits the batch in hand, sees its caller gone, and ends
    assert helpers and wait_for(lambda: not any(Path(f"/proc/{pid}").exists() for pid in helpers),
                                timeout=30), "a helper of the killed replication lives on"
    before = len(instances_of(study))
    assert proc.returncode == -signal.SIGKILL and before < 150, "finished before it was killed"
    resumes_exactly_once(site, orthanc, study, sent, before)


def test_a_killed_ingest_process_stops_the_run_clearly_and_a_run_again_completes_it(
        site, orthanc, tmp_path):
    """The OOM killer (here: kill -9) takes the replication's ingest process mid-run: the
    command says so and exits non-zero, nothing is half-stored, and running it again stores
    every instance exactly once."""
    study, files = a_study(tmp_path / "src", 150, series=3)
    sent = orthanc.upload(files)
    command = [sys.executable, "-m", "watcher", "replicate", "--config", str(site.config_path),
               "--from", orthanc.root, "--study", study]
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            cwd=Path(__file__).parent.parent)
    try:
        assert wait_for(lambda: len(instances_of(study)) >= 10 or proc.poll() is not None, timeout=30)
        [ingest] = [pid for pid in children_of(proc.pid)
                    if b"watcher.ingest_child" in Path(f"/proc/{pid}/cmdline").read_bytes()]
        os.kill(ingest, signal.SIGKILL)
        out, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
        proc.wait()
    assert proc.returncode == 1 and "the ingest process ended" in err and "Traceback" not in err, err
    before = len(instances_of(study))
    assert before < 150, "finished before its ingest process was killed"
    resumes_exactly_once(site, orthanc, study, sent, before)
    assert json.loads(site.cli("verify", "--json"))["missing"] == []


def test_the_ingest_process_runs_our_code_whatever_folder_it_is_started_in(
        site, orthanc, tmp_path, monkeypatch):
    """Run from a folder that holds another ``watcher`` package (a checkout of another
    version, say): the ingest process still runs the code of the command that started it."""
    decoy = tmp_path / "elsewhere" / "watcher"
    decoy.mkdir(parents=True)
    (decoy / "__init__.py").write_text('raise SystemExit("a decoy watcher package was imported")\n')
    study, files = a_study(tmp_path / "src", 2)
    orthanc.upload(files)
    monkeypatch.chdir(decoy.parent)
    [report] = site.replicate("--from", orthanc.root, "--study", study)
    assert (report["stored"], report["failed"]) == (2, 0), report


def test_an_ingest_killed_while_its_batch_waits_unsynced_resumes_exactly_once(site, orthanc, tmp_path):
    """A batch's originals wait under temporary names, not yet synced, until its commit
    (archive.make_durable). The ingest process is frozen there and killed (kill -9): no row
    points at them, and a run again removes the temporaries and stores every instance exactly
    once, byte for byte."""
    study, files = a_study(tmp_path / "src", 150, series=3)
    sent = orthanc.upload(files)
    waiting_room = site.config.archive.dir / ".tmp"
    command = [sys.executable, "-m", "watcher", "replicate", "--config", str(site.config_path),
               "--from", orthanc.root, "--study", study]
    proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            cwd=Path(__file__).parent.parent)

    def linked_twice(path):  # (in .tmp and in .incoming: not committed, not synced)
        try:
            return path.stat().st_nlink == 2
        except FileNotFoundError:  # (renamed into its day folder as the process stopped)
            return False

    unsynced = []
    try:
        # A batch waits for its sync for milliseconds: the ingest process is stopped each time
        # something is seen waiting, and let go again until it is caught with such a batch.
        while not unsynced and wait_for(lambda: proc.poll() is not None or (
                waiting_room.is_dir() and any(waiting_room.iterdir())), timeout=30, step=0.0005):
            ingest = [pid for pid in children_of(proc.pid)
                      if b"watcher.ingest_child" in Path(f"/proc/{pid}/cmdline").read_bytes()]
            if proc.poll() is not None or not ingest:
                break
            os.kill(ingest[0], signal.SIGSTOP)
            unsynced = [p for p in waiting_room.iterdir() if linked_twice(p)]
            os.kill(ingest[0], signal.SIGKILL if unsynced else signal.SIGCONT)
        _, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
        proc.wait()
    assert unsynced, "no batch was caught waiting for its sync"
    assert proc.returncode == 1 and "the ingest process ended" in err, err
    before = len(instances_of(study))
    assert before < 150
    for row in instances_of(study):
        assert (site.config.archive.dir / row.stored_path).read_bytes() == sent[row.sop_instance_uid]
    resumes_exactly_once(site, orthanc, study, sent, before)
    assert not list(waiting_room.iterdir())  # the dead process's temporaries are gone
    assert json.loads(site.cli("verify", "--json"))["missing"] == []


def test_unreachable_source_is_a_clear_error(site):
    url = f"http://127.0.0.1:{free_port()}/dicom-web/"
    output = site.output("--from", url, code=1)
    assert f"cannot reach {url}studies" in output
    assert not Instance.select().exists()


def test_a_study_the_source_lacks_is_incomplete(site, orthanc):
    [report] = site.replicate("--from", orthanc.root, "--study", "1.2.3.999", code=1)
    assert not report["complete"] and report["errors"] == ["the source holds no such study"]


def test_since_takes_only_newer_studies(site, orthanc, tmp_path):
    old, old_files = a_study(tmp_path / "old", 1, StudyDate="19990101")
    new, new_files = a_study(tmp_path / "new", 1, StudyDate="20990101")
    orthanc.upload(old_files + new_files)
    reports = site.replicate("--from", orthanc.root, "--since", "2099-01-01")
    replicated = {r["study_instance_uid"] for r in reports}  # (the source is the module's)
    assert new in replicated and old not in replicated
    assert instances_of(new) and not instances_of(old)


def test_to_moves_the_replicated_study_into_a_study_database(site, orthanc, tmp_path):
    site.cli("databases", "create", "trial-a")
    study, files = a_study(tmp_path / "src", 2)
    orthanc.upload(files)
    [report] = site.replicate("--from", orthanc.root, "--study", study, "--to", "trial-a")
    assert report["complete"] and report["stored"] == 2
    trial = StudyDatabase.get(StudyDatabase.name == "trial-a")
    rows = instances_of(study)
    assert len(rows) == 2 and {r.database_id for r in rows} == {trial.id}
    assert {r.distributed_by for r in rows} == {getpass.getuser()}
    [again] = site.replicate("--from", orthanc.root, "--study", study, "--to", "trial-a")
    assert (again["stored"], again["present"]) == (0, 2)
    assert [e.outcome for e in Event.select().where(Event.source == study).order_by(Event.id)] == [
        "replicated", "distributed"]


def test_to_an_unknown_database_fetches_nothing(site, orthanc):
    output = site.output("--from", orthanc.root, "--to", "no-such", code=1)
    assert "no-such" in output
    assert not Instance.select().exists()


class WatcherLike:
    """A dicom-watcher as replication sees one, in front of the Orthanc: its DICOMweb root
    ``/dicom-web/import/`` (passed on to Orthanc) and the API's list of a study's instances
    with their sha256 (``checksums``: what it says). Records the Authorization headers."""

    def __init__(self, orthanc: Orthanc, checksums: dict):
        outer = self
        self.authorizations = []

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                outer.authorizations.append(self.headers.get("Authorization"))
                if self.path.startswith("/api/databases/import/studies/"):
                    body = json.dumps([{"sop_instance_uid": k, "sha256": v}
                                       for k, v in checksums.items()]).encode()
                    return self._answer(200, "application/json", body)
                rest = self.path.removeprefix("/dicom-web/import/")
                answer = httpx.get(orthanc.root + rest, headers={"Accept": self.headers["Accept"]},
                                   timeout=30)
                self._answer(answer.status_code, answer.headers.get("content-type", ""), answer.content)

            def _answer(self, status, content_type, body):
                self.send_response(status)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.root = f"http://127.0.0.1:{self.server.server_address[1]}/dicom-web/import/"
        self.thread = threading.Thread(target=self.server.serve_forever)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()
        self.thread.join()


def test_a_source_url_with_a_user_and_password_logs_in_with_them_and_records_neither(
        site, orthanc, tmp_path):
    study, files = a_study(tmp_path / "src", 2)
    sent = orthanc.upload(files)
    sums = {sop: hashlib.sha256(data).hexdigest() for sop, data in sent.items()}
    with WatcherLike(orthanc, sums) as source:
        [report] = site.replicate("--from", source.root.replace("http://", "http://ann:p%40ss@"),
                                  "--study", study)
    assert (report["stored"], report["complete"]) == (2, True), report
    assert set(source.authorizations) == {"Basic " + base64.b64encode(b"ann:p@ss").decode()}
    [event] = Event.select().where(Event.outcome == "replicated")
    recorded = [event.detail, *(i.remote_host for i in instances_of(study))]
    assert all(source.root in text and "ann" not in text and "p%40ss" not in text
               for text in recorded), recorded


def test_bytes_that_differ_from_a_dicom_watcher_source_are_not_stored(site, orthanc, tmp_path):
    study, files = a_study(tmp_path / "src", 3)
    sent = orthanc.upload(files)
    sums = {sop: hashlib.sha256(data).hexdigest() for sop, data in sent.items()}
    spoilt = sorted(sums)[0]
    sums[spoilt] = "0" * 64
    with WatcherLike(orthanc, sums) as source:
        [report] = site.replicate("--from", source.root, "--study", study, "--token", "s3cret",
                                  code=1)
    assert (report["stored"], report["present"], report["failed"]) == (2, 0, 1)
    assert report["errors"] == [f"{spoilt}: the bytes received differ from the source's original "
                                "(sha256): not stored"]
    assert {r.sop_instance_uid for r in instances_of(study)} == set(sent) - {spoilt}
    assert set(source.authorizations) == {"Bearer s3cret"}
    [event] = Event.select().where(Event.outcome == "replicated")
    assert event.detail.endswith("listed 3, stored 2, already present 0, failed 1")
    assert not list((site.config.archive.dir / ".incoming").iterdir())


def scheduled(site, table: dict):
    """The site's config with one [[replication]] table, in its file too (for status)."""
    lines = ["", "[[replication]]"] + [f"{k} = {json.dumps(v)}" for k, v in table.items()]
    with open(site.config_path, "a") as f:
        f.write("\n".join(lines) + "\n")
    config = load(site.config_path)
    return config, config.replication[0]


def test_scheduled_replication_runs_when_due(site, orthanc, tmp_path):
    study, files = a_study(tmp_path / "src", 2)
    orthanc.upload(files)
    config, _ = scheduled(site, {"from": orthanc.root, "studies": [study], "interval_seconds": 600,
                                 "creator": "nightly"})
    start = datetime.datetime(2026, 12, 3, 12, 0)
    timed = sum(timings.IMPORTS.snapshot()["counts"])
    [reports] = replication_config.run_due(config, now=start).values()
    assert [(r.stored, r.complete) for r in reports] == [(2, True)]
    assert sum(timings.IMPORTS.snapshot()["counts"]) == timed + 2  # (the service's /metrics)
    assert {r.creator for r in instances_of(study)} == {"nightly"}
    assert replication_config.run_due(config, now=start + datetime.timedelta(seconds=100)) == {}  # not due yet
    [again] = replication_config.run_due(config, now=start + datetime.timedelta(seconds=700)).values()
    assert [(r.stored, r.present) for r in again] == [(0, 2)]
    [state] = json.loads(site.cli("status", "--json"))["replications"]
    assert (state["state"], state["failures"], state["last_error"]) == ("ok", 0, None)


def test_the_service_replicates_on_its_own_and_sigterm_mid_run_stops_it_cleanly(
        site, orthanc, tmp_path):
    """``run`` with a [[replication]] table pulls a study nobody asked for; SIGTERM to all its
    processes in the middle of it: the service exits 0 promptly, its ingest process with it,
    every row it committed points at its original, and a replication by hand completes the
    study exactly once."""
    study, files = a_study(tmp_path / "src", 300, series=2)
    sent = orthanc.upload(files)
    scheduled(site, {"from": orthanc.root, "studies": [study], "interval_seconds": 600})
    command = [sys.executable, "-m", "watcher", "run", "--config", str(site.config_path)]
    proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            cwd=Path(__file__).parent.parent, start_new_session=True)
    try:
        assert wait_for(lambda: len(instances_of(study)) >= 20 or proc.poll() is not None, timeout=60)
        importers = children_of(proc.pid)  # (with several processes: the service's importers)
        helpers = [pid for pid in [*importers, *(c for i in importers for c in children_of(i))]
                   if b"watcher.ingest_child" in Path(f"/proc/{pid}/cmdline").read_bytes()]
        os.killpg(proc.pid, signal.SIGTERM)  # (as systemd stops a service: every process of it)
        started = time.monotonic()
        _, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
        proc.wait()
    assert proc.returncode == 0 and time.monotonic() - started < 15, err[-3000:]
    assert helpers and not any(Path(f"/proc/{pid}").exists() for pid in helpers)
    assert re.search(r"replicate-ingest INFO watcher.pipeline: imported", err), err[-3000:]
    assert "Traceback" not in err, err[-3000:]
    before = len(instances_of(study))
    assert 20 <= before < 300, "finished before SIGTERM"
    resumes_exactly_once(site, orthanc, study, sent, before)


def test_a_failing_scheduled_replication_is_retried_with_backoff_and_shown(site):
    url = f"http://127.0.0.1:{free_port()}/dicom-web/"
    config, _ = scheduled(site, {"from": url, "interval_seconds": 3600})
    start = datetime.datetime(2026, 12, 3, 12, 0)
    later = lambda seconds: start + datetime.timedelta(seconds=seconds)  # noqa: E731
    [error] = replication_config.run_due(config, now=start).values()  # never raises
    assert error.startswith(f"SourceError: cannot reach {url}studies: ") and "Connection refused" in error, error
    assert replication_config.run_due(config, now=later(30)) == {}  # backoff: 1 minute
    assert list(replication_config.run_due(config, now=later(61))) == [url]  # then 2 minutes
    assert replication_config.run_due(config, now=later(61 + 90)) == {}
    [state] = json.loads(site.cli("status", "--json"))["replications"]
    assert (state["state"], state["failures"], state["last_ok"]) == ("failing", 2, None)
    assert state["last_error"].startswith("SourceError: cannot reach")
    assert state["next_attempt"].startswith("2026-12-03T12:03:01")
    for command in ("status", "pending"):
        assert f"replication from {url} into import: failing (2 runs in a row: SourceError" in site.cli(command)


def test_a_due_replication_that_another_node_took_is_not_run_twice(site):
    url = f"http://127.0.0.1:{free_port()}/dicom-web/"
    config, entry = scheduled(site, {"from": url})
    now = datetime.datetime(2026, 12, 3, 12, 0)
    assert replication_config._take(entry, "other-node", now)  # it runs it (for up to its interval)
    assert replication_config.run_due(config, now=now) == {}
    [state] = json.loads(site.cli("status", "--json"))["replications"]
    assert (state["state"], state["node"]) == ("running", "other-node")


@pytest.mark.parametrize("table, message", [
    ({}, "missing key replication[1].from"),
    ({"from": "pacs:8042"}, "replication[1].from must be the http:// or https:// URL"),
    ({"from": "http://h/dicom-web/", "interval_seconds": 1}, "interval_seconds must be a number, at least 60"),
    ({"from": "http://h/dicom-web/", "to": "Trial A"}, "replication[1].to: 'Trial A' cannot name"),
    ({"from": "http://h/dicom-web/", "since": "yesterday"}, "replication[1].since must be a date"),
    ({"from": "http://h/dicom-web/", "since": "2026-01-01", "since_days": 3}, "at most one of"),
    ({"from": "http://h/dicom-web/", "form": "x"}, "unknown key replication[1].form"),
])
def test_replication_config_errors_name_the_key(table, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        replication_config.parse([table])


def test_replication_config_defaults():
    [r] = replication_config.parse([{"from": "https://h/dicom-web/trial-a", "since_days": 7}])
    assert (r.source, r.to, r.interval_seconds, r.token) == ("https://h/dicom-web/trial-a/", "import", 3600.0, None)
    assert r.since_now(datetime.date(2026, 3, 8)) == "20260301"


def test_verify_repair_in_a_loop_during_a_replication_loses_nothing(site, orthanc, tmp_path):
    """An administrator runs ``verify --repair`` over and over while a replication stores
    series in batches: every original a row points at is still there, byte for byte."""
    from test_identity import REPAIRER
    study, files = a_study(tmp_path / "src", 120, series=3)
    sent = orthanc.upload(files)
    done, rounds = tmp_path / "done-repairing", tmp_path / "repair-rounds"
    repairer = subprocess.Popen([sys.executable, "-c", REPAIRER, str(site.config_path), str(done),
                                 str(rounds)], stdout=subprocess.PIPE, text=True)
    try:
        assert wait_for(lambda: rounds.exists(), timeout=60)  # repairing already
        [report] = site.replicate("--from", orthanc.root, "--study", study)
    finally:
        done.touch()
        repairs, _ = map(int, repairer.communicate(timeout=60)[0].split())
    assert repairs >= 2 and report["complete"] and report["stored"] == 120, (repairs, report)
    for r in instances_of(study):
        assert (site.config.archive.dir / r.stored_path).read_bytes() == sent[r.sop_instance_uid]
    assert json.loads(site.cli("verify", "--json"))["missing"] == []
