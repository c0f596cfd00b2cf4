"""The web app served by uvicorn in a thread of the service (importer 0), like the DICOM receiver.

Its socket is opened before the thread starts (by ``run`` before it forks, or here;
watcher/ports.py): a port that is taken stops ``run`` with a message naming the key. ``stop`` stops accepting, gives
the requests in flight GRACE_SECONDS, and returns within a few seconds (SIGTERM)."""

import logging
import socket
import threading
import time

import uvicorn

from .. import ports, upload
from ..config import Config
from ..errors import ConfigError
from .app import create_app

LOGGER = logging.getLogger(__name__)
GRACE_SECONDS = 3


class WebServer:
    def __init__(self, config: Config, listener: socket.socket | None = None):
        """``listener``: the service's socket (watcher/ports.py), else the server opens its own."""
        self.config = config
        self._given = listener
        self.server: uvicorn.Server | None = None
        self._thread: threading.Thread | None = None
        self._socket: socket.socket | None = None
        self._counts = None

    def start(self) -> "WebServer":
        h = self.config.http
        self._socket = self._given if self._given is not None else ports.listen("http", h.bind, h.port)
        upload.clear_incoming(self.config)  # parts of uploads cut short by our last stop: never acknowledged
        app = create_app(self.config)
        self._counts = app.state.web.counts.start()
        self.server = uvicorn.Server(uvicorn.Config(
            app, log_config=None, access_log=False, lifespan="off",
            timeout_graceful_shutdown=GRACE_SECONDS, server_header=False))
        self._thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self._socket]},
                                        name="watcher-web", daemon=True)
        self._thread.start()
        deadline = time.monotonic() + 10
        while not self.server.started and self._thread.is_alive() and time.monotonic() < deadline:
            time.sleep(0.02)
        if not self.server.started:
            self.stop()
            raise ConfigError(f"the web app could not start on {h.bind}:{h.port} (see the log above)")
        LOGGER.info("web app on http://%s:%d/ (API: /api/, its documentation: /api/docs)",
                    f"[{h.bind}]" if ":" in h.bind else h.bind, h.port)
        return self

    def stop(self) -> None:
        if self.server is not None:
            self.server.should_exit = True
        if self._thread is not None:
            self._thread.join(GRACE_SECONDS + 5)
            if self._thread.is_alive():
                LOGGER.warning("the web app did not stop within %d s", GRACE_SECONDS + 5)
        if self._socket is not None and self._socket is not self._given:
            self._socket.close()
        if self._counts is not None:
            self._counts.stop()
        self.server = self._thread = self._socket = self._counts = None


__all__ = ["WebServer"]
