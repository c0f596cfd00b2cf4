"""DICOMweb and replication attacked by a hostile user and a careless one, over real HTTP
(httpx, raw sockets) against the real service (tests/test_web.py's Site), and replication
from a fake DICOMweb source that lies. One service for the whole module (SQLite): each test
makes its own studies, so that they do not depend on each other's order."""

import hashlib
import http.server
import io
import json
import os
import socket
import threading
import time
import types
from pathlib import Path

import httpx
import pydicom
import pytest
from click.testing import CliRunner

from conftest import wait_for, write_config_file
from dicomfiles import ct, write
from test_dicomweb import RELATED, new_study, parts_of, stow_body
from test_web import Site
from watcher import models
from watcher.cli import cli
from watcher.config import load
from watcher.models import Instance, Series, Study, StudyDatabase

pytestmark = pytest.mark.slow


# -- the service ----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def site(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("site")
    s = Site(tmp, f"sqlite:///{tmp}/watcher.db")
    models.connect(s.config.database.url)
    for name in ("wendy", "dora", "nobody"):
        s.cli("users", "add", name, "--password-stdin", input="correct horse battery\n")
    s.cli("grant", "wendy", "trial-a", "write")
    s.cli("grant", "dora", "trial-a", "write")
    s.tokens = {name: s.token(name) for name in ("boss", "rita", "wendy", "dora", "nobody")}
    s.made = tmp / "made"
    yield s
    s.stop()
    models.database.close()
    assert s.service.returncode == 0, s.log.read_text()


@pytest.fixture
def db(site):
    """This test's own connection to the site's catalog (the module's may have been closed)."""
    models.connect(site.config.database.url)
    yield
    models.database.close()


def auth(site, who: str) -> dict:
    return {"Authorization": f"Bearer {site.tokens[who]}"}


def post(site, path: str, body, content_type: str, who: str, **kwargs) -> httpx.Response:
    return httpx.post(site.url + path, content=body, timeout=60,
                      headers={"Content-Type": content_type, **auth(site, who)}, **kwargs)


def stow(site, path: str, files: list[bytes], who: str) -> httpx.Response:
    body, content_type = stow_body(files)
    return post(site, path, body, content_type, who)


def incoming(site) -> list[Path]:
    folder = site.config.archive.dir / ".incoming" / "upload-test-node"
    return list(folder.iterdir()) if folder.is_dir() else []


def rows_of_patient(patient_id: str) -> list[Instance]:
    return list(Instance.select().join(Series).join(Study).join(models.Patient)
                .where(models.Patient.patient_id == patient_id))


def uids_of(data: bytes) -> tuple[str, str, str]:
    ds = pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True)
    return ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID


def b_instance(site) -> tuple[str, bytes, Instance]:
    """A trial-b original: (its key in site.originals, bytes, its row)."""
    key, data = sorted(site.originals[site.b_study].items())[0]
    row = Instance.get(Instance.sop_instance_uid == uids_of(data)[2])
    return key, data, row


# -- rights ------------------------------------------------------------------------------------

def test_stow_without_write_right_is_refused_and_stores_and_keeps_nothing(site, db):
    files = new_study(site.made, 2, patient_id="NO-RIGHTS")
    assert stow(site, "/dicom-web/trial-a/studies", files, "rita").status_code == 403  # read only
    assert stow(site, "/dicom-web/trial-a/studies", files, "nobody").status_code == 404
    assert stow(site, "/dicom-web/import/studies", files, "wendy").status_code == 404
    assert stow(site, "/dicom-web/trial-b/studies", files, "wendy").status_code == 404
    anonymous = httpx.post(site.url + "/dicom-web/trial-a/studies", content=stow_body(files)[0],
                           headers={"Content-Type": stow_body(files)[1]})
    assert anonymous.status_code == 401
    assert rows_of_patient("NO-RIGHTS") == []
    assert not (site.config.archive.rejected_dir / "upload").exists() or not any(
        (site.config.archive.rejected_dir / "upload" / who).exists() for who in ("rita", "nobody"))
    assert incoming(site) == []


def test_wado_of_another_databases_instance_by_guessed_uids_is_404(site, db):
    _, data, _ = b_instance(site)
    study, series, sop = uids_of(data)
    rita = site.tokens["rita"]
    for path in (f"/dicom-web/trial-a/studies/{study}",
                 f"/dicom-web/trial-a/studies/{study}/series/{series}",
                 f"/dicom-web/trial-a/studies/{study}/series/{series}/instances/{sop}",
                 f"/dicom-web/trial-a/studies/{site.a_study}/series/{series}/instances/{sop}",
                 f"/dicom-web/trial-a/studies/{study}/instances",
                 f"/dicom-web/trial-a/instances?SOPInstanceUID={sop}",
                 f"/dicom-web/trial-a/series?SeriesInstanceUID={series}",
                 f"/dicom-web/trial-a/studies/..%2F..%2Ftrial-b%2Fstudies%2F{study}",
                 f"/dicom-web/trial-a%2F..%2Ftrial-b/studies/{study}",
                 f"/dicom-web/trial-a/../trial-b/studies/{study}",
                 f"/dicom-web/..%2Ftrial-b/studies/{study}",
                 f"/dicom-web/%74rial-b/studies/{study}",
                 f"/dicom-web/trial-b%00/studies/{study}",
                 f"/dicom-web/trial-a/studies/{study}%00",
                 "/dicom-web/trial-a/studies/" + "1." * 4000 + "1"):
        answer = site.get(path, rita, headers={"Accept": "*/*"})
        assert answer.status_code in (200, 400, 404), (path, answer.status_code, answer.text[:200])
        if answer.status_code == 200:  # a search that found nothing of trial-b
            assert answer.json() == [], path
        assert data not in answer.content
    # raw socket: a path that no client library would normalise
    with socket.create_connection(("127.0.0.1", site.port), timeout=10) as s:
        s.sendall(f"GET /dicom-web/trial-a/studies/../../trial-b/studies/{study} HTTP/1.1\r\n"
                  f"Host: x\r\nAuthorization: Bearer {rita}\r\nConnection: close\r\n\r\n".encode())
        raw = b""
        while chunk := s.recv(65536):
            raw += chunk
    assert raw.split(b" ")[1] in (b"400", b"404"), raw[:200]
    assert data not in raw


@pytest.mark.parametrize("value_", ["' OR 1=1 --", "%", "_", '"', "PAT1' --", "\\", "PAT1\x00",
                                    "*' OR '1'='1", "a" * 10_000])
def test_qido_sqlish_values_are_harmless(site, value_):
    for key in ("PatientID", "PatientName", "StudyDescription", "StudyInstanceUID", "AccessionNumber"):
        answer = site.get("/dicom-web/trial-a/studies", site.tokens["rita"], params={key: value_})
        assert answer.status_code in (200, 400), (key, answer.status_code, answer.text[:200])
        if answer.status_code == 200:
            assert answer.json() == [], (key, value_)


def test_qido_percent_and_underscore_in_a_wildcard_value_are_literal(site):
    rita = site.tokens["rita"]
    assert site.get("/dicom-web/trial-a/studies", rita, params={"PatientID": "PAT*"}).json()  # PAT1 is there
    for pattern in ("P_T*", "%*", "%1", "P%?"):
        if "*" not in pattern and "?" not in pattern:
            continue
        found = site.get("/dicom-web/trial-a/studies", rita, params={"PatientID": pattern})
        assert found.status_code == 200 and found.json() == [], pattern


def test_qido_patient_birth_date_range_matches(site):
    rita = site.tokens["rita"]
    assert site.get("/dicom-web/trial-a/studies", rita, params={"PatientBirthDate": "19700101"}).json()
    found = site.get("/dicom-web/trial-a/studies", rita, params={"PatientBirthDate": "19600101-19800101"})
    assert found.status_code == 200 and len(found.json()) == 1, found.text


@pytest.mark.parametrize("path,params", [
    ("/dicom-web/trial-a/studies", {"offset": str(10 ** 20)}),
    ("/dicom-web/trial-a/series", {"SeriesNumber": str(10 ** 20)}),
    ("/dicom-web/trial-a/instances", {"InstanceNumber": str(-10 ** 20)}),
])
def test_qido_huge_numbers_are_refused_not_a_server_error(site, path, params):
    answer = site.get(path, site.tokens["rita"], params=params)
    assert answer.status_code in (200, 400), (answer.status_code, answer.text[:300])


def test_qido_bad_limits_and_unknown_keys_are_400(site):
    rita = site.tokens["rita"]
    for params in ({"limit": "0"}, {"limit": "1e3"}, {"limit": "10001"}, {"offset": "-1"},
                   {"SeriesNumber": "x"}, {"StudyDate": "yesterday"}, {"PatientID)": "x"},
                   {"00100020 ": "x"}, {"FFFFFFFF": "x"}):
        path = "/dicom-web/trial-a/series" if "SeriesNumber" in params else "/dicom-web/trial-a/studies"
        assert site.get(path, rita, params=params).status_code == 400, params


# -- odd headers -------------------------------------------------------------------------------

@pytest.mark.parametrize("accept,expected", [
    ("application/dicom", 406),  # single part: not what we serve
    ('multipart/related; type="application/octet-stream"', 406),
    ('multipart/related; type="image/jpeg"', 406),
    (";;;,,,", 406),
    ('multipart/related; type="application/dicom"; transfer-syntax="1.2.840.10008.1.2.1"', 200),
    ('multipart/related; type="application/dicom"; transfer-syntax=1.2.840.10008.1.2.4.50, '
     'multipart/related; type="application/dicom"; transfer-syntax=*', 200),
    ("text/html, */*;q=0.1", 200),
])
def test_wado_odd_accept_headers(site, accept, expected):
    answer = site.get(f"/dicom-web/trial-a/studies/{site.a_study}", site.tokens["rita"],
                      headers={"Accept": accept})
    assert answer.status_code == expected, answer.text[:300]
    if expected == 200:
        assert sorted(parts_of(answer)) == sorted(site.originals[site.a_study].values())


@pytest.mark.parametrize("where", ["accept", "content-type"])
def test_rfc2231_parameters_are_not_a_server_error(site, where):
    if where == "accept":
        answer = site.get(f"/dicom-web/trial-a/studies/{site.a_study}", site.tokens["rita"],
                          headers={"Accept": "multipart/related; type*=utf-8''application%2Fdicom"})
    else:
        body, _ = stow_body(new_study(site.made, 1, patient_id="RFC2231"), boundary="abc")
        answer = post(site, "/dicom-web/trial-a/studies", body,
                      "multipart/related; type=\"application/dicom\"; boundary*=utf-8''abc", "wendy")
    assert answer.status_code < 500, (answer.status_code, answer.text[:300])


# -- malformed STOW bodies -----------------------------------------------------------------------

def test_malformed_stow_bodies_are_refused_and_leave_nothing(site, db):
    [good] = new_study(site.made, 1, patient_id="MALFORMED")
    body, content_type = stow_body([good])
    cases = [
        (body[:-len(b"--test-boundary-0123--\r\n")], content_type),  # no closing boundary
        (body[:len(body) // 2], content_type),  # stops mid-part
        (body, 'multipart/related; type="application/dicom"'),  # no boundary
        (body, "multipart/related; boundary="),
        (body, "application/dicom"),  # not multipart at all
        (body, ""),
        (body, 'multipart/related; type="application/dicom+json"; boundary=test-boundary-0123'),
        (b"--test-boundary-0123\r\nContent-Type: application/dicom\r\nX-Huge: " + b"h" * 200_000
         + b"\r\n\r\n" + good + b"\r\n--test-boundary-0123--\r\n", content_type),  # a huge header
        (b"--test-boundary-0123\r\n" + b"".join(b"X-%d: y\r\n" % i for i in range(5000))
         + b"\r\n" + good + b"\r\n--test-boundary-0123--\r\n", content_type),  # many headers
        (b"", content_type),
        (b"garbage without any boundary" * 1000, content_type),
    ]
    for data, kind in cases:
        answer = post(site, "/dicom-web/trial-a/studies", data, kind, "wendy")
        assert 400 <= answer.status_code < 500, (kind, data[:80], answer.status_code, answer.text[:200])
    assert rows_of_patient("MALFORMED") == []
    assert incoming(site) == []


def test_a_boundary_like_line_inside_the_data_does_not_cut_the_part(site, db):
    """The boundary string inside a part's bytes (not after CRLF) is data, stored whole."""
    boundary = "abc"
    ds = ct(patient_id="BOUNDARY-IN-DATA", StudyDescription="x--abc--abc\r--abc")
    data = write(site.made / "boundary-in-data.dcm", ds).read_bytes()
    assert b"--abc" in data
    body, content_type = stow_body([data], boundary=boundary)
    answer = post(site, "/dicom-web/trial-a/studies", body, content_type, "wendy")
    assert answer.status_code == 200, answer.text
    [row] = rows_of_patient("BOUNDARY-IN-DATA")
    assert (site.config.archive.dir / row.stored_path).read_bytes() == data


def test_a_dicomdir_a_foreign_study_and_a_non_dicom_part_are_refused_and_kept(site, db):
    dicomdir = Path(pydicom.data.get_testdata_file("DICOMDIR")).read_bytes()
    [other] = new_study(site.made, 1, patient_id="FOREIGN-STUDY")
    answer = stow(site, f"/dicom-web/trial-a/studies/{site.a_study}", [dicomdir, other], "wendy")
    assert answer.status_code == 409, answer.text
    assert len(answer.json()["00081198"]["Value"]) == 2
    assert rows_of_patient("FOREIGN-STUDY") == []
    kept = [p.read_bytes() for p in (site.config.archive.rejected_dir / "upload" / "wendy").rglob("*")
            if p.is_file() and not p.name.endswith(".reason.txt")]
    assert dicomdir in kept and other in kept
    assert incoming(site) == []


def test_a_part_of_another_type_is_kept_as_rejected_like_any_refused_part(site, db):
    [data] = new_study(site.made, 1, patient_id="OCTET")
    body = (b"--b\r\nContent-Type: application/octet-stream\r\n\r\n" + data + b"\r\n--b--\r\n")
    answer = post(site, "/dicom-web/trial-a/studies", body, f"{RELATED}; boundary=b", "wendy")
    assert answer.status_code == 409, answer.text
    kept = [p.read_bytes() for p in (site.config.archive.rejected_dir / "upload").rglob("*")
            if p.is_file() and not p.name.endswith(".reason.txt")]
    assert data in kept, "the upload's docstring: a failed part is kept in rejected_dir/upload/<user>/"


def test_many_empty_parts_are_answered_and_leave_nothing(site, db):
    n = 300
    body = b"".join(b"--e\r\nContent-Type: application/dicom\r\n\r\n\r\n" for _ in range(n)) + b"--e--\r\n"
    started = time.monotonic()
    answer = post(site, "/dicom-web/trial-a/studies", body, f"{RELATED}; boundary=e", "wendy")
    assert answer.status_code == 409, answer.text[:300]
    assert len(answer.json()["00081198"]["Value"]) == n
    assert time.monotonic() - started < 30
    assert incoming(site) == []
    assert site.get("/healthz").status_code == 200


# -- cut short, stalled, disabled, raced -----------------------------------------------------------

def _raw_upload(site, who: str, body: bytes, boundary="test-boundary-0123", length=None) -> socket.socket:
    s = socket.create_connection(("127.0.0.1", site.port), timeout=30)
    s.sendall((f"POST /dicom-web/trial-a/studies HTTP/1.1\r\nHost: x\r\n"
               f"Authorization: Bearer {site.tokens[who]}\r\n"
               f"Content-Type: {RELATED}; boundary={boundary}\r\n"
               f"Content-Length: {length or len(body) * 4}\r\n\r\n").encode() + body)
    return s


def test_a_client_that_disconnects_mid_upload_leaves_no_part_files_and_nothing_stored(site, db):
    files = new_study(site.made, 3, patient_id="DISCONNECTED")
    body, _ = stow_body(files)
    cut = body[:len(body) * 2 // 3]
    s = _raw_upload(site, "wendy", cut, length=len(body))
    assert wait_for(lambda: incoming(site), timeout=10), "the upload's part files were never written"
    s.close()  # and never sends the rest
    assert wait_for(lambda: incoming(site) == [], timeout=15), incoming(site)
    assert rows_of_patient("DISCONNECTED") == []


def test_a_client_that_disconnects_is_not_logged_as_a_server_error(site, db):
    files = new_study(site.made, 2, patient_id="DISCONNECTED-LOG")
    body, _ = stow_body(files)
    before = site.log.stat().st_size
    s = _raw_upload(site, "wendy", body[:len(body) // 2], length=len(body))
    assert wait_for(lambda: incoming(site), timeout=10)
    s.close()
    assert wait_for(lambda: incoming(site) == [], timeout=15)
    time.sleep(0.3)
    with site.log.open("rb") as f:
        f.seek(before)
        written = f.read().decode(errors="replace")
    assert "Exception in ASGI application" not in written and "Traceback" not in written, written[-2000:]


def test_a_client_that_stops_reading_a_retrieval_leaves_no_original_open(site, db):
    """WADO-RS of a large original, the client gone after its first MiB: the service's reader
    stops and closes the file (no descriptor of the service points at it any more)."""
    [data] = new_study(site.made, 1, patient_id="WALKED-AWAY", rows=4096, columns=4096)  # 32 MiB
    assert stow(site, "/dicom-web/trial-a/studies", [data], "wendy").status_code == 200
    [row] = rows_of_patient("WALKED-AWAY")
    original = str(site.config.archive.dir / row.stored_path)
    study, series, sop = uids_of(data)

    def holding() -> bool:
        for fd in Path(f"/proc/{site.service.pid}/fd").iterdir():
            try:
                if os.readlink(fd) == original:
                    return True
            except OSError:
                continue
        return False

    before = site.log.stat().st_size
    for _ in range(3):
        s = socket.create_connection(("127.0.0.1", site.port), timeout=30)
        s.sendall((f"GET /dicom-web/trial-a/studies/{study}/series/{series}/instances/{sop} HTTP/1.1\r\n"
                   f"Host: x\r\nAuthorization: Bearer {site.tokens['rita']}\r\n\r\n").encode())
        got = b""
        while len(got) < 1 << 20:
            got += s.recv(1 << 16)
        assert got.startswith(b"HTTP/1.1 200")
        assert holding(), "the original is not being read: the test proves nothing"
        s.close()
        assert wait_for(lambda: not holding(), timeout=15), "the original is still open"
    assert site.get(f"/dicom-web/trial-a/studies/{study}/series/{series}/instances/{sop}",
                    site.tokens["rita"]).status_code == 200  # and the next one is served whole
    with site.log.open("rb") as f:
        f.seek(before)
        written = f.read().decode(errors="replace")
    assert "Traceback" not in written, written[-2000:]


def test_stalled_uploads_do_not_block_others_and_leave_nothing_when_dropped(site, db):
    files = new_study(site.made, 1, patient_id="STALLED")
    body, _ = stow_body(files)
    stalled = [_raw_upload(site, "wendy", body[:len(body) // 2], length=len(body)) for _ in range(30)]
    try:
        assert wait_for(lambda: len(incoming(site)) >= 30, timeout=15)
        [ok] = new_study(site.made, 1, patient_id="NOT-STALLED")
        assert stow(site, "/dicom-web/trial-a/studies", [ok], "wendy").status_code == 200
        assert site.get("/dicom-web/trial-a/studies", site.tokens["rita"]).status_code == 200
    finally:
        for s in stalled:
            s.close()
    assert wait_for(lambda: incoming(site) == [], timeout=15), incoming(site)
    assert rows_of_patient("STALLED") == []


def test_an_account_disabled_mid_upload_stores_nothing(site, db):
    files = new_study(site.made, 3, patient_id="DISABLED-MID-UPLOAD")
    body, content_type = stow_body(files)
    half, go = threading.Event(), threading.Event()

    def held():
        yield body[:len(body) // 2]
        half.set()
        go.wait(30)
        yield body[len(body) // 2:]

    answers = []
    sender = threading.Thread(target=lambda: answers.append(
        post(site, "/dicom-web/trial-a/studies", held(), content_type, "dora")))
    sender.start()
    assert half.wait(30)
    assert wait_for(lambda: incoming(site), timeout=10)
    site.cli("users", "disable", "dora")
    models.connect(site.config.database.url)
    go.set()
    sender.join(60)
    [answer] = answers
    assert answer.status_code in (401, 403, 404), answer.text
    assert rows_of_patient("DISABLED-MID-UPLOAD") == []


def test_the_same_instance_uploaded_at_once_many_times_is_stored_exactly_once(site, db):
    files = new_study(site.made, 2, patient_id="RACED")
    answers = []
    barrier = threading.Barrier(6)

    def send(who):
        barrier.wait()
        answers.append(stow(site, "/dicom-web/trial-a/studies", files, who))

    senders = [threading.Thread(target=send, args=(w,)) for w in ("wendy", "boss") * 3]
    for t in senders:
        t.start()
    for t in senders:
        t.join(60)
    assert [a.status_code for a in answers] == [200] * 6, [a.text for a in answers]
    rows = rows_of_patient("RACED")
    assert len(rows) == 2, [(r.sop_instance_uid, r.database_id) for r in rows]
    assert {r.database_id for r in rows} == {StudyDatabase.get(name="trial-a").id}
    study = uids_of(files[0])[0]
    assert sorted(parts_of(site.get(f"/dicom-web/trial-a/studies/{study}", site.tokens["rita"]))) == sorted(files)
    assert incoming(site) == []


def test_uploads_while_verify_repair_runs_lose_nothing(site, db):
    files = new_study(site.made, 30, patient_id="DURING-REPAIR")
    stop = threading.Event()
    repairs = []

    def repair():
        while not stop.is_set():
            result = CliRunner().invoke(cli, ["verify", "--repair", "--config", str(site.path)])
            repairs.append(result.exit_code)

    repairer = threading.Thread(target=repair)
    repairer.start()
    try:
        for i in range(0, len(files), 3):
            answer = stow(site, "/dicom-web/trial-a/studies", files[i:i + 3], "wendy")
            assert answer.status_code == 200, answer.text
    finally:
        stop.set()
        repairer.join(60)
    models.connect(site.config.database.url)
    assert repairs and set(repairs) <= {0}, repairs
    rows = rows_of_patient("DURING-REPAIR")
    assert len(rows) == 30
    assert sorted((site.config.archive.dir / r.stored_path).read_bytes() for r in rows) == sorted(files)
    result = CliRunner().invoke(cli, ["verify", "--config", str(site.path)])
    assert result.exit_code == 0, result.output


# -- another database's instances ----------------------------------------------------------------

def test_stow_of_an_instance_held_in_another_database_is_not_reported_stored_here(site, db):
    _, data, row = b_instance(site)
    answer = stow(site, "/dicom-web/trial-a/studies", [data], "wendy")
    if answer.status_code == 200:  # acknowledged: it must then be in trial-a
        study, series, sop = uids_of(data)
        got = site.get(f"/dicom-web/trial-a/studies/{study}/series/{series}/instances/{sop}",
                       site.tokens["wendy"])
        assert got.status_code == 200 and parts_of(got) == [data], got.text
    else:
        assert answer.status_code in (409, 202), answer.text


def test_a_conflict_does_not_reveal_an_instance_of_a_database_the_uploader_cannot_read(site, db):
    _, data, row = b_instance(site)
    study, series, sop = uids_of(data)
    crafted = write(site.made / "crafted.dcm", ct(sop_uid=sop, patient_id="CRAFTED")).read_bytes()
    answer = stow(site, "/dicom-web/trial-a/studies", [crafted], "wendy")
    assert answer.status_code == 409, answer.text
    assert row.sha256 not in answer.text and row.source not in answer.text, answer.text


# -- damaged originals ---------------------------------------------------------------------------

@pytest.mark.parametrize("damage", ["flipped", "missing", "truncated"])
def test_wado_of_a_damaged_original_never_hands_it_out_as_good(site, db, damage):
    [data] = new_study(site.made, 1, patient_id=f"DAMAGED-{damage}")
    assert stow(site, "/dicom-web/trial-a/studies", [data], "wendy").status_code == 200
    [row] = rows_of_patient(f"DAMAGED-{damage}")
    path = site.config.archive.dir / row.stored_path
    path.chmod(0o644)
    if damage == "flipped":
        spoilt = bytearray(data)
        spoilt[-10] ^= 0xFF
        path.write_bytes(bytes(spoilt))
    elif damage == "missing":
        path.unlink()
    else:
        path.write_bytes(data[:len(data) // 2])
    study, series, sop = uids_of(data)
    for url in (f"/dicom-web/trial-a/studies/{study}/series/{series}/instances/{sop}",
                f"/dicom-web/trial-a/studies/{study}"):
        try:
            answer = site.get(url, site.tokens["rita"])
        except httpx.RemoteProtocolError:
            continue  # the answer was cut: no client takes it for whole
        assert answer.status_code >= 500 or b"--\r\n" not in answer.content[-64:], (
            damage, answer.status_code, answer.content[-200:])
        with pytest.raises(Exception):
            parts_of(answer)  # not a whole multipart body either


def test_an_original_cut_short_while_wado_sends_it_never_arrives_whole(site, db):
    """The answer's length is said before its originals are read: one truncated on disk (an
    administrator's mistake, a failing disk) while it is being sent ends the answer short of
    that length, and the client is told; it never gets a body it could take for whole."""
    data = write(site.made / "cut-mid.dcm", ct(rows=3000, columns=3000, patient_id="CUT-MID")).read_bytes()
    assert stow(site, "/dicom-web/trial-a/studies", [data], "wendy").status_code == 200
    [row] = rows_of_patient("CUT-MID")
    path = site.config.archive.dir / row.stored_path
    study, _, _ = uids_of(data)
    got = 0
    with pytest.raises(httpx.RemoteProtocolError):
        with httpx.stream("GET", f"{site.url}/dicom-web/trial-a/studies/{study}", headers=auth(site, "rita"),
                          timeout=30) as answer:
            assert answer.status_code == 200
            declared = int(answer.headers["content-length"])
            for chunk in answer.iter_raw(65536):
                if not got:  # its first bytes are here: the rest of it is cut off on disk
                    path.chmod(0o644)
                    os.truncate(path, len(data) // 4)
                got += len(chunk)
    assert got < declared, (got, declared)


# -- replication from a lying source -----------------------------------------------------------------

class LyingSource:
    """A DICOMweb root (``/dicom-web/``) that lists a study's instances and serves each as
    ``behaviour[sop]`` says: ok, missing (404), other (another object's bytes), truncated
    (cut mid-part, then closed), no-end (the body ends without its closing boundary), endless
    (the object, then zeros for ever),
    two (two parts), html (not multipart), nonjson (QIDO answers HTML). A series is served as
    ``series`` says: none (404), ok (every instance a part), cut (its first instance whole,
    then the connection closes mid-part), lacking (all but its last instance), twice (its
    first instance twice), extra (one more instance than listed: ``extra``'s bytes)."""

    def __init__(self, study: str, objects: dict, behaviour: dict, other: bytes = b"",
                 qido: str = "ok", redirect: str = "", series: str = "none", extra: bytes = b""):
        outer = self
        self.requests = []
        self.authorizations = []

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_GET(self):
                outer.requests.append(self.path)
                outer.authorizations.append(self.headers.get("Authorization"))
                path = self.path.split("?")[0]
                if redirect and "/series/" in path:  # WADO: elsewhere
                    self.send_response(302)
                    self.send_header("Location", redirect + path)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                if path.endswith("/studies") or path.endswith("/instances"):
                    if qido == "nonjson":
                        return self._answer(200, "application/dicom+json", b"<html>not json</html>")
                    if qido == "object":
                        return self._answer(200, "application/dicom+json", b'{"0020000D": {}}')
                    if path.endswith("/studies"):
                        rows = [{"0020000D": {"vr": "UI", "Value": [study]}}]
                    else:
                        rows = [{"0020000D": {"vr": "UI", "Value": [study]},
                                 "0020000E": {"vr": "UI", "Value": [se]},
                                 "00080018": {"vr": "UI", "Value": [sop]}}
                                for sop, (se, _) in objects.items()]
                    return self._answer(200, "application/dicom+json", json.dumps(rows).encode())
                sop = path.rsplit("/", 1)[-1]
                if "/instances/" not in path and series != "none":
                    return self._series(sop)
                if sop not in objects:
                    return self._answer(404, "text/plain", b"no")
                data, how = objects[sop][1], behaviour.get(sop, "ok")
                if how == "missing":
                    return self._answer(404, "text/plain", b"gone")
                if how == "other":
                    data = other
                head = b"--B\r\nContent-Type: application/dicom\r\n\r\n"
                body = head + data + b"\r\n--B--\r\n"
                kind = f'{RELATED}; boundary=B'
                if how == "no-end":
                    body = head + data
                elif how == "two":
                    body = head + data + b"\r\n" + head + data + b"\r\n--B--\r\n"
                elif how == "html":
                    body, kind = b"<html>hello</html>", "text/html"
                if how == "endless":  # the object, then zeros for ever (until the client hangs up)
                    self.send_response(200)
                    self.send_header("Content-Type", kind)
                    self.send_header("Connection", "close")
                    self.end_headers()
                    self.close_connection = True
                    try:
                        self.wfile.write(head + data)
                        while True:
                            self.wfile.write(bytes(1 << 20))
                    except OSError:
                        return
                if how == "truncated":
                    self.send_response(200)
                    self.send_header("Content-Type", kind)
                    self.send_header("Content-Length", str(len(body)))
                    self.end_headers()
                    self.wfile.write(body[:len(body) // 2])
                    self.wfile.flush()
                    self.close_connection = True
                    return
                self._answer(200, kind, body)

            def _series(self, uid):
                datas = [data for sop, (se, data) in sorted(objects.items()) if se == uid]
                if not datas:
                    return self._answer(404, "text/plain", b"no")
                if series == "lacking":
                    datas = datas[:-1]
                elif series == "twice":
                    datas = [datas[0], *datas]
                elif series == "extra":
                    datas = [*datas, extra]
                head = b"--B\r\nContent-Type: application/dicom\r\n\r\n"
                body = b"".join(head + data + b"\r\n" for data in datas) + b"--B--\r\n"
                if series != "cut":
                    return self._answer(200, f"{RELATED}; boundary=B", body)
                self.send_response(200)
                self.send_header("Content-Type", f"{RELATED}; boundary=B")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(head + datas[0] + b"\r\n" + head + datas[1][:len(datas[1]) // 2])
                self.wfile.flush()
                self.close_connection = True

            def _answer(self, status, content_type, body):
                self.send_response(status)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.root = f"http://127.0.0.1:{self.server.server_address[1]}/dicom-web/"
        self.thread = threading.Thread(target=self.server.serve_forever, name="lying-source")

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()
        self.thread.join()


@pytest.fixture
def here(tmp_path):
    """A second site (its own SQLite catalog and archive) that replicates."""
    path = write_config_file(tmp_path, f"sqlite:///{tmp_path / 'here.db'}")
    cfg = load(path)
    models.connect(cfg.database.url)

    def replicate(root, *args):
        result = CliRunner().invoke(cli, ["replicate", "--from", root, "--json", *args,
                                          "--config", str(path)])
        models.connect(cfg.database.url)
        return result

    yield types.SimpleNamespace(archive=cfg.archive, replicate=replicate)
    models.database.close()


def _leftovers(cfg) -> list[Path]:
    folder = cfg.archive.dir / ".incoming"
    return [p for p in folder.rglob("*")] if folder.is_dir() else []


def _study(tmp_path, n: int, **attrs) -> tuple[str, dict]:
    study, series = ct().StudyInstanceUID, ct().SeriesInstanceUID
    objects = {}
    for i in range(n):
        ds = ct(study_uid=study, series_uid=series, **attrs)
        objects[ds.SOPInstanceUID] = (series, write(tmp_path / "src" / f"{i}.dcm", ds).read_bytes())
    return study, objects


@pytest.mark.parametrize("how", ["missing", "other", "truncated", "no-end", "two", "html"])
def test_replication_from_a_source_that_lies_fails_clearly_and_stores_nothing_wrong(here, tmp_path, how):
    study, objects = _study(tmp_path, 3, patient_id="REPLICATED")
    liar = sorted(objects)[1]
    other = write(tmp_path / "other.dcm", ct(patient_id="INTRUDER")).read_bytes()
    with LyingSource(study, objects, {liar: how}, other=other) as source:
        result = here.replicate(source.root, "--study", study)
    assert result.exit_code == 1, result.output + repr(result.exception)
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    [report] = json.loads(result.stdout)
    assert (report["listed"], report["stored"], report["failed"], report["complete"]) == (3, 2, 1, False)
    assert len(report["errors"]) == 1 and report["errors"][0].startswith(liar), report["errors"]
    rows = list(Instance.select())
    assert {r.sop_instance_uid for r in rows} == set(objects) - {liar}
    for r in rows:  # every stored object is what it is recorded as
        assert (here.archive.dir / r.stored_path).read_bytes() == objects[r.sop_instance_uid][1]
        assert hashlib.sha256(objects[r.sop_instance_uid][1]).hexdigest() == r.sha256
    assert _leftovers(here) == []


@pytest.mark.parametrize("how, one_by_one", [("ok", 0), ("cut", 3), ("lacking", 1), ("twice", 0)])
def test_a_series_comes_in_one_request_and_what_its_answer_lacks_one_by_one(here, tmp_path, how,
                                                                            one_by_one):
    study, objects = _study(tmp_path, 4)
    with LyingSource(study, objects, {}, series=how) as source:
        result = here.replicate(source.root, "--study", study)
    assert result.exit_code == 0, result.output
    [report] = json.loads(result.stdout)
    assert (report["listed"], report["stored"], report["present"], report["failed"]) == (4, 4, 0, 0)
    rows = list(Instance.select())
    assert sorted(r.sop_instance_uid for r in rows) == sorted(objects)
    for r in rows:
        assert (here.archive.dir / r.stored_path).read_bytes() == objects[r.sop_instance_uid][1]
    wado = [r for r in source.requests if "/series/" in r]
    [series] = {se for se, _ in objects.values()}
    assert wado.count(f"/dicom-web/studies/{study}/series/{series}") == 1
    assert len(wado) == 1 + one_by_one, wado
    assert _leftovers(here) == []


def test_an_instance_a_series_brings_that_was_not_listed_is_stored_and_counted(here, tmp_path):
    study, objects = _study(tmp_path, 2)
    [series] = {se for se, _ in objects.values()}
    late = ct(study_uid=study, series_uid=series)
    extra = write(tmp_path / "late.dcm", late).read_bytes()
    with LyingSource(study, objects, {}, series="extra", extra=extra) as source:
        result = here.replicate(source.root, "--study", study)
    assert result.exit_code == 0, result.output
    [report] = json.loads(result.stdout)
    assert (report["listed"], report["stored"], report["complete"]) == (3, 3, True), report
    assert {r.sop_instance_uid for r in Instance.select()} == {*objects, late.SOPInstanceUID}


def test_a_series_here_in_part_fetches_only_its_missing_instances(here, tmp_path):
    study, objects = _study(tmp_path, 4)
    away = sorted(objects)[:2]
    with LyingSource(study, objects, {sop: "missing" for sop in away}) as source:  # (no series)
        first = here.replicate(source.root, "--study", study)
    assert first.exit_code == 1 and json.loads(first.stdout)[0]["stored"] == 2
    with LyingSource(study, objects, {}, series="ok") as source:
        result = here.replicate(source.root, "--study", study)
    assert result.exit_code == 0, result.output
    [report] = json.loads(result.stdout)
    assert (report["stored"], report["present"], report["failed"]) == (2, 2, 0)
    wado = [r for r in source.requests if "/series/" in r]
    assert sorted(r.rsplit("/", 1)[-1] for r in wado) == away, wado  # one by one, those only
    assert _leftovers(here) == []


def test_replication_from_a_source_that_never_ends_an_object_stops_it_before_the_disk_fills(
        here, tmp_path, monkeypatch):
    from watcher import replicate
    monkeypatch.setattr(replicate, "MAX_OBJECT_BYTES", 8 << 20)  # (16 GiB in use: too long to wait for)
    study, objects = _study(tmp_path, 2)
    endless = sorted(objects)[0]
    with LyingSource(study, objects, {endless: "endless"}) as source:
        result = here.replicate(source.root, "--study", study)
    assert result.exit_code == 1, result.output + repr(result.exception)
    [report] = json.loads(result.stdout)
    assert (report["stored"], report["failed"]) == (1, 1), report
    assert "before the disk fills" in report["errors"][0], report["errors"]
    assert _leftovers(here) == []


@pytest.mark.parametrize("qido", ["nonjson", "object"])
def test_replication_from_a_source_whose_qido_is_not_dicom_json_is_a_clear_error(here, tmp_path, qido):
    study, objects = _study(tmp_path, 1)
    with LyingSource(study, objects, {}, qido=qido) as source:
        for args in ((), ("--study", study)):
            result = here.replicate(source.root, *args)
            assert result.exit_code != 0, result.output
            assert "Traceback" not in result.output and (
                result.exception is None or isinstance(result.exception, SystemExit)), repr(result.exception)
            assert source.root in result.output and "DICOM JSON" in result.output, result.output
    assert not Instance.select().exists()
    assert _leftovers(here) == []


def test_replication_of_an_object_of_another_study_than_listed_is_a_failure(here, tmp_path):
    study, objects = _study(tmp_path, 2)
    sop = sorted(objects)[0]
    series, _ = objects[sop]
    elsewhere = write(tmp_path / "elsewhere.dcm", ct(sop_uid=sop, series_uid=series,
                                                     patient_id="ELSEWHERE")).read_bytes()
    objects[sop] = (series, elsewhere)  # its SOP Instance UID as listed, its study another
    with LyingSource(study, objects, {}) as source:
        result = here.replicate(source.root, "--study", study)
    [report] = json.loads(result.stdout)
    assert result.exit_code == 1 and not report["complete"] and report["failed"] == 1, report


def test_replication_does_not_send_its_token_to_where_a_source_redirects(here, tmp_path):
    study, objects = _study(tmp_path, 2)
    with LyingSource(study, objects, {}) as elsewhere:
        target = elsewhere.root.removesuffix("/dicom-web/")
        with LyingSource(study, objects, {}, redirect=target) as source:
            result = here.replicate(source.root, "--study", study, "--token", "s3cret")
    assert result.exit_code == 0, result.output
    assert set(source.authorizations) == {"Bearer s3cret"}
    assert elsewhere.authorizations and set(elsewhere.authorizations) == {None}, elsewhere.authorizations
    assert _leftovers(here) == []
