"""Tell systemd how the service is: the sd_notify protocol, in a few lines of ``socket``.

Under ``Type=notify`` systemd passes the path of a datagram socket in $NOTIFY_SOCKET
(a name starting with "@" is in the abstract namespace) and reads lines such as
``READY=1``, ``STOPPING=1`` and ``WATCHDOG=1`` from it. With ``WatchdogSec=`` it also
passes $WATCHDOG_USEC, the interval within which a ``WATCHDOG=1`` must arrive, and
$WATCHDOG_PID, the process that is meant to send them. Outside systemd there is no
socket and every call is a no-op.
"""

import logging
import os
import socket

LOGGER = logging.getLogger(__name__)


def notify(message: str) -> bool:
    """Send ``message`` (e.g. "READY=1") to systemd; False when it does not listen."""
    address = os.environ.get("NOTIFY_SOCKET", "")
    if not address:
        return False
    if address.startswith("@"):
        address = "\0" + address[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.connect(address)
            sock.sendall(message.encode())
    except OSError as exc:
        LOGGER.warning("cannot tell systemd %r through %s: %s", message,
                       os.environ["NOTIFY_SOCKET"], exc)
        return False
    return True


def watchdog_seconds() -> float | None:
    """The interval systemd wants ``WATCHDOG=1`` within, or None when it watches no one here.

    $WATCHDOG_PID, when set, names the one process meant to ping (systemd sets it to the
    main process); a forked child that inherited the environment gets None.
    """
    pid = os.environ.get("WATCHDOG_PID", "")
    if pid and pid != str(os.getpid()):
        return None
    try:
        usec = int(os.environ.get("WATCHDOG_USEC", ""))
    except ValueError:
        return None
    return usec / 1e6 if usec > 0 else None
