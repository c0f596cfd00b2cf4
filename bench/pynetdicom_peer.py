"""pynetdicom alone: the C-STORE SCP that bench/receive.py measures as the ceiling of
pynetdicom on this machine, one that does nothing with what it receives.

``python bench/pynetdicom_peer.py FOLDER PORT...`` starts one SCP process per port (on
127.0.0.1) and waits: SIGTERM stops them all, and it exits as soon as one of them does.

Each SCP is set up as dicom-watcher's receiver is (watcher/receive.py): pynetdicom writes each
data set into a temporary file as it arrives (``STORE_RECV_CHUNKED_DATASET``), here in
``FOLDER/incoming-PORT/``; PDUs of up to 256 kB offered; TCP_NODELAY on each connection (as
watcher/ports.py's listening socket passes it on); Verification, and the benchmark's SOP classes
(CT Image Storage, Multi-frame Grayscale Word Secondary Capture Image Storage) in every transfer
syntax pynetdicom knows. The C-STORE handler keeps the file, a hard link
``FOLDER/out/<SOP Instance UID>.dcm`` made before pynetdicom removes its own name, and answers
Success: no fsync, nothing else.
"""

import multiprocessing
import multiprocessing.connection
import os
import signal
import socket
import sys
import tempfile
from pathlib import Path

from pynetdicom import AE, ALL_TRANSFER_SYNTAXES, _config, evt
from pynetdicom.sop_class import (CTImageStorage, MultiFrameGrayscaleWordSecondaryCaptureImageStorage,
                                  Verification)

from watcher.receive import OFFERED_PDU_BYTES

_config.STORE_RECV_CHUNKED_DATASET = True
AE_TITLE = "ANY-SCP"
SOP_CLASSES = (CTImageStorage, MultiFrameGrayscaleWordSecondaryCaptureImageStorage)


def serve(folder: Path, port: int) -> None:
    """One SCP on 127.0.0.1:``port``, until it is killed."""
    incoming = folder / f"incoming-{port}"
    incoming.mkdir()
    tempfile.tempdir = str(incoming)  # where pynetdicom's NamedTemporaryFile puts each data set
    out = folder / "out"

    def no_delay(event) -> None:
        event.assoc.dul.socket.socket.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def keep(event) -> int:
        os.link(event.dataset_path, out / f"{event.request.AffectedSOPInstanceUID}.dcm")
        return 0x0000

    ae = AE(ae_title=AE_TITLE)
    ae.maximum_pdu_size = OFFERED_PDU_BYTES  # (as our receiver's)
    ae.add_supported_context(Verification)
    for sop_class in SOP_CLASSES:
        ae.add_supported_context(sop_class, ALL_TRANSFER_SYNTAXES)
    ae.start_server(("127.0.0.1", port), evt_handlers=[(evt.EVT_CONN_OPEN, no_delay), (evt.EVT_C_STORE, keep)])


def main(folder: Path, ports: list[int]) -> None:
    (folder / "out").mkdir()
    scps = [multiprocessing.Process(target=serve, args=(folder, port), daemon=True) for port in ports]
    for scp in scps:
        scp.start()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))  # exiting terminates the (daemonic) SCPs
    multiprocessing.connection.wait([scp.sentinel for scp in scps])
    sys.exit(f"an SCP process exited; exit codes {[scp.exitcode for scp in scps]}")


if __name__ == "__main__":
    main(Path(sys.argv[1]), [int(port) for port in sys.argv[2:]])
