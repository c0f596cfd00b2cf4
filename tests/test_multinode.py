"""Several watcher nodes on one PostgreSQL database: each file imported exactly once, whoever dies."""

import datetime
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import wait_for, write_config_file
from dicomfiles import write
from watcher import claims, models
from watcher.models import Claim, Event, Instance, Study

pytestmark = pytest.mark.slow


@pytest.fixture
def pg_url(pg_database):
    import psycopg
    with psycopg.connect(pg_database, autocommit=True) as conn:
        conn.execute("DROP SCHEMA public CASCADE")
        conn.execute("CREATE SCHEMA public")
    models.connect(pg_database)
    yield pg_database
    models.database.close()


def start_node(config_path: Path, node: str, log: Path) -> subprocess.Popen:
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    return subprocess.Popen([sys.executable, "-m", "watcher", "run", "--config", str(config_path)],
                            stdout=subprocess.DEVNULL, stderr=open(log, "wb"), env=env)


def node_config(tmp_path, url, node, drop="drop", claim_seconds=3, **watch):
    folder = tmp_path / node
    folder.mkdir(exist_ok=True)
    cfg = write_config_file(folder, url, watch={"drop_dir": str(tmp_path / drop), "settle_seconds": 1,
                                                "rescan_seconds": 1, **watch},
                            archive={"dir": str(tmp_path / "archive"),
                                     "rejected_dir": str(tmp_path / "rejected")},
                            **{"import": {"node": node, "claim_seconds": claim_seconds}})
    return cfg



def files_in(folder: Path) -> int:
    return sum(1 for p in folder.rglob("*") if p.is_file())


def stop(proc):
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=30) == 0


def test_a_claim_is_exclusive_until_released_or_expired(pg_url, tmp_path):
    path = tmp_path / "f.dcm"
    path.write_bytes(b"x")
    with claims.claim(path, "a", 60) as first:
        with claims.claim(path, "b", 60) as second:
            assert first and not second
    with claims.claim(path, "b", 60) as again:
        assert again
    Claim.insert(path=str(path), node="dead", token="t", expires_at=models.utcnow()).execute()
    time.sleep(0.01)
    with claims.claim(path, "b", 60) as taken_over:
        assert taken_over


@pytest.mark.parametrize("kill_one", [False, True], ids=["both-live", "one-killed"])
def test_two_nodes_on_one_folder_import_each_file_exactly_once(pg_url, tmp_path, kill_one):
    drop = tmp_path / "drop"
    staging = tmp_path / "staging"
    for i in range(2000):
        write(staging / f"s{i // 200}" / f"{i:04d}.dcm", rows=2, columns=2)
    drop.mkdir()
    # A claim is held from its file's opening to its batch's commit (up to 64 files): on a loaded
    # machine that outlasts a 3 s lease, the other node takes the file over and records a
    # harmless duplicate. Live nodes get a lease no batch outlasts; a killed one's must run out.
    lease = 3 if kill_one else 60
    procs = [start_node(node_config(tmp_path, pg_url, n, claim_seconds=lease), n, tmp_path / f"{n}.log")
             for n in ("a", "b")]
    try:
        time.sleep(2)
        for sub in sorted(staging.iterdir()):
            sub.rename(drop / sub.name)
        if kill_one:
            assert wait_for(lambda: Instance.select().count() >= 600, 60)
            procs[0].send_signal(signal.SIGKILL)
            procs[0].wait()
        assert wait_for(lambda: files_in(drop) == 0, 240), f"{files_in(drop)} files left"
        assert wait_for(lambda: Instance.select().count() == 2000, 30)
    finally:
        for p in procs:
            if p.poll() is None:
                stop(p)
    assert len({i.sop_instance_uid for i in Instance.select()}) == 2000
    assert Event.select().where(Event.outcome == "imported").count() == 2000
    if not kill_one:
        assert {i.node for i in Instance.select()} == {"a", "b"}, "both nodes took a share"
        assert Event.select().where(Event.outcome == "duplicate").count() == 0
    from watcher.verify import verify
    found = verify(tmp_path / "archive")
    assert found.ok and found.checked == 2000


def test_two_folders_receiving_one_study_at_once_make_one_study_row(pg_url, tmp_path):
    study = "1.2.826.0.1.3680043.99.1"
    for folder in ("stage1", "stage2"):
        for i in range(100):
            write(tmp_path / folder / f"{i}.dcm", study_uid=study, patient_id="SHARED", rows=2, columns=2)
    (tmp_path / "drop1").mkdir()
    (tmp_path / "drop2").mkdir()
    procs = [start_node(node_config(tmp_path, pg_url, f"n{k}", drop=f"drop{k}"), f"n{k}",
                        tmp_path / f"n{k}.log") for k in (1, 2)]
    try:
        time.sleep(2)
        (tmp_path / "stage1").rename(tmp_path / "drop1" / "x")
        (tmp_path / "stage2").rename(tmp_path / "drop2" / "x")
        assert wait_for(lambda: Instance.select().count() == 200, 60)
    finally:
        for p in procs:
            stop(p)
    assert Study.select().count() == 1
    assert models.Patient.select().count() == 1
    assert models.Series.select().count() == 200  # each file had its own series UID
    assert models.Rejection.select().count() == 0


def test_postgresql_restart_during_import_loses_nothing(pg_url, tmp_path):
    cluster = subprocess.run(["bash", "-c", "ls /etc/postgresql"], capture_output=True, text=True).stdout.split()
    if not cluster or subprocess.run(["which", "pg_ctlcluster"], capture_output=True).returncode:
        pytest.skip("pg_ctlcluster not available to restart the server")
    drop = tmp_path / "drop"
    staging = tmp_path / "staging"
    for i in range(1500):
        write(staging / f"{i:04d}.dcm", rows=2, columns=2)
    drop.mkdir()
    proc = start_node(node_config(tmp_path, pg_url, "a"), "a", tmp_path / "a.log")
    try:
        time.sleep(2)
        staging.rename(drop / "batch")
        time.sleep(0.5)
        models.database.close()
        subprocess.run(["pg_ctlcluster", "--skip-systemctl-redirect", cluster[0], "main", "restart"],
                       check=True, timeout=120)
        assert wait_for(lambda: files_in(drop) == 0, 180), f"{files_in(drop)} left"
    finally:
        stop(proc)
    models.reset_connection()
    assert Instance.select().count() == 1500
    log = (tmp_path / "a.log").read_text()
    assert "cannot import now" in log, "the restart was not noticed: did it happen mid-import?"
    assert len({i.sop_instance_uid for i in Instance.select()}) == 1500


def test_same_uid_committed_by_another_connection_meanwhile_is_a_conflict(pg_url, tmp_path):
    """Two importers insert one SOP Instance UID at once: the second waits for the first's
    commit, fails on the unique key, and must come out as a conflict, not an error."""
    import threading
    from dicomfiles import ct
    from watcher import archive, catalog
    from watcher.commit import commit_all
    from watcher.source import Source
    from watcher.validate import validate

    def record(path):
        with Source(path.parent, path.name, lease=False) as source:
            info = validate(source)
            stored = archive.store_original(source, tmp_path / "archive")
        return catalog.InstanceRecord(info, stored, path.name, "folder-scanner", "n")

    ds = ct(sop_uid="1.2.826.0.1.3680043.99.77")
    first = record(write(tmp_path / "first.dcm", ds))
    ds.InstitutionName = "edited"
    second = record(write(tmp_path / "second.dcm", ds))
    other = record(write(tmp_path / "other.dcm"))  # in the same batch as the loser
    holding, results = threading.Event(), {}

    def first_importer():
        with models.write_transaction():
            catalog.record_instances([first])
            holding.set()
            time.sleep(1.0)  # the second importer's insert now waits on our row
        models.database.close()

    thread = threading.Thread(target=first_importer)
    thread.start()
    holding.wait(10)
    results["other"], results["second"] = commit_all([other, second])
    thread.join()
    outcome = results["second"]
    assert getattr(outcome, "reason", None) == "conflict", repr(outcome)
    assert results["other"] == "imported"
    assert Instance.select().count() == 2


def test_importers_inserting_the_same_patients_in_other_orders_do_not_deadlock(pg_url, tmp_path):
    """One importer's batch holds patient A and wants B while another's holds B and wants A:
    a deadlock, unless every importer takes its rows in one order."""
    import threading
    from dicomfiles import ct
    from watcher import archive, catalog
    from watcher.source import Source
    from watcher.validate import validate

    def record(name, patient):
        path = write(tmp_path / name, ct(patient_id=patient))
        with Source(path.parent, path.name, lease=False) as source:
            info = validate(source)
            stored = archive.store_original(source, tmp_path / "archive")
        return catalog.InstanceRecord(info, stored, name, "folder-scanner", "n")

    a1, b1, a2, b2 = (record("a1.dcm", "PA"), record("b1.dcm", "PB"), record("a2.dcm", "PA"),
                      record("b2.dcm", "PB"))
    holds_a, errors = threading.Event(), []

    def first():
        try:
            with models.write_transaction():
                catalog.record_instances([a1])  # holds patient A (not committed)
                holds_a.set()
                time.sleep(1.0)  # the other importer is now waiting, holding what it took first
                catalog.record_instances([b1])
        except Exception as exc:
            errors.append(exc)
        finally:
            models.database.close()

    thread = threading.Thread(target=first)
    thread.start()
    holds_a.wait(10)
    try:
        with models.write_transaction():
            catalog.record_instances([b2, a2])  # B first, as it came
    except Exception as exc:
        errors.append(exc)
    thread.join()
    assert errors == []
    assert Instance.select().count() == 4


def test_own_claim_orphaned_by_a_lost_connection_is_taken_back_at_once(pg_url, tmp_path):
    """A claim whose release was lost with the database connection (a PostgreSQL restart) is
    this process's own: the next attempt takes it back at once instead of waiting out the lease.
    Another process's live claim, under the same node name, still blocks."""
    models.connect(pg_url)
    path = tmp_path / "a.dcm"
    path.write_bytes(b"x")
    key = os.path.abspath(path)
    far = models.utcnow() + datetime.timedelta(hours=1)
    models.Claim.insert(path=key, node="a", token=f"{os.getpid()}:orphan", expires_at=far).execute()
    with claims.claim(path, "a", 60) as mine:
        assert mine
    models.Claim.insert(path=key, node="a", token=f"{os.getppid()}:other", expires_at=far).execute()
    with claims.claim(path, "a", 60) as other:
        assert not other
    models.database.close()


def test_two_receivers_sent_the_same_objects_at_once_store_each_exactly_once(pg_url, tmp_path):
    """Two nodes, each with its DICOM receiver, one PostgreSQL database and one archive: two
    modalities send the same 150 objects to both at the same moment. Every C-STORE is a
    success, each object is in the database once, its original there, verify clean."""
    import socket
    import threading

    from click.testing import CliRunner
    from pynetdicom import AE
    from pynetdicom.sop_class import CTImageStorage

    from dicomfiles import ct
    from watcher.cli import cli

    def free_port() -> int:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            return s.getsockname()[1]

    ports, procs = {}, []
    for node in ("a", "b"):
        ports[node] = free_port()
        cfg = node_config(tmp_path, pg_url, node, drop=f"drop-{node}")
        (tmp_path / f"drop-{node}").mkdir(exist_ok=True)
        cfg.write_text(cfg.read_text() + f'[dicom]\nport = {ports[node]}\nbind = "127.0.0.1"\n'
                                         'ae_title = "ARCHIVE"\n')
        procs.append(start_node(cfg, node, tmp_path / f"{node}.log"))
    datasets = [ct(rows=8, columns=8) for _ in range(150)]
    statuses: dict = {}

    def send(node: str) -> None:
        ae = AE(ae_title=f"MOD-{node}")
        ae.add_requested_context(CTImageStorage, datasets[0].file_meta.TransferSyntaxUID)
        assoc = None
        for _ in range(300):  # (until the node listens)
            assoc = ae.associate("127.0.0.1", ports[node], ae_title="ARCHIVE")
            if assoc.is_established:
                break
            time.sleep(0.1)
        statuses[node] = [getattr(assoc.send_c_store(ds), "Status", None) for ds in datasets]
        assoc.release()

    try:
        senders = [threading.Thread(target=send, args=(n,)) for n in ports]
        for t in senders:
            t.start()
        for t in senders:
            t.join(180)
    finally:
        for proc in procs:
            stop(proc)
    assert statuses == {"a": [0] * 150, "b": [0] * 150}, statuses
    uids = [ds.SOPInstanceUID for ds in datasets]
    assert Instance.select().where(Instance.sop_instance_uid.in_(uids)).count() == 150
    for i in Instance.select():
        assert (tmp_path / "archive" / i.stored_path).is_file()
    result = CliRunner().invoke(cli, ["verify", "--config", str(tmp_path / "a" / "watcher.toml")])
    models.connect(pg_url)
    assert result.exit_code == 0, result.output
