"""The DICOM network receiver, with real clients: DCMTK's echoscu and storescu, pynetdicom's SCU,
and the real service killed mid-transfer. Originals are stored as sent; success means stored."""

import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest
from pydicom import dcmread
from pydicom.data import get_testdata_file
from pynetdicom import AE
from pynetdicom.sop_class import CTImageStorage

from conftest import make_config, wait_for, write_config_file
from dicomfiles import ct, write
from watcher import models
from watcher.models import Instance, Rejection
from watcher.receive import Receiver

if os.environ.get("WATCHER_REQUIRE_DCMTK") == "1":  # CI installs it: a skip there would hide a gap
    assert shutil.which("storescu"), "DCMTK required (WATCHER_REQUIRE_DCMTK=1) but storescu is missing"
needs_dcmtk = pytest.mark.skipif(shutil.which("storescu") is None, reason="DCMTK is not installed")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def receiver(tmp_path, db_url):
    port = free_port()
    cfg = make_config(tmp_path, db_url, dicom={"port": port, "bind": "127.0.0.1",
                                               "ae_title": "ARCHIVE"})
    models.connect(cfg.database.url)
    r = Receiver(cfg).start()
    r.port = port
    yield r
    r.stop()
    models.database.close()


def send(port, datasets, calling="MODALITY", transfer_syntaxes=None):
    """Send with pynetdicom's SCU; the statuses (None: no answer)."""
    ae = AE(ae_title=calling)
    for ds in datasets:
        ae.add_requested_context(ds.SOPClassUID, transfer_syntaxes or [ds.file_meta.TransferSyntaxUID])
    assoc = ae.associate("127.0.0.1", port, ae_title="ARCHIVE")
    assert assoc.is_established, "association not established"
    try:
        return [getattr(assoc.send_c_store(ds), "Status", None) for ds in datasets]
    finally:
        assoc.release()


@needs_dcmtk
def test_echo_and_storescu_store_the_originals_with_their_origin(receiver, tmp_path):
    port = str(receiver.port)
    echo = subprocess.run(["echoscu", "-aec", "ARCHIVE", "127.0.0.1", port], capture_output=True, timeout=30)
    assert echo.returncode == 0, echo.stderr
    files = [write(tmp_path / "out" / f"{i}.dcm", ct()) for i in range(3)]
    sent = subprocess.run(["storescu", "-aec", "ARCHIVE", "-aet", "CT01", "127.0.0.1", port,
                           *map(str, files)], capture_output=True, timeout=60)
    assert sent.returncode == 0, sent.stderr
    rows = {i.sop_instance_uid: i for i in Instance.select()}
    assert len(rows) == 3
    for f in files:
        row = rows[dcmread(f).SOPInstanceUID]
        assert (row.origin, row.calling_ae, row.called_ae, row.remote_host, row.creator) == (
            "dicom", "CT01", "ARCHIVE", "127.0.0.1", "dicom-server")
        stored = dcmread(receiver.config.archive.dir / row.stored_path)
        assert stored.PixelData == dcmread(f).PixelData
    assert not any((receiver.incoming).iterdir())  # nothing left behind
    from watcher.models import Event  # the history says the same: who sent, to whom, from where
    events = list(Event.select().where(Event.outcome == "imported"))
    assert len(events) == 3 and all(e.intake == "dicom" and e.source.startswith("dicom/CT01/")
                                    and "CT01@127.0.0.1 to ARCHIVE" in e.detail for e in events), \
        [(e.source, e.detail) for e in events]


def test_compressed_data_stays_compressed_byte_for_byte(receiver):
    ds = dcmread(get_testdata_file("JPEG2000.dcm"))
    syntax = ds.file_meta.TransferSyntaxUID
    assert send(receiver.port, [ds], transfer_syntaxes=[syntax]) == [0x0000]
    row = Instance.get()
    stored = receiver.config.archive.dir / row.stored_path
    back = dcmread(stored)
    assert back.file_meta.TransferSyntaxUID == syntax
    assert back.PixelData == ds.PixelData  # never decoded, never re-encoded


@pytest.mark.parametrize("db_url", ["postgresql"], indirect=True)
def test_each_association_gives_its_database_connection_back_and_a_dropped_one_is_replaced(receiver):
    """An association's thread ends with it: its connection must not stay open (or stay
    counted in the pool) after it, or a busy receiver runs PostgreSQL out of connections."""
    import psycopg
    admin = psycopg.connect(receiver.config.database.url, autocommit=True)

    def backends() -> int:
        return admin.execute("SELECT count(*) FROM pg_stat_activity WHERE datname = "
                             "current_database() AND pid <> pg_backend_pid()").fetchone()[0]

    assert send(receiver.port, [ct()]) == [0x0000]
    before = backends()
    for _ in range(30):
        assert send(receiver.port, [ct()]) == [0x0000]
    assert Instance.select().count() == 31
    assert backends() - before <= 2, f"{backends() - before} more connections open after 30 associations"
    # the server drops them all (a restart): the next senders are told success, and it is true
    with admin:
        admin.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = "
                      "current_database() AND pid <> pg_backend_pid()")
    models.reset_connection()  # (this test's own connection went too)
    sent = [ct() for _ in range(5)]
    assert [send(receiver.port, [ds])[0] for ds in sent] == [0x0000] * 5
    stored = {i.sop_instance_uid for i in Instance.select()}
    assert {ds.SOPInstanceUID for ds in sent} <= stored and len(stored) == 36


def test_a_duplicate_is_success_and_a_conflict_is_kept_and_refused(receiver):
    first = ct()
    assert send(receiver.port, [first]) == [0x0000]
    assert send(receiver.port, [first]) == [0x0000]  # same UID, same bytes
    assert Instance.select().count() == 1
    other = ct(sop_uid=first.SOPInstanceUID)
    other.PatientName = "Other^Bytes"
    assert send(receiver.port, [other]) == [0xC001]
    assert Instance.select().count() == 1  # never overwritten
    kept = Rejection.get()
    assert kept.reason == "conflict"
    assert f"/dicom/MODALITY/{first.SOPInstanceUID}" in kept.path
    assert dcmread(kept.path).PatientName == "Other^Bytes"  # the newcomer, kept whole


def test_a_dataset_that_is_not_what_the_command_says_is_refused_and_kept(receiver, tmp_path):
    """The command said one SOP Instance UID, the dataset holds another: A9xx, kept as sent."""
    from watcher.origin import from_dicom
    from watcher.pipeline import ingest_object
    ds = ct()
    incoming = write(receiver.incoming / "tmp-test.dcm", ds)
    outcome = ingest_object(incoming, from_dicom("dicom-server", "CT01", "ARCHIVE", "127.0.0.1"),
                            receiver.config, str(ds.SOPClassUID), "1.2.3.4.5.6")
    assert (outcome.outcome, outcome.reason) == ("rejected", "meta-mismatch")
    assert Instance.select().count() == 0
    kept = Rejection.get()
    assert kept.path.endswith("/dicom/CT01/1.2.3.4.5.6.dcm")
    assert dcmread(kept.path).SOPInstanceUID == ds.SOPInstanceUID


def test_an_unknown_caller_is_rejected_at_association(tmp_path, db_url):
    port = free_port()
    cfg = make_config(tmp_path, db_url, dicom={"port": port, "bind": "127.0.0.1",
                                               "calling_ae_titles": ["CT01"]})
    models.connect(cfg.database.url)
    r = Receiver(cfg).start()
    try:
        ae = AE(ae_title="STRANGER")
        ae.add_requested_context(CTImageStorage)
        assoc = ae.associate("127.0.0.1", port)
        assert assoc.is_rejected
        assert assoc.acceptor.primitive.diagnostic == 0x03  # calling AE title not recognised
        assert send(port, [ct()], calling="CT01") == [0x0000]
    finally:
        r.stop()
        models.database.close()


def test_a_private_sop_class_is_accepted_and_stored(receiver):
    ds = ct()
    private = "1.3.6.1.4.1.99999.1.1"
    ds.SOPClassUID = private
    ds.file_meta.MediaStorageSOPClassUID = private
    assert send(receiver.port, [ds]) == [0x0000]
    assert Instance.get().sop_class_uid == private


def test_sigkill_mid_transfer_loses_nothing_acknowledged_and_doubles_nothing(tmp_path, db_url):
    port = free_port()
    path = write_config_file(tmp_path, db_url)
    path.write_text(path.read_text() + f'[dicom]\nport = {port}\nbind = "127.0.0.1"\n'
                                       'ae_title = "ARCHIVE"\n')
    command = [sys.executable, "-m", "watcher", "run", "--config", str(path)]
    log = (tmp_path / "service.log").open("ab")
    service = subprocess.Popen(command, stderr=log)
    acknowledged, stop = [], threading.Event()

    def sender():
        while not stop.is_set():
            ae = AE(ae_title="MODALITY")
            ae.add_requested_context(CTImageStorage, "1.2.840.10008.1.2.1")
            assoc = ae.associate("127.0.0.1", port, ae_title="ARCHIVE")
            if not assoc.is_established:
                time.sleep(0.1)
                continue
            try:
                while not stop.is_set() and assoc.is_established:
                    ds = ct()
                    try:
                        status = assoc.send_c_store(ds)
                    except RuntimeError:  # the association ended meanwhile (the service killed)
                        break
                    if getattr(status, "Status", None) == 0x0000:
                        acknowledged.append(ds.SOPInstanceUID)
            finally:
                if assoc.is_established:
                    assoc.release()

    thread = threading.Thread(target=sender)
    thread.start()
    try:
        assert wait_for(lambda: len(acknowledged) >= 50, timeout=60)
        service.send_signal(signal.SIGKILL)
        service.wait()
        killed_at = len(acknowledged)
        service = subprocess.Popen(command, stderr=log)
        assert wait_for(lambda: len(acknowledged) >= killed_at + 50, timeout=60), \
            (tmp_path / "service.log").read_text()[-3000:]
    finally:
        stop.set()
        thread.join(timeout=30)
        service.send_signal(signal.SIGTERM)
        assert service.wait(timeout=60) == 0
    models.connect(load_url(path))
    try:
        stored = [i.sop_instance_uid for i in Instance.select()]
        assert len(stored) == len(set(stored))  # nothing twice
        assert set(acknowledged) <= set(stored)  # nothing acknowledged lost
        archive = tmp_path / "archive"
        for row in Instance.select():
            assert (archive / row.stored_path).exists()
    finally:
        models.database.close()


def load_url(path):
    from watcher.config import load
    return load(path).database.url


def start_service(tmp_path, db_url, port, dicom="", **overrides):
    """``dicom-watcher run`` with a [dicom] section on ``port`` (plus the lines ``dicom``);
    its config file's path and the process, its log in tmp_path/service.log."""
    path = write_config_file(tmp_path, db_url, **overrides)
    path.write_text(path.read_text() + f'[dicom]\nport = {port}\nbind = "127.0.0.1"\n{dicom}')
    service = subprocess.Popen([sys.executable, "-m", "watcher", "run", "--config", str(path)],
                               stderr=(tmp_path / "service.log").open("ab"))
    return path, service


def test_sigterm_lets_a_transfer_in_flight_finish(tmp_path, db_url):
    port = free_port()
    path, service = start_service(tmp_path, db_url, port)
    try:
        ae = AE(ae_title="MODALITY")
        ae.add_requested_context(CTImageStorage, "1.2.840.10008.1.2.1")
        assoc = None
        assert wait_for(lambda: _associate(ae, port), timeout=60)
        assoc = ae.associate("127.0.0.1", port)
        big = ct(rows=2048, columns=2048)  # 8 MB
        result = {}
        sending = threading.Thread(target=lambda: result.update(s=assoc.send_c_store(big)))
        sending.start()
        time.sleep(0.05)
        service.send_signal(signal.SIGTERM)
        sending.join(timeout=60)
        if assoc.is_established:
            assoc.release()
        assert service.wait(timeout=60) == 0
    finally:
        if service.poll() is None:
            service.kill()
    assert getattr(result.get("s"), "Status", None) == 0x0000
    models.connect(load_url(path))
    try:
        assert Instance.get().sop_instance_uid == big.SOPInstanceUID
    finally:
        models.database.close()


def _associate(ae, port) -> bool:
    assoc = ae.associate("127.0.0.1", port)
    ok = assoc.is_established
    if ok:
        assoc.release()
    return ok



@needs_dcmtk
def test_a_sender_killed_mid_object_leaves_nothing_behind(receiver, tmp_path):
    big = write(tmp_path / "big.dcm", ct(rows=4096, columns=4096))  # 32 MB
    sender = subprocess.Popen(["storescu", "--max-send-pdu", "16384", "-aec", "ARCHIVE",
                               "127.0.0.1", str(receiver.port), str(big)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    assert wait_for(lambda: any(p.stat().st_size > 1_000_000 for p in receiver.incoming.iterdir()),
                    timeout=30, step=0.002), "the transfer ended before it could be cut"
    sender.send_signal(signal.SIGKILL)  # the connection drops mid-object
    sender.wait()
    assert wait_for(lambda: not any(receiver.incoming.iterdir()), timeout=30)
    assert Instance.select().count() == 0
    assert send(receiver.port, [ct()]) == [0x0000]  # and the receiver goes on


def _certificates(folder):
    """A CA, a server certificate and a client certificate it signed (openssl)."""
    def run(*args):
        subprocess.run(["openssl", *args], check=True, capture_output=True, cwd=folder)
    run("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out", "ca.crt",
        "-days", "1", "-subj", "/CN=test-ca")
    for name in ("server", "client"):
        run("req", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{name}.key", "-out", f"{name}.csr",
            "-subj", f"/CN={'localhost' if name == 'server' else 'client'}")
        run("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.crt", "-CAkey", "ca.key",
            "-CAcreateserial", "-out", f"{name}.crt", "-days", "1")
    return folder


@pytest.mark.skipif(shutil.which("openssl") is None, reason="openssl is not installed")
def test_tls_with_client_certificates_refuses_a_client_without_one(tmp_path, db_url):
    import ssl
    certs = _certificates(tmp_path)
    port = free_port()
    cfg = make_config(tmp_path, db_url, dicom={
        "port": port, "bind": "127.0.0.1", "tls_cert": str(certs / "server.crt"),
        "tls_key": str(certs / "server.key"), "tls_ca": str(certs / "ca.crt")})
    models.connect(cfg.database.url)
    r = Receiver(cfg).start()
    try:
        def associate(with_certificate: bool):
            context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(certs / "ca.crt"))
            context.check_hostname = False
            if with_certificate:
                context.load_cert_chain(certs / "client.crt", certs / "client.key")
            ae = AE(ae_title="CT01")
            ae.add_requested_context(CTImageStorage, "1.2.840.10008.1.2.1")
            return ae.associate("127.0.0.1", port, tls_args=(context, None))

        bare = associate(False)
        assert not bare.is_established  # the handshake fails: no certificate
        assoc = associate(True)
        assert assoc.is_established
        ds = ct()
        assert assoc.send_c_store(ds).Status == 0x0000
        assoc.release()
        assert Instance.get().sop_instance_uid == ds.SOPInstanceUID
    finally:
        r.stop()
        models.database.close()


def test_associations_are_spread_over_the_importer_processes_and_the_port_is_ours_alone(
        tmp_path, db_url):
    """The service listens once, before it forks; every importer accepts on that socket, so
    senders are served by several processes (cores). Nobody else can listen on the port."""
    port = free_port()
    path, service = start_service(tmp_path, db_url, port, **{"import": {"node": "test-node", "processes": 2}})
    try:
        ae = AE(ae_title="MODALITY")
        ae.add_requested_context(CTImageStorage, "1.2.840.10008.1.2.1")
        assert wait_for(lambda: _associate(ae, port), timeout=60)
        for reuse in (False, True):
            with socket.socket() as other, pytest.raises(OSError):
                if reuse:
                    other.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
                other.bind(("127.0.0.1", port))
        statuses = []

        def sender():  # one association each, as a modality sends a series
            statuses.extend(send(port, [ct() for _ in range(10)]))

        threads = [threading.Thread(target=sender) for _ in range(3)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=120)
    finally:
        service.send_signal(signal.SIGTERM)
        assert service.wait(timeout=60) == 0
    assert statuses == [0x0000] * 30
    models.connect(load_url(path))
    try:
        assert Instance.select().count() == 30
    finally:
        models.database.close()
    log = (tmp_path / "service.log").read_text()
    served = {importer: log.count(f" {importer} INFO watcher.pipeline: imported 'dicom/")
              for importer in ("test-node", "test-node#1")}  # (the log names the importer)
    assert all(served.values()), f"one importer received everything: {served}"


def test_a_site_without_a_drop_folder_runs_the_receiver_alone(tmp_path, db_url):
    """No [watch] section: the service receives (no drop folder is made or watched), `scan`
    and `retry` say there is no drop folder, `pending` is empty; a config with nothing to do
    at all is refused."""
    from click.testing import CliRunner

    from watcher.cli import cli
    port = free_port()
    path = write_config_file(tmp_path, db_url)
    text = path.read_text()
    text = text[:text.index("[watch]")] + text[text.index("[archive]"):]  # (the [watch] lines gone)
    path.write_text(text + f'[dicom]\nport = {port}\nbind = "127.0.0.1"\nae_title = "ARCHIVE"\n')
    (tmp_path / "drop").rmdir() if (tmp_path / "drop").is_dir() else None
    service = subprocess.Popen([sys.executable, "-m", "watcher", "run", "--config", str(path)],
                               stderr=(tmp_path / "service.log").open("ab"))
    echo = AE(ae_title="MODALITY")
    echo.add_requested_context("1.2.840.10008.1.1")  # Verification
    try:
        assert wait_for(lambda: _associate(echo, port) or service.poll() is not None,
                        timeout=60), (tmp_path / "service.log").read_text()
        assert service.poll() is None, (tmp_path / "service.log").read_text()
        ds = ct()
        assert send(port, [ds]) == [0x0000]
        models.connect(load_url(path))
        assert [i.origin for i in Instance.select().where(Instance.sop_instance_uid == ds.SOPInstanceUID)] == ["dicom"]
        runner = CliRunner()
        scan = runner.invoke(cli, ["scan", "--config", str(path)])
        assert scan.exit_code == 1 and "no drop folder" in scan.output, scan.output
        retry = runner.invoke(cli, ["retry", "--config", str(path)])
        assert retry.exit_code == 1 and "no drop folder" in retry.output, retry.output
        pending = runner.invoke(cli, ["pending", "--json", "--config", str(path)])
        assert pending.exit_code == 0 and pending.stdout.strip() == "[]", pending.output
        status = runner.invoke(cli, ["status", "--check", "--config", str(path)])
        assert status.exit_code == 0, status.output
    finally:
        service.send_signal(signal.SIGTERM)
        code = service.wait(30)
    models.database.close()
    assert code == 0, (tmp_path / "service.log").read_text()
    assert not (tmp_path / "drop").exists()
    assert "no drop folder ([watch]): the DICOM receiver only" in (tmp_path / "service.log").read_text()
    nothing = tmp_path / "nothing.toml"
    nothing.write_text(text)
    result = CliRunner().invoke(cli, ["status", "--config", str(nothing)])
    assert result.exit_code == 1 and "nothing to do" in result.output, result.output


def test_verify_repair_in_a_loop_while_senders_send_loses_nothing_acknowledged(tmp_path, db_url):
    """An administrator runs ``verify --repair`` over and over while a modality sends: no
    original that was acknowledged (its row committed) is taken for an orphan and removed."""
    from test_identity import REPAIRER
    port = free_port()
    path, service = start_service(tmp_path, db_url, port, 'ae_title = "ARCHIVE"\n')
    done = tmp_path / "done-repairing"
    try:
        echo = AE(ae_title="MODALITY")
        echo.add_requested_context("1.2.840.10008.1.1")
        assert wait_for(lambda: _associate(echo, port) or service.poll() is not None, timeout=60)
        repairer = subprocess.Popen([sys.executable, "-c", REPAIRER, str(path), str(done)],
                                    stdout=subprocess.PIPE, text=True)
        datasets = [ct(rows=4, columns=4) for _ in range(200)]
        statuses = send(port, datasets[:1])
        ae = AE(ae_title="MODALITY")
        ae.add_requested_context(CTImageStorage, datasets[0].file_meta.TransferSyntaxUID)
        assoc = ae.associate("127.0.0.1", port, ae_title="ARCHIVE")
        statuses += [getattr(assoc.send_c_store(ds), "Status", None) for ds in datasets[1:]]
        assoc.release()
        done.touch()
        repairs, _ = map(int, repairer.communicate(timeout=60)[0].split())
    finally:
        service.send_signal(signal.SIGTERM)
        service.wait(30)
    assert repairs >= 3
    assert statuses == [0x0000] * len(datasets)
    models.connect(load_url(path))
    assert Instance.select().count() == len(datasets)
    from click.testing import CliRunner

    from watcher.cli import cli
    result = CliRunner().invoke(cli, ["verify", "--json", "--config", str(path)])
    models.database.close()
    assert result.exit_code == 0, result.output


def test_open_associations_are_counted_for_the_heartbeat(receiver):
    ae = AE(ae_title="MODALITY")
    ae.add_requested_context("1.2.840.10008.1.1")
    assoc = ae.associate("127.0.0.1", receiver.port, ae_title="ARCHIVE")
    try:
        assert assoc.is_established
        assert wait_for(lambda: receiver.active() == 1, timeout=10)
    finally:
        assoc.release()
    assert wait_for(lambda: receiver.active() == 0, timeout=10)
