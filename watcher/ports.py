"""The service's listening sockets (the DICOM receiver's, the web app's), opened in one way.

A port that cannot be had is a ``ConfigError`` naming its config key, so ``run`` stops with a
message instead of a thread that dies quietly. No SO_REUSEPORT: a second program on the
same port is refused, never handed half the connections."""

import socket

from .errors import ConfigError


def listen(section: str, bind: str, port: int) -> socket.socket:
    """A socket bound to ``bind``:``port`` (``""``: every interface) and listening;
    ``section``: the config section the two keys come from."""
    family = socket.AF_INET6 if ":" in bind else socket.AF_INET
    # IPPROTO_TCP named, and TCP_NODELAY (Linux passes it on to accepted connections): with
    # proto 0, asyncio leaves Nagle's algorithm on for uvicorn's connections, and an answer on a
    # kept-alive connection waited ~40 ms for the client's delayed ACK.
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.bind((bind, port))
        sock.listen(128)
    except OSError as exc:
        sock.close()
        raise ConfigError(f"{section}.port {port} on {bind or '*'} ({section}.bind) cannot be used: "
                          f"{exc.strerror or exc} (is another program using it?)") from None
    return sock
