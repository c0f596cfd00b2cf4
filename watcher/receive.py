"""The DICOM network receiver: modalities and PACS send with C-STORE (and check with C-ECHO).

pynetdicom does the networking. Each received dataset is written by pynetdicom, as it
arrives, into a file in ``archive.dir/.incoming/<node>/`` (chunked: memory stays flat
whatever the object's size; on the archive's file system: the archive takes that file's inode,
no bytes are copied). The store handler hands the file to the one ingest path
(``pipeline.ingest_object``: validate, store, record) and answers the sender only with its
outcome: success once the original is durable and its row committed.

Every storage SOP class is accepted, private ones included, in every transfer syntax the
sender proposes: the sender's first choice is taken, so compressed data stays compressed.
"""

import ipaddress
import logging
import os
import shutil
import socket
import ssl
import tempfile
import time

import pynetdicom
from pydicom.dataset import Dataset
from pynetdicom import AE, _config, evt, register_uid
from pynetdicom.presentation import PresentationContext
from pynetdicom.service_class import StorageServiceClass
from pynetdicom.sop_class import Verification, uid_to_service_class
from pynetdicom.transport import ThreadedAssociationServer

from . import archive, models, ports, source, statuses
from .config import Config
from .errors import Busy, Unavailable
from .origin import from_dicom
from .outcome import is_unavailable
from .pipeline import ingest_object
from .statuses import OUT_OF_RESOURCES, SUCCESS

LOGGER = logging.getLogger(__name__)
STOP_SECONDS = 10.0  # SIGTERM: C-STOREs in flight get this long to finish
ACCEPT_DELAY_SECONDS = 0.005  # per association an importer serves already (see _AcceptingOn)

# pynetdicom writes each dataset to a file as it arrives (the folder: see Receiver.start)
_config.STORE_RECV_CHUNKED_DATASET = True


class _AcceptingOn(ThreadedAssociationServer):
    """pynetdicom's server, accepting on a socket that is already listening (watcher/ports.py)
    instead of binding its own. Its accept loop must never block (another importer may take
    the connection first), so the socket is non-blocking; accepted connections are not."""

    listener: socket.socket  # set by a subclass made for each receiver

    def server_bind(self) -> None:
        self.socket.close()
        self.socket = self.listener.dup()
        self.socket.setblocking(False)
        self.server_address = self.socket.getsockname()

    def server_activate(self) -> None:
        pass  # listening already

    def get_request(self):
        """Every importer wakes for a new connection and the first to accept it gets it: one
        that is busy already waits a moment, so that an idle one takes the next sender."""
        busy = len(self.active_associations)
        if busy:
            time.sleep(min(busy, 10) * ACCEPT_DELAY_SECONDS)
        return super().get_request()


class _AE(AE):
    """An AE whose server is an ``_AcceptingOn`` (``make_server`` is pynetdicom's documented
    way to choose the server class)."""

    server_class = None

    def make_server(self, address, *args, server_class=None, **kwargs):
        return super().make_server(address, *args, server_class=self.server_class, **kwargs)


class Receiver:
    def __init__(self, config: Config, node: str | None = None, listener: socket.socket | None = None):
        """``node``: this importer's name (its incoming folder); ``listener``: the service's
        listening socket (watcher/ports.py), opened before it forked its importers so that each
        of them accepts associations on it; else the receiver opens its own."""
        self.config = config
        self.dicom = config.dicom
        self.networks = [ipaddress.ip_network(h, strict=False) for h in self.dicom.allowed_hosts]
        node = node or config.import_.node
        self.incoming = config.archive.dir / archive.INCOMING / node.replace("/", "_")
        self.listener, self._own_listener = listener, listener is None
        self.server = None

    def start(self) -> "Receiver":
        shutil.rmtree(self.incoming, ignore_errors=True)  # never acknowledged: our last run's
        self.incoming.mkdir(parents=True, exist_ok=True)
        # pynetdicom names its files with the tempfile module, in its default folder: ours.
        tempfile.tempdir = str(self.incoming)
        if self.listener is None:
            self.listener = ports.listen("dicom", self.dicom.bind, self.dicom.port)
        ae = _AE(ae_title=self.dicom.ae_title)
        ae.server_class = type("AcceptingOnOurs", (_AcceptingOn,), {"listener": self.listener})
        ae.maximum_associations = self.dicom.max_associations
        ae.maximum_pdu_size = OFFERED_PDU_BYTES
        # One bound on a silent sender: before its association request (ACSE), between two
        # PDUs (network: the association is aborted), waiting for a message (DIMSE).
        timeout = self.dicom.timeout_seconds
        ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = timeout
        ae.require_calling_aet = list(self.dicom.calling_ae_titles)
        ae.add_supported_context(Verification)
        handlers = [(evt.EVT_CONN_OPEN, self._on_connect), (evt.EVT_REQUESTED, self._on_request),
                    (evt.EVT_C_ECHO, lambda event: SUCCESS), (evt.EVT_C_STORE, self._on_store),
                    (evt.EVT_ABORTED, self._sweep), (evt.EVT_CONN_CLOSE, self._sweep)]
        self.server = ae.start_server((self.dicom.bind, self.dicom.port), block=False,
                                      evt_handlers=handlers, ssl_context=self._tls())
        LOGGER.info("receiving DICOM as %s on %s:%d%s", self.dicom.ae_title,
                    self.dicom.bind or "*", self.dicom.port, " (TLS)" if self.dicom.tls_cert else "")
        return self

    def active(self) -> int:
        """The associations open now (for the heartbeat, and so /metrics)."""
        server = self.server
        return len(server.active_associations) if server is not None else 0

    def stop(self, timeout: float = STOP_SECONDS) -> None:
        """Stop accepting; let the associations in flight finish (``timeout``), abort the rest."""
        if self.server is None:
            return
        server, self.server = self.server, None
        server.shutdown()
        if self._own_listener:
            self.listener.close()
        deadline = time.monotonic() + timeout
        while server.active_associations and time.monotonic() < deadline:
            time.sleep(0.05)
        for assoc in server.active_associations:
            LOGGER.warning("aborting the association with %s after %.0f s: nothing it sent "
                           "unacknowledged is kept", assoc.requestor.ae_title, timeout)
            assoc.abort()

    def _sweep(self, event=None) -> None:
        """After an association ends: the part of an object it left (aborted mid-object, the
        connection lost) is removed. A file still written, or in the store handler (pynetdicom
        keeps it open for writing until the answer is sent), cannot be leased: it stays."""
        if event is not None:  # pynetdicom 3.0 leaves the file of a message cut short open
            message = getattr(getattr(event.assoc, "dimse", None), "message", None)
            unfinished = getattr(message, "_data_set_file", None)
            if unfinished is not None:
                unfinished.close()
        for path in self.incoming.iterdir():
            try:
                fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
            except OSError:
                continue
            try:
                if source.take_read_lease(fd):
                    path.unlink()
                    LOGGER.info("removed %s, left by an association that ended mid-object "
                                "(never acknowledged)", path.name)
            except (Busy, OSError):
                pass
            finally:
                os.close(fd)

    def _on_connect(self, event) -> None:
        """pynetdicom 3.0 reads a connection with a blocking socket (``accept()`` does not pass
        the listening socket's timeout on): a sender that stops half-way through a PDU would
        hold its thread, an association slot and its partial object forever, the abort at the
        network timeout never sent. Every read gives up after ``dicom.timeout_seconds``."""
        connection = event.assoc.dul.socket
        connection.socket.settimeout(self.dicom.timeout_seconds)
        if isinstance(connection.socket, ssl.SSLSocket):  # see _DeferredHandshake
            try:
                connection.socket.do_handshake()
            except OSError as exc:
                LOGGER.warning("TLS connection from %s refused: %s", event.assoc.requestor.address,
                               exc)
                event.assoc.acse_timeout = 0  # no request can come: pynetdicom ends it at once
                return
        if _READS_WHOLE_PDUS:
            connection.recv = _bounded(connection.recv, connection.socket, event.assoc)

    def _tls(self):
        d = self.dicom
        if d.tls_cert is None:
            return None
        context = _DeferredHandshake(ssl.PROTOCOL_TLS_SERVER)  # as create_default_context's
        context.load_cert_chain(d.tls_cert, d.tls_key)
        if d.tls_ca is not None:
            context.load_verify_locations(d.tls_ca)
            context.verify_mode = ssl.CERT_REQUIRED
        return context

    def _on_request(self, event) -> None:
        """Before negotiation: refuse hosts not allowed; accept every storage class proposed."""
        assoc = event.assoc
        host = assoc.requestor.address
        if self.networks and not any(_in(host, n) for n in self.networks):
            LOGGER.warning("association from %s refused: not in dicom.allowed_hosts", host)
            assoc.acse.send_reject(0x01, 0x01, 0x01)  # rejected permanent, by the user, no reason
            return
        contexts = []
        for requested in assoc.requestor.requested_contexts:
            uid = requested.abstract_syntax
            if uid == Verification:
                continue
            if not issubclass(uid_to_service_class(uid), StorageServiceClass):
                if not _unknown(uid):
                    continue  # a service we do not offer (query, retrieve, ...): refused
                register_uid(uid, _keyword(uid), StorageServiceClass)  # a private storage class
            context = PresentationContext()
            context.abstract_syntax = uid
            context.transfer_syntax = list(requested.transfer_syntax)
            contexts.append(context)
        verification = PresentationContext()
        verification.abstract_syntax = Verification
        verification.transfer_syntax = ["1.2.840.10008.1.2", "1.2.840.10008.1.2.1"]
        assoc.acceptor.supported_contexts = [verification, *_unique(contexts)]

    def _on_store(self, event):
        assoc, request = event.assoc, event.request
        origin = from_dicom(self.dicom.creator, assoc.requestor.ae_title, assoc.acceptor.ae_title,
                            assoc.requestor.address)
        try:
            outcome = ingest_object(event.dataset_path, origin, self.config,
                                    str(request.AffectedSOPClassUID),
                                    str(request.AffectedSOPInstanceUID))
        except Exception as exc:
            if isinstance(exc, Unavailable) or is_unavailable(exc):
                LOGGER.warning("C-STORE from %s refused: %s", origin.describe(), exc)
                return _status(OUT_OF_RESOURCES, "archive or database unavailable; send again later")
            LOGGER.exception("C-STORE from %s failed", origin.describe())
            return _status(OUT_OF_RESOURCES, f"{type(exc).__name__}: not stored; send again")
        finally:
            models.give_back_connection()  # (the association's thread ends with it)
        status = statuses.of(outcome)
        if status == SUCCESS:
            return SUCCESS
        return _status(status, f"{outcome.reason}: kept as rejected; {outcome.detail}")


class _DeferredHandshake(ssl.SSLContext):
    """pynetdicom 3.0 wraps each accepted connection in its accept loop
    (``AssociationServer.get_request``), and the handshake blocks there: one client that
    connects and never starts its handshake would keep every other from connecting. The
    handshake is left to the connection's own thread (``Receiver._on_connect``), bounded by
    ``dicom.timeout_seconds``; a failed one ends that connection only."""

    def wrap_socket(self, sock, server_side=False, do_handshake_on_connect=True, *args, **kwargs):
        return super().wrap_socket(sock, server_side, False, *args, **kwargs)


# pynetdicom 3.0 reads each PDU whole into memory, as long as its header says (up to 4 GB),
# before looking at it: one sender streaming a huge PDU would hold that much. We offer PDUs of
# OFFERED_PDU_BYTES; an association request with every context is well below 1 MB.
MAX_PDU_BYTES = 1 << 20
# The largest P-DATA PDU we tell senders they may send (pynetdicom's default is 16 kB). Each PDU
# costs pynetdicom the same Python work whatever its size: with 16 kB a 200 MB object was
# 12,800 of them (260 MB/s from storescu here), with 256 kB (storescu sends at most 128 kB)
# 353-384 MB/s. An association holds one PDU in memory at a time.
OFFERED_PDU_BYTES = 256 << 10
_READS_WHOLE_PDUS = pynetdicom.__version__.split(".")[:2] == ["3", "0"]


def _bounded(recv, sock, assoc):
    """``recv`` of pynetdicom's connection that refuses to gather more than MAX_PDU_BYTES."""
    def bounded(nr_bytes: int) -> bytearray:
        if nr_bytes > MAX_PDU_BYTES:
            LOGGER.warning("connection from %s dropped: it sent a PDU of %d bytes (at most %d "
                           "accepted)", assoc.requestor.address, nr_bytes, MAX_PDU_BYTES)
            sock.shutdown(socket.SHUT_RDWR)  # read nothing more of it
            raise ConnectionAbortedError(f"a PDU of {nr_bytes} bytes")
        return recv(nr_bytes)
    return bounded


def _status(code: int, comment: str) -> Dataset:
    ds = Dataset()
    ds.Status = code
    ds.ErrorComment = comment.encode("ascii", "replace").decode()[:64]
    return ds


def _in(host: str, network) -> bool:
    try:
        return ipaddress.ip_address(host.split("%")[0]) in network
    except ValueError:
        return False


def _unknown(uid: str) -> bool:
    from pydicom.uid import UID
    return UID(uid).name == uid  # not in pydicom's dictionary: a private (or newer) class


def _keyword(uid: str) -> str:
    return "PrivateStorage_" + uid.replace(".", "_")


def _unique(contexts: list) -> list:
    seen, out = set(), []
    for c in contexts:
        if c.abstract_syntax not in seen:
            seen.add(c.abstract_syntax)
            out.append(c)
    return out

