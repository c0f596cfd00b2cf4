"""Hostile tests of replication (watcher/replicate.py, ingest_process.py, multipart.py):
a source that lies or misbehaves, kills and signals at awkward moments, runs side by side."""

import hashlib
import http.server
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pydicom
import pytest

from conftest import wait_for
from dicomfiles import ct, write
from test_replicate import a_study, children_of, instances_of, site  # noqa: F401 (site: a fixture)
from watcher.models import Rejection

ROOT = Path(__file__).parent.parent
STUDY, SERIES, SOP = "0020000D", "0020000E", "00080018"


def _ui(v):
    return {"vr": "UI", "Value": [v]}


class FakeSource:
    """A DICOMweb source of our own (no Orthanc), serving the files given; ``series_body``
    (series UID, [bytes of each part]) -> an iterable of raw body chunks may be replaced to
    answer series fetches in hostile ways; ``instance_body`` likewise for one instance."""

    BOUNDARY = "hostile-boundary"

    def __init__(self, files):
        self.by_sop = {}
        for path in files:
            ds = pydicom.dcmread(path, stop_before_pixels=True)
            self.by_sop[str(ds.SOPInstanceUID)] = (str(ds.StudyInstanceUID),
                                                  str(ds.SeriesInstanceUID), Path(path).read_bytes())
        self.requests = []
        self.broken_listings = set()  # studies whose instances QIDO-RS answers HTTP 500
        self.series_body = self._normal
        self.instance_body = self._normal
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_GET(self):
                path, _, query = self.path.partition("?")
                outer.requests.append(path)
                parts = [p for p in path.split("/") if p][1:]  # after "dicom-web"
                try:
                    if parts == ["studies"]:
                        uid = query.split("StudyInstanceUID=")[1].split("&")[0] if "StudyInstanceUID=" in query else None
                        rows = [{STUDY: _ui(s)} for s in sorted({v[0] for v in outer.by_sop.values()})
                                if uid in (None, s)]
                        return self._json(rows if "offset=0" in query or "offset" not in query else [])
                    if len(parts) == 3 and parts[2] == "instances":
                        if parts[1] in outer.broken_listings:
                            self.send_response(500)
                            self.send_header("Content-Length", "0")
                            self.end_headers()
                            return
                        if "offset=0" not in query and "offset" in query:
                            return self._json([])
                        rows = [{STUDY: _ui(st), SERIES: _ui(se), SOP: _ui(sop)}
                                for sop, (st, se, _) in outer.by_sop.items() if st == parts[1]]
                        return self._json(rows)
                    if len(parts) == 4 and parts[2] == "series":
                        datas = [d for sop, (st, se, d) in outer.by_sop.items() if se == parts[3]]
                        return self._multipart(outer.series_body(parts[3], datas))
                    if len(parts) == 6 and parts[4] == "instances":
                        return self._multipart(outer.instance_body(parts[5], [outer.by_sop[parts[5]][2]]))
                except (BrokenPipeError, ConnectionResetError):
                    return
                self.send_response(404)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def _json(self, rows):
                body = json.dumps(rows).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/dicom+json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def _multipart(self, chunks):
                self.send_response(200)
                self.send_header("Content-Type", f'multipart/related; type="application/dicom"; '
                                                 f'boundary={outer.BOUNDARY}')
                self.send_header("Connection", "close")
                self.end_headers()
                for chunk in chunks:
                    self.wfile.write(chunk)
                    self.wfile.flush()
                self.close_connection = True

            def log_message(self, *args):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.root = f"http://127.0.0.1:{self.server.server_address[1]}/dicom-web/"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def _normal(self, uid, datas):
        yield from self.parts(datas)

    @classmethod
    def parts(cls, datas, end=True):
        for d in datas:
            yield f"--{cls.BOUNDARY}\r\nContent-Type: application/dicom\r\n\r\n".encode()
            yield d
            yield b"\r\n"
        if end:
            yield f"--{cls.BOUNDARY}--\r\n".encode()

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()


def incoming_left(site):
    base = site.config.archive.dir / ".incoming"
    return [p for p in base.rglob("*")] if base.exists() else []


def assert_exactly_once(site, study, sent_bytes):
    rows = instances_of(study)
    assert sorted(r.sop_instance_uid for r in rows) == sorted(sent_bytes), "missing or duplicated"
    for r in rows:
        data = (site.config.archive.dir / r.stored_path).read_bytes()
        assert data == sent_bytes[r.sop_instance_uid]
        assert r.stored_path.endswith(f"/{hashlib.sha256(data).hexdigest()}.dcm")
    found = json.loads(site.cli("verify", "--json"))
    assert (found["missing"], found["mismatched"]) == ([], []), found


def command(site, url, study):
    return [sys.executable, "-m", "watcher", "replicate", "--config", str(site.config_path),
            "--from", url, "--study", study]


def alive(pid):
    try:
        return Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0] != "Z"
    except OSError:
        return False


def group_members(pgid):
    """(pid, state, cmdline) of each live (not zombie) process in the process group."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rpartition(")")[2].split()
            if int(fields[3]) == pgid and fields[0] != "Z":
                found.append((int(stat.parent.name), fields[0],
                              (stat.parent / "cmdline").read_bytes().replace(b"\0", b" ")[:150]))
        except (OSError, ValueError):
            continue
    return found


def ingest_children(pid):
    out = []
    for c in children_of(pid):
        try:
            if b"watcher.ingest_child" in Path(f"/proc/{c}/cmdline").read_bytes():
                out.append(c)
        except OSError:
            pass
    return out


# --- a hostile source, in process (CliRunner) -------------------------------------------

def test_the_same_instance_twice_in_a_series_answer_is_stored_once(site, tmp_path):
    study, files = a_study(tmp_path / "src", 4)
    with FakeSource(files) as source:
        source.series_body = lambda uid, datas: FakeSource.parts(datas + datas[:2] + datas[:1])
        [report] = site.replicate("--from", source.root, "--study", study)
        sent = {sop: d for sop, (_, _, d) in source.by_sop.items()}
    assert (report["listed"], report["stored"], report["present"], report["failed"]) == (4, 4, 0, 0), report
    assert_exactly_once(site, study, sent)
    assert not incoming_left(site)


def test_a_series_answer_cut_mid_part_loses_and_duplicates_nothing(site, tmp_path):
    study, files = a_study(tmp_path / "src", 6)
    with FakeSource(files) as source:
        def cut(uid, datas):
            chunks = list(FakeSource.parts(datas, end=False))
            yield from chunks[:3 * 3]  # three whole parts
            yield chunks[9]  # the fourth's head
            yield chunks[10][:len(chunks[10]) // 2]  # half its bytes, then the connection closes
        source.series_body = cut
        [report] = site.replicate("--from", source.root, "--study", study)
        sent = {sop: d for sop, (_, _, d) in source.by_sop.items()}
    assert (report["stored"], report["failed"], report["complete"]) == (6, 0, True), report
    assert_exactly_once(site, study, sent)
    assert not incoming_left(site)


def test_a_truncated_instance_answer_is_failed_with_a_reason_and_nothing_stored(site, tmp_path):
    """The series answer ends properly but one part holds only half the object's bytes (a
    source that lies about its content): then that instance, asked for alone, is cut too."""
    study, files = a_study(tmp_path / "src", 3)
    with FakeSource(files) as source:
        victim = sorted(source.by_sop)[0]
        whole = source.by_sop[victim][2]
        half = whole[:len(whole) // 2]
        source.series_body = lambda uid, datas: FakeSource.parts([half if d == whole else d for d in datas])
        source.instance_body = lambda sop, datas: FakeSource.parts([half if d == whole else d for d in datas])
        [report] = site.replicate("--from", source.root, "--study", study, code=1)
        sent = {sop: d for sop, (_, _, d) in source.by_sop.items() if sop != victim}
    assert report["stored"] == 2 and report["failed"] >= 1 and not report["complete"], report
    assert any(victim in e or "rejected" in e for e in report["errors"]), report
    rows = instances_of(study)
    assert sorted(r.sop_instance_uid for r in rows) == sorted(sent)
    for r in rows:
        assert (site.config.archive.dir / r.stored_path).read_bytes() == sent[r.sop_instance_uid]
    assert not incoming_left(site)


def test_zero_byte_and_many_tiny_parts_are_each_accounted_for(site, tmp_path):
    study, files = a_study(tmp_path / "src", 3)
    with FakeSource(files) as source:
        source.series_body = lambda uid, datas: FakeSource.parts(datas + [b""] + [b"x"] * 200)
        [report] = site.replicate("--from", source.root, "--study", study)
        sent = {sop: d for sop, (_, _, d) in source.by_sop.items()}
    # the study as listed is complete; each junk part is counted apart and kept as rejected,
    # with a reason; none stored, none counted as an instance
    assert (report["listed"], report["stored"], report["failed"]) == (3, 3, 0), report
    assert report["unidentified"] == 201 and report["complete"], report
    assert Rejection.select().count() == 201
    assert_exactly_once(site, study, sent)
    assert not incoming_left(site)


# --- processes: kills, signals, runs side by side ----------------------------------------

def slow(source, per_part=0.01):
    def body(uid, datas):
        for chunk in FakeSource.parts(datas):
            yield chunk
            time.sleep(per_part / 3)
    source.series_body = body
    source.instance_body = body


def sent_of(source):
    return {sop: d for sop, (_, _, d) in source.by_sop.items()}


def stopped_promptly_then_resumed(site, source, study, helpers, took, err, total=150):
    """A run stopped by a signal ended within 10 s without a traceback, its ingest process with
    it; a run again stores the rest, every instance exactly once."""
    assert helpers and took < 10, (took, err[-2000:])
    assert "Traceback" not in err, err[-3000:]
    assert wait_for(lambda: not any(alive(p) for p in helpers), timeout=10), "ingest process lives on"
    before = len(instances_of(study))
    assert before < total, "finished before it was stopped"
    [report] = site.replicate("--from", source.root, "--study", study)
    assert (report["stored"], report["present"], report["failed"]) == (total - before, before, 0)
    assert_exactly_once(site, study, sent_of(source))


def test_kill_9_right_as_the_ingest_process_starts_then_again_exactly_once(site, tmp_path):
    study, files = a_study(tmp_path / "src", 60, series=2)
    with FakeSource(files) as source:
        slow(source)
        proc = subprocess.Popen(command(site, source.root, study), cwd=ROOT,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            assert wait_for(lambda: ingest_children(proc.pid) or proc.poll() is not None, timeout=20, step=0.002)
            helpers = ingest_children(proc.pid)
            proc.kill()
        finally:
            proc.wait()
        assert helpers, "no ingest process seen"
        assert wait_for(lambda: not any(alive(p) for p in helpers), timeout=20), "orphaned ingest process"
        [report] = site.replicate("--from", source.root, "--study", study)
        assert report["complete"] and report["stored"] + report["present"] == 60, report
        assert_exactly_once(site, study, sent_of(source))
    assert not incoming_left(site)


def test_kill_9_mid_batch_and_run_again_at_once_while_the_orphan_commits(site, tmp_path):
    """The next run starts while the killed run's ingest process is still committing its batch
    (and removes the dead run's folder under it): still each instance exactly once."""
    study, files = a_study(tmp_path / "src", 120, series=2)
    with FakeSource(files) as source:
        proc = subprocess.Popen(command(site, source.root, study), cwd=ROOT,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            assert wait_for(lambda: len(instances_of(study)) >= 5 or proc.poll() is not None, timeout=20, step=0.005)
            helpers = ingest_children(proc.pid)
            proc.kill()
        finally:
            proc.wait()
        assert proc.returncode == -9, "finished before it was killed"
        [report] = site.replicate("--from", source.root, "--study", study)
        assert wait_for(lambda: not any(alive(p) for p in helpers), timeout=20)
        assert report["failed"] == 0 and report["stored"] + report["present"] == 120, report
        assert_exactly_once(site, study, sent_of(source))
    assert not incoming_left(site)


def test_two_replications_of_one_study_at_once_store_each_instance_once(site, tmp_path):
    study, files = a_study(tmp_path / "src", 100, series=2)
    with FakeSource(files) as source:
        procs = [subprocess.Popen(command(site, source.root, study) + ["--json"], cwd=ROOT,
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                 for _ in range(2)]
        outs = [p.communicate(timeout=60) for p in procs]
        for p, (out, err) in zip(procs, outs):
            assert "Traceback" not in err, err[-3000:]
        reports = [json.loads(out)[0] if out.strip() else None for out, _ in outs]
        assert all(p.returncode == 0 for p in procs), (
            [p.returncode for p in procs], [r and (r["stored"], r["present"], r["failed"], r["errors"][:3]) for r in reports],
            [e[-1500:] for _, e in outs])
        assert sum(r["stored"] for r in reports) == 100, reports
        assert_exactly_once(site, study, sent_of(source))
    assert not incoming_left(site)


def test_ctrl_c_of_the_process_group_mid_run_ends_promptly_leaving_no_process(site, tmp_path):
    study, files = a_study(tmp_path / "src", 150, series=3)
    with FakeSource(files) as source:
        slow(source, 0.02)
        proc = subprocess.Popen(command(site, source.root, study), cwd=ROOT, start_new_session=True,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            assert wait_for(lambda: len(instances_of(study)) >= 10 or proc.poll() is not None, timeout=20)
            helpers = ingest_children(proc.pid)
            os.killpg(proc.pid, signal.SIGINT)
            started = time.monotonic()
            out, err = proc.communicate(timeout=30)
            took = time.monotonic() - started
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        assert proc.returncode != 0
        stopped_promptly_then_resumed(site, source, study, helpers, took, err)
    assert not incoming_left(site)


# Ctrl-C (SIGINT to the process group) while a fetch is blocked reading a stalled source (or
# one that trickles a byte every few seconds): the run ends at once. Found by this file: the
# fetch sat in httpx's socket read until its 30 s timeout, for ever with a trickle; now
# stopping shuts the sockets being read down (Source.abort).
def test_ctrl_c_while_the_source_stalls_mid_part_ends_promptly(site, tmp_path):
    """A source that sends a series' first part, then the head of the next and nothing more
    (a stalled or hostile server): Ctrl-C must still end the command promptly."""
    study, files = a_study(tmp_path / "src", 4)
    release = threading.Event()
    with FakeSource(files) as source:
        def stall(uid, datas):
            chunks = list(FakeSource.parts(datas))
            yield from chunks[:4]
            yield chunks[4][:100]
            release.wait(60)
        source.series_body = stall
        proc = subprocess.Popen(command(site, source.root, study), cwd=ROOT, start_new_session=True,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            assert wait_for(lambda: len(instances_of(study)) >= 1 or proc.poll() is not None, timeout=20)
            time.sleep(0.5)
            os.killpg(proc.pid, signal.SIGINT)
            started = time.monotonic()
            try:
                proc.communicate(timeout=12)
            except subprocess.TimeoutExpired:
                pass
            took = time.monotonic() - started
            helpers = ingest_children(proc.pid)
        finally:
            release.set()
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        assert took < 10, f"Ctrl-C took {took:.1f} s (ingest children then: {helpers})"


def _other_bytes(data: bytes) -> bytes:
    import io
    ds = pydicom.dcmread(io.BytesIO(data))
    ds.PatientName = "Other^Bytes"
    out = io.BytesIO()
    ds.save_as(out, write_like_original=True)
    return out.getvalue()


@pytest.mark.parametrize("same_batch", [True, False])
def test_two_different_objects_under_one_sop_in_a_series_answer(site, tmp_path, same_batch):
    """A source (no checksums) sends, in one series answer, instance A and later other bytes
    under A's SOP Instance UID: one row for A, and the second object is not silently dropped
    (stored, present or failed with a reason, never both versions stored)."""
    study, files = a_study(tmp_path / "src", 4)
    with FakeSource(files) as source:
        first = sorted(source.by_sop)[0]
        a = source.by_sop[first][2]
        other = _other_bytes(a)
        def body(uid, datas):
            yield from FakeSource.parts(datas, end=False)
            if not same_batch:
                time.sleep(1.0)  # (the first four are ingested meanwhile)
            yield from FakeSource.parts([other])
        source.series_body = body
        [report] = site.replicate("--from", source.root, "--study", study, code=None or 1)
        sent = sent_of(source)
    rows = instances_of(study)
    assert sorted(r.sop_instance_uid for r in rows) == sorted(sent), "two rows for one SOP"
    assert (site.config.archive.dir / [r for r in rows if r.sop_instance_uid == first][0].stored_path).read_bytes() == a
    assert (report["listed"], report["stored"], report["failed"]) == (4, 4, 0), report
    [error] = report["errors"]  # (so the study is incomplete: exit 1)
    assert error.startswith(f"{first}: sent again") and "conflict" in error, report
    assert [r.reason for r in Rejection.select()] == ["conflict"]  # the other bytes, kept


def test_large_parts_cut_into_odd_chunks_are_hashed_and_stored_byte_for_byte(site, tmp_path):
    """Parts of several MiB (past multipart.CHUNK), sent in odd-sized pieces across the
    boundaries: the sha256 the ingest trusts is that of the bytes written."""
    from dicomfiles import ct, write
    study = ct().StudyInstanceUID
    series = ct().SeriesInstanceUID
    files = [write(tmp_path / f"big-{i}.dcm", ct(study_uid=study, series_uid=series, rows=1024 + i,
                                                  columns=1100)) for i in range(3)]
    with FakeSource(files) as source:
        def odd(uid, datas):
            raw = b"".join(FakeSource.parts(datas))
            i, n = 0, 1
            while i < len(raw):
                n = (n * 7919) % 1048583 + 1
                yield raw[i:i + n]
                i += n
        source.series_body = odd
        [report] = site.replicate("--from", source.root, "--study", study)
        sent = sent_of(source)
    assert min(map(len, sent.values())) > 2 << 20
    assert report["stored"] == 3 and report["complete"], report
    assert_exactly_once(site, study, sent)
    for r in instances_of(study):
        import xxhash
        assert r.xxh3 == xxhash.xxh3_128(sent[r.sop_instance_uid]).hexdigest()


def test_the_ingest_process_killed_before_its_first_batch_is_a_clear_error(site, tmp_path):
    study, files = a_study(tmp_path / "src", 40)
    with FakeSource(files) as source:
        release = threading.Event()
        def late(uid, datas):
            release.wait(20)
            yield from FakeSource.parts(datas)
        source.series_body = late
        proc = subprocess.Popen(command(site, source.root, study), cwd=ROOT,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            assert wait_for(lambda: ingest_children(proc.pid) or proc.poll() is not None, timeout=20)
            [child] = ingest_children(proc.pid)
            time.sleep(1.0)
            os.kill(child, signal.SIGKILL)
            release.set()
            out, err = proc.communicate(timeout=30)
        finally:
            release.set()
            if proc.poll() is None:
                proc.kill()
            proc.wait()
        assert proc.returncode == 1 and "the ingest process ended" in err and "Traceback" not in err, err[-3000:]
        assert not instances_of(study)
        assert not incoming_left(site)
        [report] = site.replicate("--from", source.root, "--study", study)
        assert report["stored"] == 40
        assert_exactly_once(site, study, sent_of(source))


# kill -9 of the ingest process mid-batch can leave archive/.tmp/<host>-<child pid>-<hex> (the
# link _store_shared makes before its fsync and rename): running the replication again removes
# it (found by this file: only `run`, `sweep` and `verify --repair` did).
def test_ingest_process_killed_mid_batch_then_run_again_leaves_no_temporary_files(site, tmp_path):
    study, files = a_study(tmp_path / "src", 150, series=3)
    with FakeSource(files) as source:
        proc = subprocess.Popen(command(site, source.root, study), cwd=ROOT,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            assert wait_for(lambda: len(instances_of(study)) >= 5 or proc.poll() is not None, timeout=20, step=0.005)
            [child] = ingest_children(proc.pid)
            os.kill(child, signal.SIGKILL)
            out, err = proc.communicate(timeout=30)
        finally:
            if proc.poll() is None:
                proc.kill()
            proc.wait()
        assert proc.returncode == 1 and "the ingest process ended (killed by signal 9)" in err, err[-3000:]
        site.replicate("--from", source.root, "--study", study)
        assert_exactly_once(site, study, sent_of(source))
    found = json.loads(site.cli("verify", "--json"))
    assert found["temporary"] == [], found  # (orphans: left to verify --repair, by design)
    site.cli("verify", "--repair")
    found = json.loads(site.cli("verify", "--json"))
    assert (found["orphans"], found["temporary"], found["missing"]) == ([], [], []), found
    assert not incoming_left(site)


# The same as test_ctrl_c_while_the_source_stalls_mid_part_ends_promptly, in the service:
# SIGTERM (systemctl stop) while a scheduled replication's fetch waits on a stalled source:
# `run` exits promptly (found by this file: not before httpx's 30 s read timeout).
def test_the_service_stops_promptly_on_sigterm_while_a_replication_source_stalls(site, tmp_path):
    from test_replicate import scheduled
    study, files = a_study(tmp_path / "src", 4)
    release = threading.Event()
    with FakeSource(files) as source:
        def stall(uid, datas):
            chunks = list(FakeSource.parts(datas))
            yield from chunks[:4]
            yield chunks[4][:100]
            release.wait(60)
        source.series_body = stall
        scheduled(site, {"from": source.root, "studies": [study], "interval_seconds": 600})
        proc = subprocess.Popen([sys.executable, "-m", "watcher", "run", "--config", str(site.config_path)],
                                cwd=ROOT, start_new_session=True, stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE, text=True)
        took = None
        try:
            assert wait_for(lambda: len(instances_of(study)) >= 1 or proc.poll() is not None, timeout=20)
            time.sleep(0.5)
            os.killpg(proc.pid, signal.SIGTERM)
            started = time.monotonic()
            try:
                proc.communicate(timeout=14)
            except subprocess.TimeoutExpired:
                pass
            took = time.monotonic() - started
        finally:
            release.set()
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        assert took < 12, f"the service took {took:.1f} s to stop"


# SIGTERM of the command mid-run: no process is left, no traceback, a run again completes.
# Found by this file (~1 run in 3): the ingest process printed a ConnectionResetError
# traceback when its caller died with the child's last reply unread.
@pytest.mark.parametrize("group", [True, False])
def test_sigterm_of_the_replicate_command_mid_run_leaves_no_process_and_resumes(site, tmp_path, group):
    """``kill PID`` (or the whole group, as a terminal's hang-up or a job runner does): the
    command ends promptly, its ingest process with it, and a run again completes the study."""
    study, files = a_study(tmp_path / "src", 150, series=3)
    with FakeSource(files) as source:
        slow(source, 0.02)
        proc = subprocess.Popen(command(site, source.root, study), cwd=ROOT, start_new_session=True,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            assert wait_for(lambda: len(instances_of(study)) >= 10 or proc.poll() is not None, timeout=20)
            helpers = ingest_children(proc.pid)
            (os.killpg if group else os.kill)(proc.pid, signal.SIGTERM)
            started = time.monotonic()
            out, err = proc.communicate(timeout=30)
            took = time.monotonic() - started
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        stopped_promptly_then_resumed(site, source, study, helpers, took, err)
    assert not incoming_left(site)


def test_verify_repair_in_a_loop_while_replications_are_killed_and_resumed(site, tmp_path):
    from test_identity import REPAIRER
    study, files = a_study(tmp_path / "src", 120, series=2)
    done, rounds = tmp_path / "done-repairing", tmp_path / "repair-rounds"
    repairer = subprocess.Popen([sys.executable, "-c", REPAIRER, str(site.config_path), str(done),
                                 str(rounds)], stdout=subprocess.PIPE, text=True)
    try:
        assert wait_for(lambda: rounds.exists(), timeout=30)
        with FakeSource(files) as source:
            for _ in range(2):
                proc = subprocess.Popen(command(site, source.root, study), cwd=ROOT,
                                        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                n = len(instances_of(study))
                wait_for(lambda: len(instances_of(study)) >= n + 10 or proc.poll() is not None, timeout=20, step=0.005)
                proc.kill()
                proc.wait()
            [report] = site.replicate("--from", source.root, "--study", study)
            sent = sent_of(source)
    finally:
        done.touch()
        repairs, _ = map(int, repairer.communicate(timeout=60)[0].split())
    assert repairs >= 1 and report["failed"] == 0, (repairs, report)
    assert_exactly_once(site, study, sent)


# The deterministic form of the above: the caller dies after the child sent its outcomes and
# before it read them; the child's read of its pipe fails (ConnectionResetError, not
# EOFError), and it must end quietly, exit code 0.
def test_the_ingest_process_ends_quietly_when_its_caller_vanishes_with_a_reply_unread(site, capfd):
    from watcher.ingest_process import IngestProcess
    ingester = IngestProcess(site.config, "hostile")
    try:
        ingester._pipe.send([])  # (an empty batch: the child answers [] at once)
        assert ingester._pipe.poll(20)  # its reply waits, unread
        ingester._pipe.close()  # the caller is gone
        code = ingester._process.wait(20)
    finally:
        if ingester._process.poll() is None:
            ingester._process.kill()
            ingester._process.wait()
    err = capfd.readouterr().err
    assert "Traceback" not in err and code == 0, (code, err[-1500:])


def test_an_ingest_process_given_nothing_is_stopped_at_once_and_one_given_a_batch_finishes_it(site):
    """Started as a run begins, before anything is known to be missing: a run that finds
    everything present kills it (it has nothing to finish); one that gave it a batch lets it
    end by itself, its batch answered."""
    from watcher.ingest_process import IngestProcess
    idle = IngestProcess(site.config, "idle")
    idle.close()
    assert idle._process.returncode == -signal.SIGKILL
    used = IngestProcess(site.config, "used")
    try:
        assert used.ingest([]) == []
    finally:
        used.close()
    assert used._process.returncode == 0


def test_kill_9_mid_run_with_to_then_again_moves_every_instance_exactly_once(site, tmp_path):
    from watcher.models import StudyDatabase
    site.cli("databases", "create", "trial-a")
    study, files = a_study(tmp_path / "src", 120, series=2)
    with FakeSource(files) as source:
        proc = subprocess.Popen(command(site, source.root, study) + ["--to", "trial-a"], cwd=ROOT,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            assert wait_for(lambda: len(instances_of(study)) >= 10 or proc.poll() is not None, timeout=20, step=0.005)
            proc.kill()
        finally:
            proc.wait()
        assert proc.returncode == -9
        [report] = site.replicate("--from", source.root, "--study", study, "--to", "trial-a")
        assert report["complete"], report
        assert_exactly_once(site, study, sent_of(source))
    trial = StudyDatabase.get(StudyDatabase.name == "trial-a")
    assert {r.database_id for r in instances_of(study)} == {trial.id}


# Ctrl-C of the process group at many early instants, the ingest process starting among them:
# no process left, no traceback (found by this file: a KeyboardInterrupt traceback from the
# child's start-up; the child now has a session of its own).
def test_ctrl_c_at_many_early_instants_leaves_no_process_and_no_traceback(site, tmp_path):
    study, files = a_study(tmp_path / "src", 40)
    with FakeSource(files) as source:
        slow(source, 0.02)
        for delay in (0.3, 0.6, 0.9, 1.2, 1.5, 2.0):
            proc = subprocess.Popen(command(site, source.root, study), cwd=ROOT, start_new_session=True,
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            seen = set()
            deadline = time.monotonic() + delay
            while time.monotonic() < deadline:
                seen.update(ingest_children(proc.pid))
                time.sleep(0.01)
            os.killpg(proc.pid, signal.SIGINT)
            try:
                out, err = proc.communicate(timeout=10)
            finally:
                if proc.poll() is None:
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
            assert "Traceback" not in err, (delay, err[-2500:])
            assert wait_for(lambda: not any(alive(p) for p in seen), timeout=5), (delay, "a process lives on")
            wait_for(lambda: not group_members(proc.pid), timeout=10)
            assert not group_members(proc.pid), (delay, "a process of the group lives on",
                                                 group_members(proc.pid))
        [report] = site.replicate("--from", source.root, "--study", study)
        assert report["failed"] == 0
        assert_exactly_once(site, study, sent_of(source))
    assert not incoming_left(site)


def test_the_console_script_replicates_with_its_ingest_process(site, tmp_path):
    study, files = a_study(tmp_path / "src", 5)
    script = Path(sys.executable).parent / "dicom-watcher"
    with FakeSource(files) as source:
        done = subprocess.run([str(script), *command(site, source.root, study)[3:], "--json"],
                              cwd=tmp_path, capture_output=True, text=True, timeout=60)
        assert done.returncode == 0 and "Traceback" not in done.stderr, done.stderr[-2000:]
        assert json.loads(done.stdout)[0]["stored"] == 5
        assert_exactly_once(site, study, sent_of(source))


def test_sigkill_of_the_whole_group_mid_batch_then_again_adopts_what_was_stored(site, tmp_path):
    """The OOM killer or systemd's final SIGKILL takes the command and its ingest process at
    once, perhaps between an original's rename and its commit: a run again stores every
    instance once, and no original is left without its row (an orphan)."""
    study, files = a_study(tmp_path / "src", 150, series=3)
    with FakeSource(files) as source:
        for threshold in (5, 40):
            proc = subprocess.Popen(command(site, source.root, study), cwd=ROOT, start_new_session=True,
                                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            try:
                wait_for(lambda: len(instances_of(study)) >= threshold or proc.poll() is not None,
                         timeout=20, step=0.003)
                os.killpg(proc.pid, signal.SIGKILL)
            finally:
                proc.wait()
            assert wait_for(lambda: not group_members(proc.pid), timeout=10)
        [report] = site.replicate("--from", source.root, "--study", study)
        assert report["failed"] == 0 and report["complete"], report
        assert_exactly_once(site, study, sent_of(source))
    found = json.loads(site.cli("verify", "--json"))
    assert (found["missing"], found["mismatched"], found["orphans"]) == ([], [], []), found
    assert not incoming_left(site)


def test_a_part_of_another_type_mid_series_then_the_rest_one_by_one(site, tmp_path):
    study, files = a_study(tmp_path / "src", 6)
    with FakeSource(files) as source:
        def body(uid, datas):
            yield from FakeSource.parts(datas[:2], end=False)
            yield f"--{FakeSource.BOUNDARY}\r\nContent-Type: application/octet-stream\r\n\r\n".encode()
            yield b"\x00" * 5000 + b"\r\n"
            yield from FakeSource.parts(datas[2:])
        source.series_body = body
        [report] = site.replicate("--from", source.root, "--study", study)
        assert (report["stored"], report["failed"], report["complete"]) == (6, 0, True), report
        assert_exactly_once(site, study, sent_of(source))
    assert not incoming_left(site)


def _studies(tmp_path, count, n):
    made = [a_study(tmp_path / f"src{i}", n) for i in range(count)]
    return [uid for uid, _ in made], [f for _, files in made for f in files]


def _listings(source):
    return [r for r in source.requests if r.endswith("/instances") and "/series/" not in r]


def test_each_study_is_listed_once_and_a_listing_that_fails_ahead_fails_that_study_alone(site, tmp_path):
    uids, files = _studies(tmp_path, 3, 3)
    with FakeSource(files) as source:
        source.broken_listings = {uids[1]}  # (listed while the first study is fetched)
        reports = site.replicate("--from", source.root, *[a for u in uids for a in ("--study", u)], code=1)
    assert [(r["study_instance_uid"], r["stored"], r["complete"]) for r in reports] == [
        (uids[0], 3, True), (uids[1], 0, False), (uids[2], 3, True)]
    assert reports[1]["errors"] == [f"GET {source.root}studies/{uids[1]}/instances: HTTP 500"]
    assert sorted(_listings(source)) == sorted(f"/dicom-web/studies/{u}/instances" for u in uids)
    assert not incoming_left(site)


def test_an_instance_added_at_the_source_after_its_study_was_listed_ahead_comes_with_its_series(
        site, tmp_path):
    uids, files = _studies(tmp_path, 2, 3)
    with FakeSource(files) as source:
        [series] = {se for st, se, _ in source.by_sop.values() if st == uids[1]}
        late = ct(study_uid=uids[1], series_uid=series)
        late_bytes = write(tmp_path / "late.dcm", late).read_bytes()

        def first_study(uid, datas):  # served once the second study has been listed: then it grows
            assert wait_for(lambda: f"/dicom-web/studies/{uids[1]}/instances" in _listings(source), timeout=10)
            source.by_sop[str(late.SOPInstanceUID)] = (uids[1], series, late_bytes)
            source.series_body = source._normal
            yield from source.parts(datas)
        source.series_body = first_study
        reports = site.replicate("--from", source.root, "--study", uids[0], "--study", uids[1])
    assert [(r["listed"], r["stored"], r["complete"]) for r in reports] == [(3, 3, True), (4, 4, True)]
    assert_exactly_once(site, uids[1], {sop: d for sop, (st, _, d) in source.by_sop.items() if st == uids[1]})
    assert len(_listings(source)) == 2
