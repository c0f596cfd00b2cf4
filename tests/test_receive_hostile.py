"""Hostile senders and faults against the real running service (``python -m watcher run`` with a
``[dicom]`` section), over real sockets on 127.0.0.1: senders that stall mid-object, malformed
PDUs, datasets that lie about their lengths, a flood of connections. None may leave a partial
object or a row, stop the service, or make it hold memory; each is bounded by
``dicom.timeout_seconds``."""

import os
import shutil
import signal
import socket
import ssl
import struct
import subprocess
import sys
import time
from io import BytesIO

import pytest
from pynetdicom import AE, _config
from pynetdicom.dimse_messages import C_STORE_RQ
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.dsutils import split_dataset
from pynetdicom.pdu import P_DATA_TF
from pynetdicom.sop_class import CTImageStorage, Verification

from conftest import wait_for, write_config_file
from dicomfiles import ct, write
from test_receive import _certificates, free_port, needs_dcmtk
from watcher import models
from watcher.config import load
from watcher.models import Instance, Rejection

TIMEOUT = 3  # dicom.timeout_seconds of the service under test
EXPLICIT_LE = "1.2.840.10008.1.2.1"


class Running:
    """The service, started with a ``[dicom]`` section; ``stop()`` asserts it stopped cleanly."""

    def __init__(self, tmp_path, db_url, wait=True, **dicom):
        self.tmp_path = tmp_path
        self.port = free_port()
        self.config_path = write_config_file(tmp_path, db_url, **{"import": {"processes": 1}})
        values = {"port": self.port, "bind": "127.0.0.1", "ae_title": "ARCHIVE",
                  "timeout_seconds": TIMEOUT, **dicom}
        lines = [f"{k} = {_toml(v)}" for k, v in values.items()]
        with self.config_path.open("a") as f:
            f.write("[dicom]\n" + "\n".join(lines) + "\n")
        self.config = load(self.config_path)
        self.incoming = self.config.archive.dir / ".incoming"
        self.log = tmp_path / "service.log"
        self.process = subprocess.Popen(
            [sys.executable, "-m", "watcher", "run", "--config", str(self.config_path)],
            stdout=subprocess.DEVNULL, stderr=self.log.open("ab"))
        self.connected = False
        if wait:  # (over TLS, the caller checks)
            assert wait_for(lambda: self.alive() and echo(self.port), timeout=60), self.tail()
            self.connect()

    def connect(self) -> None:
        models.connect(self.config.database.url)
        self.connected = True

    def alive(self) -> bool:
        return self.process.poll() is None

    def tail(self) -> str:
        return self.log.read_text(errors="replace")[-4000:] if self.log.exists() else ""

    def partial_files(self) -> list:
        return [p for p in self.incoming.rglob("*") if p.is_file()]

    def rss_kb(self) -> int:
        """VmRSS of the service and every process below it."""
        total = 0
        for pid in [self.process.pid, *_descendants(self.process.pid)]:
            try:
                status = open(f"/proc/{pid}/status").read()
            except FileNotFoundError:
                continue
            total += int(next(line.split()[1] for line in status.splitlines()
                              if line.startswith("VmRSS:")))
        return total

    def stop(self) -> None:
        if self.connected:
            models.database.close()
        if self.alive():
            self.process.send_signal(signal.SIGTERM)
        try:
            code = self.process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
            raise AssertionError("the service did not stop on SIGTERM\n" + self.tail())
        assert code == 0, f"the service exited with {code}\n" + self.tail()


@pytest.fixture
def service(tmp_path, db_url):
    running = Running(tmp_path, db_url)
    yield running
    running.stop()


def _toml(value):
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    return '"' + str(value).replace("\\", "\\\\").replace('"', '\\"') + '"'


def _descendants(pid: int) -> list:
    children = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = open(f"/proc/{entry}/stat").read()
            except OSError:
                continue
            ppid = int(stat.rsplit(")", 1)[1].split()[1])
            children.setdefault(ppid, []).append(int(entry))
    out, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def echo(port: int) -> bool:
    """A C-ECHO with pynetdicom's SCU: True if answered with success."""
    ae = AE(ae_title="ECHO")
    ae.add_requested_context(Verification)
    ae.acse_timeout = ae.network_timeout = ae.dimse_timeout = 10
    assoc = ae.associate("127.0.0.1", port, ae_title="ARCHIVE")
    if not assoc.is_established:
        return False
    try:
        return getattr(assoc.send_c_echo(), "Status", None) == 0x0000
    finally:
        if assoc.is_established:
            assoc.release()


def storescu(port: int, tmp_path, calling="CT02") -> tuple:
    """A normal sender (DCMTK's storescu) with one new CT: (its exit code, the SOP Instance UID)."""
    ds = ct()
    path = write(tmp_path / "normal" / f"{ds.SOPInstanceUID}.dcm", ds)
    sent = subprocess.run(["storescu", "-aec", "ARCHIVE", "-aet", calling, "127.0.0.1", str(port),
                           str(path)], capture_output=True, timeout=60,
                          env={**os.environ, "TCP_NODELAY": "1"})
    return sent.returncode, ds.SOPInstanceUID, sent.stderr


def connect(port: int) -> socket.socket:
    s = socket.create_connection(("127.0.0.1", port), timeout=10)
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return s


def closed_by_peer(sock: socket.socket, timeout: float) -> bool:
    """Whether the other side closes the connection within ``timeout`` (what it sends before,
    e.g. an A-ABORT, is read and dropped)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        sock.settimeout(max(deadline - time.monotonic(), 0.01))
        try:
            if not sock.recv(65536):
                return True
        except TimeoutError:
            return False
        except OSError:  # reset
            return True
    return False


def staller(calling="STALLER") -> AE:
    """pynetdicom's SCU, to set up an association whose socket the test then writes to."""
    ae = AE(ae_title=calling)
    ae.add_requested_context(CTImageStorage, EXPLICIT_LE)
    ae.network_timeout = 120  # our side never gives up first
    return ae


def store_pdus(assoc, ds, path) -> list:
    """The P-DATA-TF PDUs (encoded) of a C-STORE-RQ of the dataset written at ``path``."""
    _, offset = split_dataset(path)
    request = C_STORE()
    request.MessageID = 1
    request.AffectedSOPClassUID = ds.SOPClassUID
    request.AffectedSOPInstanceUID = ds.SOPInstanceUID
    request.Priority = 2
    request.DataSet = BytesIO(path.read_bytes()[offset:])
    message = C_STORE_RQ()
    message.primitive_to_message(request)
    context = assoc.accepted_contexts[0].context_id
    pdus = []
    for primitive in message.encode_msg(context, assoc.acceptor.maximum_length):
        pdu = P_DATA_TF()
        pdu.from_primitive(primitive)
        pdus.append(pdu.encode())
    return pdus


def assert_nothing_kept(service) -> None:
    assert wait_for(lambda: not service.partial_files(), timeout=TIMEOUT + 10), \
        service.partial_files()
    assert Instance.select().count() == 0


# -- 1. a sender that stops sending mid-object -------------------------------------------------
@needs_dcmtk
@pytest.mark.parametrize("where", ["between-pdus", "mid-pdu"])
def test_a_sender_that_stalls_mid_object_is_dropped_and_others_are_served(tmp_path, db_url, where):
    """The command and part of the dataset arrive, then nothing: after dicom.timeout_seconds the
    association is dropped and the partial object removed; meanwhile another sender stores."""
    timeout = 6  # time enough for the other sender on a loaded machine
    service = Running(tmp_path, db_url, timeout_seconds=timeout)
    ds = ct(rows=1024, columns=768)  # 1.5 MB: several PDUs (of receive.OFFERED_PDU_BYTES)
    path = write(tmp_path / "stalled.dcm", ds)
    ae = staller()
    assoc = ae.associate("127.0.0.1", service.port, ae_title="ARCHIVE")
    try:
        assert assoc.is_established
        pdus = store_pdus(assoc, ds, path)
        assert len(pdus) > 4
        raw = assoc.dul.socket.socket  # ours from here on: pynetdicom's SCU only reads it
        for pdu in pdus[:3]:  # the command, the first fragments of the dataset
            raw.sendall(pdu)
        if where == "mid-pdu":
            raw.sendall(pdus[3][:len(pdus[3]) // 2])  # a PDU's header says more than follows
        stalled_at = time.monotonic()
        assert wait_for(lambda: service.partial_files(), timeout=10), "the object never started"

        code, uid, stderr = storescu(service.port, tmp_path)  # another sender, meanwhile
        assert code == 0, stderr
        assert service.partial_files(), "the stalled sender was dropped before the test could check"
        assert time.monotonic() - stalled_at < timeout

        assert wait_for(lambda: not assoc.is_established, timeout=timeout + 10), \
            "the receiver never dropped the stalled association\n" + service.tail()
        assert wait_for(lambda: not service.partial_files(), timeout=10), service.partial_files()
        assert [i.sop_instance_uid for i in Instance.select()] == [uid]  # the other one only
        assert not Rejection.select().count()
        assert service.alive() and echo(service.port)
    finally:
        if assoc.is_established:
            assoc.abort()
        service.stop()


# -- 2. malformed PDUs ----------------------------------------------------------------------
def _associate_rq_header(length: int) -> bytes:
    return struct.pack(">BBL", 0x01, 0x00, length)


def _p_data() -> bytes:
    # one PDV: context 1, a last command fragment holding a few bytes of nonsense
    item = struct.pack(">LB", 2 + 8, 1) + b"\x03" + b"\x00\x00\x00\x00\x04\x00\x00\x00"
    return b"\x04\x00" + struct.pack(">L", len(item)) + item


MALFORMED = {
    "random-bytes": os.urandom(4096),
    "unknown-pdu-type": b"\x99\x00" + struct.pack(">L", 16) + os.urandom(16),
    "associate-rq-length-too-short": _associate_rq_header(8) + b"\x00\x01\x00\x00" + b"A" * 200,
    "associate-rq-length-huge": _associate_rq_header(0xFFFFFFF0) + b"\x00\x01\x00\x00" + b"A" * 100,
    "associate-rq-length-zero": _associate_rq_header(0),
    "header-cut-short": b"\x01\x00\x00",
    "p-data-before-association": _p_data(),
    "release-before-association": b"\x05\x00" + struct.pack(">L", 4) + b"\x00" * 4,
    "abort-before-association": b"\x07\x00" + struct.pack(">L", 4) + b"\x00" * 4,
}


def test_malformed_pdus_are_dropped_and_the_service_answers_the_next_echo(service):
    for name, data in MALFORMED.items():
        sock = connect(service.port)
        try:
            sock.sendall(data)
            # the receiver gives up on it: at once, or (it waits for the rest) after the timeout
            assert closed_by_peer(sock, TIMEOUT + 10), \
                f"the receiver kept the connection after {name}\n" + service.tail()
        finally:
            sock.close()
        assert service.alive(), f"after {name}\n" + service.tail()
        assert echo(service.port), f"no answer after {name}\n" + service.tail()
    assert not service.partial_files()


def test_a_silent_connection_and_a_stalled_association_request_time_out(service):
    """Connected, nothing sent (or half a request): both are dropped after the timeout, and
    other callers are answered meanwhile."""
    silent = connect(service.port)
    half = connect(service.port)
    try:
        half.sendall(_associate_rq_header(200) + b"\x00\x01\x00\x00" + b"A" * 50)
        assert echo(service.port)
        started = time.monotonic()
        assert closed_by_peer(silent, TIMEOUT + 10)
        assert closed_by_peer(half, TIMEOUT + 10), \
            "a half-sent request holds its thread\n" + service.tail()
        assert time.monotonic() - started < TIMEOUT + 10
    finally:
        silent.close()
        half.close()
    assert service.alive() and echo(service.port)


# -- 3. datasets that lie about their lengths ----------------------------------------------
def _lying(tmp_path, how: str):
    """A CT written whole, then made to lie: its Pixel Data declares more than follows."""
    ds = ct(rows=16, columns=16)
    path = write(tmp_path / f"{how}.dcm", ds)
    data = bytearray(path.read_bytes())
    header = b"\xe0\x7f\x10\x00OW\x00\x00"
    at = data.rindex(header) + len(header)
    (length,) = struct.unpack("<L", data[at:at + 4])
    if how == "truncated":  # the message ends half-way through the value
        data = data[:at + 4 + length // 2]
    elif how == "huge-length":  # the value is there, its length says 4 GB
        data[at:at + 4] = struct.pack("<L", 0xFFFFFFF0)
    elif how == "lying-inner-length":  # an element in the middle overruns everything after it
        name = b"\x08\x00\x30\x10LO"  # Study Description
        at = data.index(name) + len(name)
        data[at:at + 2] = struct.pack("<H", 0xFFF0)
    path.write_bytes(bytes(data))
    return ds, path


@pytest.mark.parametrize("how", ["truncated", "huge-length", "lying-inner-length"])
def test_a_dataset_that_lies_about_a_length_is_refused_and_kept_whole(service, tmp_path, how,
                                                                      monkeypatch):
    # the file's bytes as they are (else pynetdicom decodes and re-encodes them, lengths mended)
    monkeypatch.setattr(_config, "STORE_SEND_CHUNKED_DATASET", True)
    ds, path = _lying(tmp_path, how)
    _, offset = split_dataset(path)
    ae = AE(ae_title="LIAR")
    ae.add_requested_context(CTImageStorage, EXPLICIT_LE)
    assoc = ae.associate("127.0.0.1", service.port, ae_title="ARCHIVE")
    assert assoc.is_established
    try:
        status = getattr(assoc.send_c_store(path), "Status", None)  # sent as it is on disk
    finally:
        if assoc.is_established:
            assoc.release()
    assert status is None or status >> 12 == 0xC or status >> 8 == 0xA9, hex(status)
    assert_nothing_kept(service)
    assert service.alive() and echo(service.port)
    if status is not None:  # a whole message: kept as sent, with its reason
        kept = Rejection.get()
        assert f"/dicom/LIAR/{ds.SOPInstanceUID}" in kept.path
        assert kept.reason in ("truncated", "malformed"), (kept.reason, kept.detail)
        stored = open(kept.path, "rb").read()
        assert stored.endswith(path.read_bytes()[offset:])  # the dataset byte for byte


# -- 4. a flood of connections -------------------------------------------------------------
RSS_BOUND_KB = 400 * 1024  # a safety bound, not a measurement


@needs_dcmtk
def test_a_hundred_connections_at_once_are_refused_cleanly_and_memory_stays_bounded(
        tmp_path, db_url):
    service = Running(tmp_path, db_url, max_associations=4)
    sockets, held = [], []
    try:
        before = service.rss_kb()
        for _ in range(4):  # every slot taken by a sender that keeps its association
            ae = AE(ae_title="HOLDER")
            ae.add_requested_context(CTImageStorage, EXPLICIT_LE)
            assoc = ae.associate("127.0.0.1", service.port, ae_title="ARCHIVE")
            assert assoc.is_established
            held.append(assoc)
        for _ in range(100):
            sockets.append(connect(service.port))
        for s in sockets[::2]:  # half of them send half a request and wait
            s.sendall(_associate_rq_header(1000) + b"\x00\x01\x00\x00")
        refused = []
        for _ in range(10):  # more associations than allowed: a clean A-ASSOCIATE-RJ
            ae = AE(ae_title="EXTRA")
            ae.add_requested_context(CTImageStorage, EXPLICIT_LE)
            assoc = ae.associate("127.0.0.1", service.port, ae_title="ARCHIVE")
            refused.append(assoc.is_rejected)
            if assoc.is_established:
                assoc.release()
        assert all(refused), refused
        rss = service.rss_kb()
        assert rss < RSS_BOUND_KB, f"{rss} kB (it was {before} kB)"
        assert service.alive()
        for assoc in held:
            assoc.release()
        held.clear()
        for s in sockets:
            s.close()
        sockets.clear()
        assert wait_for(lambda: storescu(service.port, tmp_path)[0] == 0, timeout=TIMEOUT + 20), \
            service.tail()
        assert Instance.select().count() == 1
        assert not service.partial_files()
        assert service.rss_kb() < RSS_BOUND_KB
    finally:
        for s in sockets:
            s.close()
        for assoc in held:
            assoc.abort()
        service.stop()


# -- 5. TLS: a client without a certificate is refused (test_receive.py), and a client that
# connects and never starts its handshake must not stop the others -------------------------


def test_a_pdu_larger_than_the_receiver_accepts_is_never_read_into_memory(service):
    """A PDU's length is the sender's word: a 300 MB A-ASSOCIATE-RQ (or P-DATA), streamed in
    full, must be refused, not gathered in memory."""
    before = service.rss_kb()
    sock = connect(service.port)
    sent, chunk = 0, b"\x00" * (1 << 20)
    try:
        sock.sendall(_associate_rq_header(300 << 20))
        sock.settimeout(TIMEOUT + 10)
        try:
            while sent < 300 << 20:
                sock.sendall(chunk)
                sent += len(chunk)
        except OSError:  # refused: the receiver closed the connection
            pass
        peak = service.rss_kb()
        assert closed_by_peer(sock, TIMEOUT + 10)
    finally:
        sock.close()
    assert peak - before < 100 * 1024, f"{peak - before} kB more after {sent >> 20} MB"
    assert service.alive() and echo(service.port)


@pytest.mark.skipif(shutil.which("openssl") is None, reason="openssl is not installed")
def test_a_tls_client_that_never_starts_its_handshake_does_not_stop_the_others(tmp_path, db_url):
    certs = _certificates(tmp_path)
    service = Running(tmp_path, db_url, tls_cert=str(certs / "server.crt"),
                      tls_key=str(certs / "server.key"), tls_ca=str(certs / "ca.crt"),
                      wait=False)
    silent = []
    try:
        def associate(with_certificate: bool):
            context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH,
                                                 cafile=str(certs / "ca.crt"))
            context.check_hostname = False
            if with_certificate:
                context.load_cert_chain(certs / "client.crt", certs / "client.key")
            ae = AE(ae_title="CT01")
            ae.add_requested_context(CTImageStorage, EXPLICIT_LE)
            ae.acse_timeout = ae.network_timeout = ae.connection_timeout = 10
            return ae.associate("127.0.0.1", service.port, tls_args=(context, None))

        assert wait_for(lambda: service.alive() and _established(associate(True)), timeout=60), \
            service.tail()
        silent = [connect(service.port) for _ in range(3)]  # TCP only: no ClientHello, ever
        assert not associate(False).is_established  # no certificate: refused
        started = time.monotonic()
        assoc = associate(True)
        assert assoc.is_established, "a silent TLS client stopped every other\n" + service.tail()
        ds = ct()
        assert assoc.send_c_store(ds).Status == 0x0000
        assoc.release()
        assert time.monotonic() - started < TIMEOUT
        assert all(closed_by_peer(s, TIMEOUT + 10) for s in silent)
        service.connect()
        assert [i.sop_instance_uid for i in Instance.select()] == [ds.SOPInstanceUID]
    finally:
        for s in silent:
            s.close()
        service.stop()


def _established(assoc) -> bool:
    ok = assoc.is_established
    if ok:
        assoc.release()
    return ok
