"""DICOMweb against the real service (tests/test_web.py's Site: a running ``watcher run`` with
its web app, studies in import, trial-a and trial-b, a manager and a researcher): QIDO-RS
searches, WADO-RS retrievals of the originals, STOW-RS uploads recorded with their uploader,
and an upload killed half-way."""

import email.parser
import json
import os
import signal
import subprocess
import sys
import threading

import httpx
import pytest

from conftest import wait_for
from dicomfiles import ct, write
from test_web import site  # noqa: F401 (the fixture: a running service with its web app)
from watcher import models
from watcher.models import Instance

pytestmark = pytest.mark.slow
RELATED = 'multipart/related; type="application/dicom"'


def parts_of(response: httpx.Response) -> list[bytes]:
    """The parts of a multipart/related answer, parsed by the standard library."""
    head = f"Content-Type: {response.headers['content-type']}\r\n\r\n".encode()
    message = email.parser.BytesParser().parsebytes(head + response.content)
    assert message.is_multipart(), response.headers
    return [p.get_payload(decode=True) for p in message.get_payload()]


def stow_body(files: list[bytes], boundary="test-boundary-0123") -> tuple[bytes, str]:
    body = b"".join(b"--" + boundary.encode() + b"\r\nContent-Type: application/dicom\r\n\r\n" + f + b"\r\n"
                    for f in files) + b"--" + boundary.encode() + b"--\r\n"
    return body, f"{RELATED}; boundary={boundary}"


def stow(site, path, files, token, **kwargs) -> httpx.Response:
    body, content_type = stow_body(files)
    return httpx.post(site.url + path, content=body, timeout=60,
                      headers={"Content-Type": content_type, "Authorization": f"Bearer {token}"},
                      **kwargs)


def value(item: dict, tag: str):
    return item[tag]["Value"][0] if "Value" in item.get(tag, {}) else None


def new_study(tmp_path, n: int, **attrs) -> list[bytes]:
    study, series = ct().StudyInstanceUID, ct().SeriesInstanceUID
    return [write(tmp_path / "made" / f"{study}-{i}.dcm",
                  ct(study_uid=study, series_uid=series, **attrs)).read_bytes() for i in range(n)]


def test_qido_finds_only_what_the_account_may_read(site):
    rita = site.token("rita")
    found = site.get("/dicom-web/trial-a/studies", rita)
    assert found.status_code == 200 and found.headers["content-type"].startswith("application/dicom+json")
    [study] = found.json()
    assert value(study, "0020000D") == site.a_study
    assert value(study, "00100020") == "PAT1"
    assert value(study, "00201208") == 2 and value(study, "00080061") == "CT"
    assert value(study, "00081190").endswith(f"/dicom-web/trial-a/studies/{site.a_study}")
    assert site.get("/dicom-web/trial-a/studies", rita, params={"PatientID": "PAT1"}).json()
    assert site.get("/dicom-web/trial-a/studies", rita, params={"00100020": "pat*"}).json()
    assert site.get("/dicom-web/trial-a/studies", rita, params={"PatientID": "PAT2"}).json() == []
    assert site.get("/dicom-web/trial-a/studies", rita, params={"PatientNmae": "x"}).status_code == 400
    series = site.get(f"/dicom-web/trial-a/studies/{site.a_study}/series", rita).json()
    assert [value(s, "00201209") for s in series] == [2]
    instances = site.get(f"/dicom-web/trial-a/studies/{site.a_study}/instances", rita).json()
    assert len(instances) == 2 and all(value(i, "00080018") for i in instances)
    assert len(site.get("/dicom-web/trial-a/instances", rita, params={"limit": 1}).json()) == 1
    # another database, the Import database, one that does not exist, a guessed UID: 404
    for path in ("/dicom-web/trial-b/studies", "/dicom-web/import/studies", "/dicom-web/nowhere/studies",
                 f"/dicom-web/trial-b/studies/{site.b_study}", f"/dicom-web/trial-a/studies/{site.b_study}"):
        assert site.get(path, rita).status_code == 404, path
    assert httpx.get(site.url + "/dicom-web/trial-a/studies").status_code == 401
    boss = site.token("boss")
    assert len(site.get("/dicom-web/import/studies", boss).json()) == 1
    assert [value(s, "00080061") for s in site.get("/dicom-web/trial-b/studies", boss).json()] == ["MR"]


def test_wado_returns_the_stored_originals_byte_identical(site):
    rita = site.token("rita")
    originals = sorted(site.originals[site.a_study].values())
    whole = site.get(f"/dicom-web/trial-a/studies/{site.a_study}", rita,
                     headers={"Accept": f"{RELATED}; transfer-syntax=*"})
    assert whole.status_code == 200, whole.text
    assert sorted(parts_of(whole)) == originals
    # its length said up front, not sent in chunks
    assert int(whole.headers["content-length"]) == len(whole.content), whole.headers
    assert "transfer-encoding" not in whole.headers, whole.headers
    [series] = site.get(f"/dicom-web/trial-a/studies/{site.a_study}/series", rita).json()
    series_uid = value(series, "0020000E")
    assert sorted(parts_of(site.get(f"/dicom-web/trial-a/studies/{site.a_study}/series/{series_uid}",
                                    rita))) == originals
    one = site.get(f"/dicom-web/trial-a/studies/{site.a_study}/instances", rita).json()[0]
    url = value(one, "00081190")
    assert parts_of(httpx.get(url, headers={"Authorization": f"Bearer {rita}"}))[0] in originals
    # another transfer syntax than the stored one: we never transcode
    wrong = site.get(f"/dicom-web/trial-a/studies/{site.a_study}", rita,
                     headers={"Accept": f"{RELATED}; transfer-syntax=1.2.840.10008.1.2.4.50"})
    assert wrong.status_code == 406 and "never transcoded" in wrong.text
    assert site.get(f"/dicom-web/trial-a/studies/{site.b_study}", rita).status_code == 404


def test_stow_stores_uploads_with_their_uploader_as_creator_and_keeps_what_it_refuses(site, tmp_path):
    site.cli("grant", "rita", "trial-a", "write")
    rita = site.token("rita")
    files = new_study(tmp_path, 3, patient_id="UPLOADED")
    answer = stow(site, "/dicom-web/trial-a/studies", files, rita)
    assert answer.status_code == 200, answer.text
    stored = answer.json()["00081199"]["Value"]
    assert len(stored) == 3
    [study] = site.get("/dicom-web/trial-a/studies", rita, params={"PatientID": "UPLOADED"}).json()
    study_uid = value(study, "0020000D")
    assert sorted(parts_of(site.get(f"/dicom-web/trial-a/studies/{study_uid}", rita))) == sorted(files)
    rows = list(Instance.select().where(Instance.sop_instance_uid.in_(
        [value(s, "00081155") for s in stored])))
    assert len(rows) == 3 and {r.database_id for r in rows} == {models.StudyDatabase.get(name="trial-a").id}
    assert {(r.creator, r.origin, r.distributed_by) for r in rows} == {("rita", "upload", "rita (upload)")}
    assert 'dicom_watcher_outcomes_total{intake="upload",outcome="imported"} 3.0' in httpx.get(
        site.url + "/metrics").text
    # the same again: already there, a success, still one row each
    again = stow(site, "/dicom-web/trial-a/studies", files, rita)
    assert again.status_code == 200, again.text
    assert Instance.select().where(Instance.sop_instance_uid.in_([r.sop_instance_uid for r in rows])).count() == 3
    # a part that is not DICOM and a conflict (a stored UID with other bytes): refused, kept
    other = ct(study_uid=study_uid, sop_uid=rows[0].sop_instance_uid, PatientName="Other^Bytes")
    conflicting = write(tmp_path / "conflict.dcm", other).read_bytes()
    mixed = stow(site, "/dicom-web/trial-a/studies", [b"not dicom at all" * 20, conflicting], rita)
    assert mixed.status_code == 409, mixed.text
    failed = mixed.json()["00081198"]["Value"]
    assert len(failed) == 2 and all(value(f, "00081197") for f in failed)
    assert any("conflict" in value(f, "00000902") for f in failed)
    kept = sorted(p.read_bytes() for p in (site.config.archive.rejected_dir / "upload" / "rita").rglob("*")
                  if p.is_file() and not p.name.endswith(".reason.txt"))
    assert b"not dicom at all" * 20 in kept
    # into a study of the URL: an instance of another study is refused
    assert stow(site, f"/dicom-web/trial-a/studies/{site.a_study}", new_study(tmp_path, 1), rita).status_code == 409
    # where she may only read, or not at all: refused, nothing stored
    assert stow(site, "/dicom-web/trial-b/studies", new_study(tmp_path, 1), rita).status_code == 404
    site.cli("grant", "rita", "trial-a", "read")
    assert stow(site, "/dicom-web/trial-a/studies", new_study(tmp_path, 1), rita).status_code == 403
    # a session from a browser must carry its CSRF token
    session = site.login("rita")
    body, content_type = stow_body(new_study(tmp_path, 1))
    assert session.post("/dicom-web/trial-a/studies", content=body,
                        headers={"Content-Type": content_type}).status_code == 403
    bad = httpx.post(site.url + "/dicom-web/trial-a/studies", content=b"--x\r\n\r\nabc",
                     headers={"Content-Type": f"{RELATED}; boundary=x", "Authorization": f"Bearer {site.token('boss')}"})
    assert bad.status_code == 400 and "closing boundary" in bad.text


@pytest.mark.parametrize("when", ["receiving", "ingesting"])
def test_an_upload_killed_half_way_leaves_nothing_half_stored_and_sending_again_completes_it(
        site, tmp_path, when):
    """SIGKILL the service while an upload streams in, or while its parts are being stored;
    start it again. What was never acknowledged is not half-stored, the incoming folder is
    emptied, and the same upload sent again holds every instance exactly once."""
    boss = site.token("boss")
    files = new_study(tmp_path, 40, patient_id="KILLED")
    files.insert(0, write(tmp_path / "made" / "big.dcm", ct(study_uid=ct_study(files), rows=1024, columns=1024,
                                                            patient_id="KILLED")).read_bytes())
    body, content_type = stow_body(files)
    half, killed = threading.Event(), threading.Event()

    def held_at_half():
        for i in range(0, len(body), 64 * 1024):
            yield body[i:i + 64 * 1024]
            if i > len(body) // 2 and when == "receiving":
                half.set()
                killed.wait(60)

    def send():
        try:
            httpx.post(site.url + "/dicom-web/import/studies", content=held_at_half(), timeout=60,
                       headers={"Content-Type": content_type, "Authorization": f"Bearer {boss}"})
        except httpx.TransportError:
            pass

    def stored() -> int:
        return Instance.select().join(models.Series).join(models.Study).join(models.Patient).where(
            models.Patient.patient_id == "KILLED").count()

    sender = threading.Thread(target=send)
    sender.start()
    if when == "receiving":
        assert half.wait(60)
    else:
        assert wait_for(lambda: stored() > 0, timeout=60, step=0.005)
    _kill_service(site)
    killed.set()
    sender.join(60)
    site.service.wait()
    if when == "receiving":
        assert stored() == 0
    site.service = subprocess.Popen([sys.executable, "-m", "watcher", "run", "--config", str(site.path)],
                                    stdout=subprocess.DEVNULL, stderr=site.log.open("ab"))
    assert wait_for(site._up, timeout=60, step=0.2), site.log.read_text()
    incoming = site.config.archive.dir / ".incoming" / "upload-test-node"
    assert incoming.is_dir() and not list(incoming.iterdir())
    answer = stow(site, "/dicom-web/import/studies", files, boss)
    assert answer.status_code == 200, answer.text
    uids = [value(s, "00081155") for s in answer.json()["00081199"]["Value"]]
    assert len(set(uids)) == len(files)
    assert Instance.select().where(Instance.sop_instance_uid.in_(uids)).count() == len(files)
    got = parts_of(site.get(f"/dicom-web/import/studies/{ct_study(files)}", boss))
    assert sorted(got) == sorted(files)
    site.cli("verify")  # every original there, matching its row


def ct_study(files: list[bytes]) -> str:
    import io

    import pydicom
    return pydicom.dcmread(io.BytesIO(files[0]), stop_before_pixels=True).StudyInstanceUID


def _kill_service(site) -> None:
    """kill -9 the service: its supervisor and its importer processes (forked: the same
    command line)."""
    found = subprocess.run(["pgrep", "-f", str(site.path)], capture_output=True, text=True).stdout.split()
    assert str(site.service.pid) in found, found
    for pid in found:
        try:
            os.kill(int(pid), signal.SIGKILL)
        except ProcessLookupError:
            pass


def test_another_dicom_watcher_is_replicated_byte_for_byte_with_checksums(site, tmp_path):
    """A second site (its own catalog and archive) replicates trial-a of the running one over
    DICOMweb with a researcher's token: every original arrives byte-identical, checked against
    the source's sha256; the researcher's token reaches nothing else; a second run fetches
    nothing."""
    from click.testing import CliRunner

    from conftest import write_config_file
    from watcher.cli import cli
    from watcher.config import load

    here = tmp_path / "second-site"
    here.mkdir()
    path = write_config_file(here, f"sqlite:///{here / 'second.db'}")  # (its own catalog, whatever the first's)
    rita = site.token("rita")
    root = f"{site.url}/dicom-web/trial-a/"

    def replicate(*args):
        result = CliRunner().invoke(cli, ["replicate", "--from", root, "--token", rita, "--json", *args,
                                          "--config", str(path)])
        return result.exit_code, result.stdout

    code, out = replicate()
    assert code == 0, out
    [report] = json.loads(out)
    assert (report["listed"], report["stored"], report["failed"]) == (2, 2, 0)
    second = load(path)
    models.connect(second.database.url)
    rows = list(Instance.select())
    assert {(r.origin, r.remote_host) for r in rows} == {("replication", root)}
    got = sorted((second.archive.dir / r.stored_path).read_bytes() for r in rows)
    assert got == sorted(site.originals[site.a_study].values())
    code, out = replicate()
    [report] = json.loads(out)
    assert code == 0 and (report["stored"], report["present"]) == (0, 2)
    # her token reaches trial-a only
    for other in ("trial-b", "import"):
        result = CliRunner().invoke(cli, ["replicate", "--from", f"{site.url}/dicom-web/{other}/",
                                          "--token", rita, "--config", str(path)])
        assert result.exit_code != 0 and "404" in result.output, result.output
    models.connect(site.config.database.url)


def test_every_data_endpoint_gives_nothing_to_an_account_without_rights(site, tmp_path):
    """Every path of the API and DICOMweb (from the served OpenAPI document) and every page,
    asked about trial-b and import by rita (who may read trial-a only) and by nobody (no
    right at all): no answer holds a UID or Patient ID of those databases. And no log line
    above DEBUG holds patient data."""
    site.cli("users", "add", "nobody", "--password-stdin", input="correct horse battery\n")
    tokens = {"rita": site.token("rita"), "nobody": site.token("nobody")}
    boss = site.token("boss")
    [series] = site.get(f"/dicom-web/trial-b/studies/{site.b_study}/series", boss).json()
    series_uid = value(series, "0020000E")
    sop = value(site.get(f"/dicom-web/trial-b/studies/{site.b_study}/instances", boss).json()[0], "00080018")
    import_study = site.import_study
    secrets = {site.b_study, site.import_study, series_uid, sop, "PAT0", "PAT2"}
    spec = site.get("/api/openapi.json").json()
    paths = [p for p, ops in spec["paths"].items() if "get" in ops and "{" in p]
    paths += ["/databases/{db}", "/databases/{db}/studies/{uid}"]  # the pages
    assert len(paths) >= 15, paths
    asked = 0
    for db, study in (("trial-b", site.b_study), ("import", import_study)):
        for path in paths:
            url = (path.replace("{db}", db).replace("{uid}", study).replace("{study}", study)
                   .replace("{series_uid}", series_uid).replace("{series}", series_uid)
                   .replace("{instance}", sop))
            for who, token in tokens.items():
                answer = site.get(url, token)
                asked += 1
                assert answer.status_code in (303, 401, 403, 404), (who, url, answer.status_code)
                assert not any(x in answer.text for x in secrets), (who, url, answer.text[:300])
    assert asked >= 60
    # the searches at the root of what rita may read never reach further
    for url in ("/dicom-web/trial-a/studies?PatientID=PAT2", "/dicom-web/trial-a/instances",
                f"/dicom-web/trial-a/studies/{site.b_study}/instances"):
        answer = site.get(url, tokens["rita"])
        assert not any(x in answer.text for x in secrets), (url, answer.text[:300])
    log = site.log.read_text()
    for patient_data in ("PAT0", "PAT1", "PAT2", "Müller", "Anna"):
        assert patient_data not in log, patient_data
