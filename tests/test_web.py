"""The web app and API against the real service: ``python -m watcher run`` with an [http]
section, accounts made with the CLI, files imported through the drop folder, and httpx as the
browser and the program. Who may see what is decided by rights.py; here we check the answers."""

import io
import json
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import zipfile

import httpx
import pytest
import xxhash
from click.testing import CliRunner

from conftest import wait_for, write_config_file
from dicomfiles import ct, write
from watcher import models
from watcher.cli import cli
from watcher.config import load
from watcher.studies import accounts

pytestmark = pytest.mark.slow
PASSWORD = "correct horse battery"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Site:
    """A running service with its web app, three imported studies (one left in import, one
    moved to trial-a, one to trial-b), a manager ``boss`` and a researcher ``rita`` who may
    read trial-a."""

    def __init__(self, tmp_path, db_url):
        self.port = free_port()
        self.path = write_config_file(tmp_path, db_url, **{"import": {"processes": 1}})
        with self.path.open("a") as f:
            f.write(f'[http]\nbind = "127.0.0.1"\nport = {self.port}\n')
        self.config = load(self.path)
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = tmp_path / "service.log"
        for name in ("trial-a", "trial-b"):
            self.cli("databases", "create", name)
        self.cli("users", "add", "boss", "--manager", "--password-stdin", input=PASSWORD + "\n")
        self.cli("users", "add", "rita", "--password-stdin", input=PASSWORD + "\n")
        self.cli("grant", "rita", "trial-a", "read")
        self.originals = {}  # study uid -> {sop uid: bytes}
        self.studies = []
        for n, count in enumerate((1, 2, 3)):
            study = ct().StudyInstanceUID
            series = ct().SeriesInstanceUID
            self.studies.append(study)
            for i in range(count):
                ds = ct(study_uid=study, series_uid=series, StudyDescription=f"Study {n}",
                        Modality="MR" if n == 2 else "CT", patient_id=f"PAT{n}")
                f = write(self.config.watch.drop_dir / f"s{n}" / f"{i}.dcm", ds)
                self.originals.setdefault(study, {})[f"{series}/{ds.SOPInstanceUID}.dcm"] = f.read_bytes()
        self.import_study, self.a_study, self.b_study = self.studies
        self.service = subprocess.Popen([sys.executable, "-m", "watcher", "run", "--config", str(self.path)],
                                        stdout=subprocess.DEVNULL, stderr=self.log.open("wb"))
        assert wait_for(self._up, timeout=60, step=0.2), self.log.read_text()
        boss = self.token("boss")
        assert wait_for(lambda: self.get("/api/databases/import/studies", boss).json().get("total") == 3,
                        timeout=60, step=0.2), self.log.read_text()
        self.cli("distribute", self.a_study, "--to", "trial-a")
        self.cli("distribute", self.b_study, "--to", "trial-b")

    def _up(self) -> bool:
        assert self.service.poll() is None, self.log.read_text()
        try:
            return httpx.get(self.url + "/healthz", timeout=5).status_code == 200
        except httpx.TransportError:
            return False

    def cli(self, *args, input=None) -> str:
        result = CliRunner().invoke(cli, [*args, "--config", str(self.path)], input=input)
        assert result.exit_code == 0, result.output + repr(result.exception)
        return result.stdout

    def token(self, name) -> str:
        return self.cli("users", "token", name).strip().splitlines()[-1]

    def get(self, path, token=None, **kwargs) -> httpx.Response:
        headers = {**kwargs.pop("headers", {}), **({"Authorization": f"Bearer {token}"} if token else {})}
        return httpx.get(self.url + path, headers=headers, timeout=30, **kwargs)

    def login(self, name, password=PASSWORD) -> httpx.Client:
        client = httpx.Client(base_url=self.url, timeout=30)
        response = self.sign_in(client, name, password)
        assert response.status_code == 303, response.text
        return client

    @staticmethod
    def sign_in(client, name, password) -> httpx.Response:
        form = client.get("/login")
        csrf = re.search(r'name="csrf" value="([^"]+)"', form.text)[1]
        return client.post("/login", data={"name": name, "password": password, "csrf": csrf})

    def stop(self) -> float:
        started = time.monotonic()
        if self.service.poll() is None:
            self.service.send_signal(signal.SIGTERM)
            try:
                self.service.wait(30)
            except subprocess.TimeoutExpired:
                self.service.kill()
                self.service.wait()
                pytest.fail("the service did not stop on SIGTERM within 30 s:\n" + self.log.read_text())
        return time.monotonic() - started


@pytest.fixture
def site(tmp_path, db_url):
    s = Site(tmp_path, db_url)
    models.connect(s.config.database.url)
    yield s
    s.stop()
    models.database.close()
    assert s.service.returncode == 0, s.log.read_text()


def csrf_of(page: httpx.Response) -> str:
    return re.search(r'name="csrf" value="([^"]+)"', page.text)[1]


def test_a_researcher_sees_only_what_was_granted_and_404_everywhere_else(site):
    rita = site.login("rita")
    assert [d["name"] for d in rita.get("/api/databases").json()] == ["trial-a"]
    found = rita.get("/api/databases/trial-a/studies").json()
    assert [s["study_instance_uid"] for s in found["studies"]] == [site.a_study]
    study = rita.get(f"/api/databases/trial-a/studies/{site.a_study}").json()
    assert study["instances"] == 2 and study["series"] == 1
    assert study["provenance"][0]["creator"] == "folder-scanner"
    assert study["provenance"][0]["distributed_from"] == "import"
    assert study["provenance"][0]["distributed_at"]
    assert len(rita.get(f"/api/databases/trial-a/studies/{site.a_study}/instances").json()) == 2
    # import, trial-b and a name that does not exist: the same 404, the same message shape
    for path in ("/api/databases/import/studies", "/api/databases/trial-b/studies",
                 f"/api/databases/trial-b/studies/{site.b_study}",
                 f"/api/databases/trial-b/studies/{site.b_study}/archive",
                 "/api/databases/nowhere/studies", "/databases/trial-b", "/databases/import",
                 f"/databases/trial-b/studies/{site.b_study}"):
        answer = rita.get(path)
        assert answer.status_code == 404, (path, answer.text)
        assert "trial-a" not in answer.text
    # a study UID of another database, guessed in the one she may read: 404 too
    for uid in (site.b_study, site.import_study):
        assert rita.get(f"/api/databases/trial-a/studies/{uid}").status_code == 404
        assert rita.get(f"/api/databases/trial-a/studies/{uid}/archive").status_code == 404
        assert rita.get(f"/databases/trial-a/studies/{uid}").status_code == 404
    # the pages: her database, its study, no rejects
    assert site.a_study in rita.get("/databases/trial-a").text
    assert "Study 1" in rita.get(f"/databases/trial-a/studies/{site.a_study}").text
    listing = rita.get("/databases").text
    assert "trial-a" in listing and "trial-b" not in listing and "/databases/import" not in listing
    assert rita.get("/rejects").status_code == 403
    # the manager sees everything; searches narrow the list
    boss = site.login("boss")
    assert [d["name"] for d in boss.get("/api/databases").json()] == ["import", "trial-a", "trial-b"]
    assert boss.get("/api/databases/trial-b/studies", params={"modality": "MR"}).json()["total"] == 1
    assert boss.get("/api/databases/trial-b/studies", params={"modality": "CT"}).json()["total"] == 0
    assert boss.get("/api/databases/import/studies", params={"patient": "pat0"}).json()["total"] == 1
    assert boss.get("/api/databases/import/studies", params={"date": "20250101-20261231"}).json()["total"] == 1
    assert boss.get("/api/databases/import/studies", params={"date": "2026"}).status_code == 400
    paged = boss.get("/api/databases/import/studies", params={"limit": 1, "offset": 1}).json()
    assert (paged["total"], paged["studies"]) == (1, [])
    assert boss.get("/rejects").status_code == 200
    assert "test-node" in boss.get("/").text  # the dashboard shows the node
    # not signed in: pages send to the sign-in form, the API says 401
    anonymous = httpx.Client(base_url=site.url)
    assert anonymous.get("/databases/trial-a").status_code == 303
    assert anonymous.get("/api/databases").status_code == 401


@pytest.mark.parametrize("db_url", ["postgresql"], indirect=True)
def test_web_app_on_postgresql_reuses_connections_and_replaces_those_the_server_dropped(site):
    """A request takes a pooled connection instead of opening one; after the server dropped
    them all (as a restart does), each request is still answered, none with a 503."""
    import psycopg
    boss = site.token("boss")
    url = site.config.database.url

    admin = psycopg.connect(url, autocommit=True)

    def sessions_begun() -> int:  # counted at a session's end, or when its backend flushes
        return admin.execute("SELECT sessions FROM pg_stat_database "
                             "WHERE datname = current_database()").fetchone()[0]

    def settled() -> int:
        seen = [sessions_begun()]
        assert wait_for(lambda: seen.append(sessions_begun()) or seen[-1] == seen[-2], 10, 1.0)
        return seen[-1]

    for _ in range(5):  # the pool fills up to what the service uses at once
        assert site.get("/api/databases", boss).status_code == 200
    before = settled()
    for _ in range(30):
        assert site.get("/api/databases", boss).status_code == 200
        assert site.get("/api/databases/import/studies", boss).status_code == 200
    assert settled() - before <= 5, "the web app opened a connection per request"
    with admin:
        dropped = admin.execute("SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
                                "WHERE datname = current_database() AND pid <> pg_backend_pid()").fetchone()[0]
    assert dropped >= 1
    for _ in range(10):
        assert site.get("/api/databases", boss).status_code == 200
        assert site.get("/healthz").status_code == 200
    assert "did not answer" not in site.log.read_text()


def test_tokens_work_until_revoked_and_a_disabled_account_is_refused_at_once(site):
    token, other = site.token("rita"), site.token("rita")
    assert site.get("/api/databases", token).status_code == 200
    assert accounts.revoke_token(token)
    assert site.get("/api/databases", token).status_code == 401
    assert site.get("/api/databases", "dw_not-a-token").status_code == 401
    session = site.login("rita")
    assert site.get("/api/databases", other).status_code == 200
    site.cli("users", "disable", "rita")
    assert site.get("/api/databases", other).status_code == 401
    assert session.get("/api/databases").status_code == 401  # the session dies with the account
    assert session.get("/databases").status_code == 303
    assert Site.sign_in(httpx.Client(base_url=site.url), "rita", PASSWORD).status_code == 401


def test_a_post_without_its_csrf_token_is_refused_and_wrong_passwords_are_slowed(site):
    client = httpx.Client(base_url=site.url, timeout=30)
    client.get("/login")
    refused = client.post("/login", data={"name": "boss", "password": PASSWORD})
    assert refused.status_code == 403 and "dw_session" not in client.cookies
    boss = site.login("boss")
    page = boss.get("/")
    assert boss.post("/logout", data={}).status_code == 403
    assert boss.post("/logout", data={"csrf": "forged"}).status_code == 403
    body = {"keys": [site.import_study], "to": "trial-b", "dry_run": True}
    assert boss.post("/api/distribute", json=body).status_code == 403  # a session needs the header
    ok = boss.post("/api/distribute", json=body, headers={"X-CSRF-Token": csrf_of(page)})
    assert ok.status_code == 200 and ok.json()["dry_run"]
    assert boss.post("/logout", data={"csrf": csrf_of(page)}).status_code == 303
    assert boss.get("/api/databases").status_code == 401  # signed out: the cookie is dead
    # wrong passwords: each answer later than the one before
    times = []
    for _ in range(3):
        started = time.monotonic()
        assert Site.sign_in(client, "boss", "wrong password").status_code == 401
        times.append(time.monotonic() - started)
    assert times[1] >= 0.5 and times[2] >= 1.0, times


def test_the_zip_of_a_study_holds_its_originals_byte_for_byte(site):
    rita = site.login("rita")
    with rita.stream("GET", f"/api/databases/trial-a/studies/{site.a_study}/archive") as answer:
        assert answer.status_code == 200
        assert answer.headers["content-type"] == "application/zip"
        data = b"".join(answer.iter_bytes())
    with zipfile.ZipFile(io.BytesIO(data)) as z:
        assert z.testzip() is None
        assert {n: z.read(n) for n in z.namelist()} == site.originals[site.a_study]
        assert all(i.compress_type == zipfile.ZIP_STORED for i in z.infolist())
    boss = site.token("boss")
    whole = site.get(f"/api/databases/import/studies/{site.import_study}/archive", boss)
    with zipfile.ZipFile(io.BytesIO(whole.content)) as z:
        assert {n: z.read(n) for n in z.namelist()} == site.originals[site.import_study]


def test_distribute_through_the_api_for_a_manager_and_not_for_a_researcher(site):
    rita, boss = site.token("rita"), site.token("boss")
    post = lambda token, body: httpx.post(site.url + "/api/distribute", json=body, timeout=60,  # noqa: E731
                                          headers={"Authorization": f"Bearer {token}"})
    # rita may read trial-a only: import and trial-b do not exist for her, trial-a is not hers to fill
    assert post(rita, {"keys": [site.import_study], "to": "trial-a"}).status_code == 404
    assert post(rita, {"keys": [site.a_study], "from": "trial-a", "to": "trial-b"}).status_code == 404
    assert post(rita, {"keys": [site.a_study], "from": "trial-a", "to": "trial-a"}).status_code == 403
    unknown = post(boss, {"keys": ["1.2.3.4"], "to": "trial-a"})
    assert unknown.status_code == 404 and "nothing was moved" in unknown.json()["detail"]
    dry = post(boss, {"keys": [site.import_study], "to": "trial-a", "dry_run": True}).json()
    assert dry["studies"][0]["instances"] == 1 and dry["moved"] == 0
    moved = post(boss, {"keys": [site.import_study], "to": "trial-a"})
    assert moved.status_code == 200, moved.text
    assert (moved.json()["moved"], moved.json()["by"]) == (1, "boss (web)")
    found = site.get("/api/databases/trial-a/studies", rita).json()
    assert {s["study_instance_uid"] for s in found["studies"]} == {site.a_study, site.import_study}
    assert site.get("/api/databases/import/studies", boss).json()["total"] == 0
    study = site.get(f"/api/databases/trial-a/studies/{site.import_study}", rita).json()
    assert study["provenance"][0]["distributed_by"] == "boss (web)"
    # granted write on trial-a, rita may move what she reads there into it... from trial-a only
    site.cli("grant", "rita", "trial-a", "write")
    assert post(rita, {"keys": [site.b_study], "from": "trial-b", "to": "trial-a"}).status_code == 404


def test_healthz_metrics_and_openapi_answer_and_sigterm_stops_within_seconds(site):
    health = site.get("/healthz")
    assert health.status_code == 200 and health.text.startswith("ok")
    text = site.get("/metrics").text
    assert 'dicom_watcher_outcomes_total{intake="folder",outcome="imported"} 6.0' in text
    assert 'dicom_watcher_instances{database="trial-a"} 2.0' in text
    assert 'dicom_watcher_instances{database="trial-b"} 3.0' in text
    assert "dicom_watcher_database_up 1.0" in text
    assert re.search(r"dicom_watcher_archive_free_bytes \d", text)
    assert "PAT" not in text and site.a_study not in text  # no patient data in labels
    # each process's import durations and open associations come with its heartbeat (5 s)
    imports = r'dicom_watcher_import_seconds_count\{node="test-node"\} (\d+)'
    assert wait_for(lambda: int((re.search(imports, site.get("/metrics").text) or [0, 0])[1]) >= 6,
                    timeout=20), site.get("/metrics").text
    assert 'dicom_watcher_import_seconds_bucket{le="+Inf",node="test-node"}' in site.get("/metrics").text
    spec = site.get("/api/openapi.json").json()
    assert "/api/distribute" in spec["paths"] and site.get("/api/docs").status_code == 200
    assert site.stop() < 10
    assert site.service.returncode == 0
    with pytest.raises(httpx.TransportError):
        site.get("/healthz")
    assert "web app on http://127.0.0.1" in site.log.read_text()
    assert json.dumps(PASSWORD) not in site.log.read_text()


def test_the_zip_is_made_while_sent_with_flat_memory_and_stops_at_a_damaged_original(tmp_path):
    """(No service needed: watcher/web/download.py on real files.)"""
    import hashlib
    from watcher.web.download import CHUNK, DamagedOriginal, zip_stream
    big = bytes(range(256)) * (5 * CHUNK // 256 + 7)  # 5 MB and a bit
    small = b"DICM" * 100
    for name, data in (("a.dcm", big), ("b.dcm", small)):
        (tmp_path / name).write_bytes(data)
    files = [("s/a.dcm", "a.dcm", hashlib.sha256(big).hexdigest(), len(big), None),
             ("s/b.dcm", "b.dcm", hashlib.sha256(small).hexdigest(), len(small),
              xxhash.xxh3_128(small).hexdigest())]
    chunks = list(zip_stream(tmp_path, files))
    assert max(map(len, chunks)) <= CHUNK + 1024  # never the whole file, let alone the zip
    with zipfile.ZipFile(io.BytesIO(b"".join(chunks))) as z:
        assert (z.read("s/a.dcm"), z.read("s/b.dcm")) == (big, small)
    (tmp_path / "b.dcm").write_bytes(b"DICM" * 99 + b"XXXX")  # changed behind our back
    sent = []
    with pytest.raises(DamagedOriginal):
        for chunk in zip_stream(tmp_path, files):
            sent.append(chunk)
    with pytest.raises(zipfile.BadZipFile):  # what was sent is no whole zip
        zipfile.ZipFile(io.BytesIO(b"".join(sent)))


@pytest.mark.parametrize("checksum", ["xxh3", "sha256 only (a row from before xxh3)"])
@pytest.mark.parametrize("where", ["first", "middle", "last"])
def test_a_large_original_still_stops_at_a_damaged_byte(tmp_path, where, checksum):
    """An original of several chunks is checked as it is sent: against its xxh3, or for a row
    without one, against its sha256 by a thread of its own behind the chunks being sent. A
    byte changed anywhere still ends the download with DamagedOriginal, after every chunk was
    read; the whole one comes out byte for byte; a download closed early (the client went
    away) leaves no hashing thread behind."""
    import hashlib
    from watcher.web.download import CHUNK, DamagedOriginal, read_original
    data = bytes(range(256)) * (7 * CHUNK // 256) + b"tail"
    (tmp_path / "a.dcm").write_bytes(data)
    sha = hashlib.sha256(data).hexdigest()
    quick = xxhash.xxh3_128(data).hexdigest() if checksum == "xxh3" else None
    assert b"".join(read_original(tmp_path, "a.dcm", sha, quick)) == data

    spoilt = bytearray(data)
    spoilt[{"first": 10, "middle": len(data) // 2, "last": len(data) - 1}[where]] ^= 0xFF
    (tmp_path / "a.dcm").write_bytes(bytes(spoilt))
    sent = []
    with pytest.raises(DamagedOriginal):
        for chunk in read_original(tmp_path, "a.dcm", sha, quick):
            sent.append(chunk)
    assert b"".join(sent) == bytes(spoilt)  # refused only once every chunk was hashed

    reading = read_original(tmp_path, "a.dcm", sha, quick)
    next(reading), next(reading)
    reading.close()
    assert not [t for t in threading.enumerate() if t.name.startswith("download-hash")]


@pytest.mark.parametrize("processes", [1, 2])
@pytest.mark.parametrize("section", ["http", "dicom"])
def test_a_taken_port_stops_run_with_a_message_naming_the_key(tmp_path, section, processes):
    """With several importers too: the supervisor opens the ports before it forks, so a taken
    one ends ``run`` at once instead of an importer restarted again and again."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        path = write_config_file(tmp_path, f"sqlite:///{tmp_path}/watcher.db",
                                 **{"import": {"processes": processes}})
        with path.open("a") as f:
            f.write(f'[{section}]\nport = {taken.getsockname()[1]}\nbind = "127.0.0.1"\n')
        run = subprocess.run([sys.executable, "-m", "watcher", "run", "--config", str(path)],
                             capture_output=True, text=True, timeout=60)
    assert run.returncode == 1
    assert f"{section}.port" in run.stderr and "Traceback" not in run.stderr, run.stderr


def test_connections_accepted_on_our_ports_send_at_once():
    """Nagle's algorithm off for what the web app and the receiver accept: with it on (a
    listener made with proto 0, which asyncio takes for not-TCP), each answer on a kept-alive
    connection waited ~40 ms for the client's delayed ACK."""
    from watcher import ports
    listener = ports.listen("http", "127.0.0.1", 0)
    with listener, socket.create_connection(listener.getsockname()):
        accepted, _ = listener.accept()
        with accepted:
            assert accepted.proto == socket.IPPROTO_TCP
            assert accepted.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) == 1


def test_the_dashboards_counts_are_made_in_the_background_and_say_when(db_url):
    """At 1,000,000 instances a count takes a third of a second: a page takes the latest one
    (it shows when it was made); the server's job makes a new one every few seconds."""
    from watcher import models
    from watcher.studies import databases
    from watcher.web.counts import Counts

    models.connect(db_url)
    try:
        on_demand = Counts(every=60)
        listing, counted_at = on_demand.latest()  # no job: the first page counts
        assert [d["name"] for d in listing] == ["import"]
        databases.create("trial-late")
        assert on_demand.latest() == (listing, counted_at)  # fresh: the same counts, not made again
        job = Counts(every=0.2).start()
        try:
            first = job.latest()[1]
            databases.create("trial-later")  # (no page asks: the job counts it)
            assert wait_for(lambda: "trial-later" in [d["name"] for d in job._latest[0]], timeout=10)
            assert job.latest()[1] > first
        finally:
            job.stop()
    finally:
        models.database.close()
