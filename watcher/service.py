"""The service: watch the drop folder and import each file the moment it is complete.

Two producers feed one schedule: watchdog events say *when* to look (a close
after writing or a rename into the folder means "look now"), and a full scan
at start-up and every ``rescan_seconds`` (APScheduler) says *what is there*,
covering missed events, queue overflows and network shares. Worker threads
take due paths from the schedule, which never hands one path to two workers
at once, and run each through the same stages as ``dicom-watcher scan``; a
worker takes every path that is due (up to ``BATCH``) and commits their rows
in one transaction.

``run`` starts one such service per CPU core (``import.processes``), each a
process of its own that takes the paths whose hash falls to it: Python's
threads share one core, processes do not.
"""

import collections
import ctypes
import datetime
import logging
import os
import signal
import socket
import stat
import threading
import time
import zlib

from apscheduler.schedulers.background import BackgroundScheduler
from watchdog.observers import Observer
from watchdog.observers.polling import PollingObserver

from . import archive, beneath, claims, detect, dispose, models, settle
from .config import Config
from .errors import Unavailable
from .pipeline import dispose_recorded, ingest_together
from .schedule import Schedule

LOGGER = logging.getLogger(__name__)
HEARTBEAT_SECONDS = 5.0
DIR_QUIET_SECONDS = 60.0  # an emptied sub-folder may be about to receive a copy's next file
MAX_PAUSE = 30.0
MAX_QUEUED = 10_000  # paths queued at once; a larger backlog is rescanned in slices
CLAIMED_RETRY_SECONDS = 5.0  # another node holds the file: look again (it is gone by then, usually)
BATCH = 64  # files a worker takes at once, when that many are due: one commit for all
DISPOSE_RETRY_SECONDS = 60.0  # a file that cannot be removed or moved: look again this often


class Service:
    def __init__(self, config: Config, clock=time.time, shard: tuple[int, int] = (0, 1),
                 monotonic=time.monotonic):
        """``shard`` (k, n): this service takes the paths whose hash is k modulo n.

        ``clock`` (wall time) is compared with file timestamps; ``monotonic`` orders the
        schedule, so a clock that jumps moves no file's turn.
        """
        self.config = config
        self.clock = clock
        self.monotonic = monotonic
        self.shard = shard
        node = config.import_.node
        self.node = node if shard[0] == 0 else f"{node}#{shard[0]}"
        self.schedule = Schedule(monotonic)
        self.observed = settle.Observed(monotonic)
        self.done_at: dict = {}  # path -> when (wall) a writer closed it or it was renamed in
        self.undisposed: dict = {}  # path -> (signature, Outcome): recorded, not yet removed
        self.warned: dict = {}  # path -> the disposal error already logged for it
        self.attempts = collections.Counter()
        self.counts = collections.Counter()
        self.stopping = threading.Event()
        self.started_at = models.utcnow()
        self.last_rescan = None
        self._drop_identity = None
        self._observer = None
        self._scheduler = None
        self._workers = []
        self._pause = 1.0
        self._more_to_scan = False

    # -- life cycle --------------------------------------------------------------
    def start(self) -> "Service":
        claims.release_stale(self.config.import_.node)
        archive.remove_stale_temporaries(self.config.archive.dir)
        if self.shard[0] == 0:
            for rel in dispose.recover(self.config.watch.drop_dir):
                LOGGER.warning("put back %s (its removal was cut short by a crash)", rel)
        self.rescan()
        self._start_observer()
        self._scheduler = BackgroundScheduler(daemon=True)
        self._scheduler.add_job(self.rescan, "interval", seconds=max(self.config.watch.rescan_seconds, 0.1),
                                id="rescan", max_instances=1, coalesce=True)
        self._scheduler.add_job(self.heartbeat, "interval", seconds=HEARTBEAT_SECONDS,
                                id="heartbeat", max_instances=1, coalesce=True)
        self._scheduler.start()
        for n in range(self.config.import_.workers):
            worker = threading.Thread(target=self._work, name=f"watcher-worker-{n}", daemon=True)
            worker.start()
            self._workers.append(worker)
        self.heartbeat()
        LOGGER.info("watching %s (%s, %d workers)", self.config.watch.drop_dir,
                    "polling" if self.config.watch.poll else "events", len(self._workers))
        return self

    def stop(self) -> None:
        """Finish the files in hand, then stop observer, scheduler and workers."""
        self.stopping.set()
        if self._observer is not None:
            self._observer.stop()
        if self._scheduler is not None:
            self._scheduler.shutdown(wait=True)
        self.schedule.close()
        for worker in self._workers:
            worker.join()
        if self._observer is not None:
            self._observer.join()
        _OverflowAlarm.remove(self)
        self.heartbeat(state="stopped")
        models.database.close()
        LOGGER.info("stopped: %s", dict(self.counts))

    def __enter__(self) -> "Service":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # -- producers ---------------------------------------------------------------
    def notify(self, path: str, done: bool) -> None:
        """A watchdog event for ``path``; ``done`` when it was closed after writing or renamed in."""
        if not self._mine(path):
            return
        rel = os.path.relpath(path, self.config.watch.drop_dir)
        if rel.startswith("..") or any(detect.is_ignored(part, self.config.watch.ignore)
                                       or part.startswith(dispose.PRIVATE) for part in rel.split(os.sep)):
            return
        now = self.monotonic()
        if done:
            self.done_at[path] = self.clock()
        self.schedule.put(path, now if done else now + self.config.watch.settle_seconds)

    def rescan(self) -> None:
        """Look at everything in the drop folder (start-up, every rescan_seconds, after overflow)."""
        if self.stopping.is_set():
            return
        drop = self.config.watch.drop_dir
        try:
            st = os.stat(drop)
        except OSError as exc:
            if self._drop_identity is not None:
                LOGGER.error("the drop folder %s is gone (%s); waiting for it", drop, exc.strerror)
            self._drop_identity = None
            return
        identity = (st.st_dev, st.st_ino)
        if self._drop_identity is not None and identity != self._drop_identity:
            LOGGER.warning("the drop folder %s was replaced or remounted; watching it again", drop)
            self._restart_observer()
        elif self._drop_identity is None and self._observer is not None:
            LOGGER.warning("the drop folder %s is back", drop)
            self._restart_observer()
        self._drop_identity = identity
        now = self.monotonic()
        self._more_to_scan = False
        for path, _ in detect.scan(drop, self.config.watch.ignore):
            if not self._mine(str(path)):
                continue
            if len(self.schedule) >= MAX_QUEUED:  # a huge backlog: take it in slices, memory stays flat
                self._more_to_scan = True
                break
            self.schedule.put(str(path), now)
        if self.shard[0] == 0:  # one service of a node is enough for that
            dispose.prune_empty_dirs(drop, max(DIR_QUIET_SECONDS, self.config.watch.settle_seconds),
                                     self.clock())
        self.last_rescan = models.utcnow()

    def look_into(self, folder: str) -> None:
        """A folder appeared: queue what it holds (files copied in before we watched it),
        each when it will have settled."""
        wall, now = self.clock(), self.monotonic()
        drop = self.config.watch.drop_dir
        rel = os.path.relpath(folder, drop)
        if rel.startswith(".."):
            return
        for path, st in detect.scan(drop, self.config.watch.ignore, under="" if rel == "." else rel):
            if self._mine(str(path)):
                self.schedule.put(str(path), now + settle.wait_seconds(st, wall, self.config.watch.settle_seconds))

    def _mine(self, path: str) -> bool:
        k, n = self.shard
        return n == 1 or zlib.crc32(os.fsencode(path)) % n == k

    def rescan_soon(self) -> None:
        """Rescan now, in the scheduler's thread (a folder moved in, an event queue overflow)."""
        if self._scheduler is not None and not self.stopping.is_set():
            try:
                self._scheduler.modify_job("rescan", next_run_time=datetime.datetime.now())
            except Exception:  # not started yet or already shut down
                pass

    def _start_observer(self) -> None:
        # Full events: a file renamed in from outside the drop folder is a move (done), not a
        # creation (maybe still being written), so it need not wait out settle_seconds.
        observer = (PollingObserver(timeout=1) if self.config.watch.poll
                    else Observer(generate_full_events=True))
        observer.schedule(detect.Handler(self.notify, self.look_into), str(self.config.watch.drop_dir),
                          recursive=True, event_filter=detect.events(self.config.watch.poll))
        observer.daemon = True
        try:
            observer.start()
        except OSError as exc:
            LOGGER.error("cannot watch %s (%s); relying on rescans", self.config.watch.drop_dir, exc)
            observer = None
        self._observer = observer
        _OverflowAlarm.add(self)

    def _restart_observer(self) -> None:
        if self._observer is not None:
            self._observer.stop()
            self._observer.join()
        self._start_observer()

    # -- consumers ---------------------------------------------------------------
    def _work(self) -> None:
        try:
            while not self.stopping.is_set():
                path = self.schedule.take(timeout=0.5)
                if path is None:
                    continue
                paths = [path, *self.schedule.take_due(BATCH - 1)]
                try:
                    self._look_at(paths)
                finally:
                    for path in paths:
                        self.schedule.release(path)
        finally:
            models.database.close()

    def _look_at(self, paths: list[str]) -> None:
        """Import the paths that are ready, together; put the others back for later."""
        w, drop = self.config.watch, self.config.watch.drop_dir
        wall, now = self.clock(), self.monotonic()
        ready = []  # (path, lstat, final)
        for path in paths:
            try:
                st = beneath.lstat(drop, os.path.relpath(path, drop))
            except (FileNotFoundError, beneath.Outside):
                self._forget(path)
                continue
            if stat.S_ISDIR(st.st_mode):  # a file replaced by a folder: look into it instead
                self._forget(path)
                self.look_into(path)
                continue
            if path in self.undisposed:
                self._dispose_again(path, st, now)
                continue
            observed = self.observed.unchanged_for(path, st)
            wait = settle.wait_seconds(st, wall, w.settle_seconds, self.done_at.get(path), observed)
            if wait > 0:
                self.schedule.put(path, now + wait)
                continue
            self.attempts[path] += 1
            ready.append((path, st, settle.is_final(observed, w.incomplete_seconds)))
        files = [(path, final, self.attempts[path]) for path, _, final in ready]
        unavailable = None
        for (path, st, _), outcome in zip(ready, ingest_together(files, self.config)):
            if isinstance(outcome, Unavailable):  # not the file's fault: it stays, untouched
                unavailable = outcome
                self.attempts[path] -= 1
                self.schedule.put(path, now)
            else:
                self._after(path, st, wall, now, outcome)
        if unavailable is not None:
            models.reset_connection()
            if self._pause == 1.0:
                LOGGER.error("cannot import now, files stay where they are: %s", unavailable)
            LOGGER.warning("waiting %.0f s before trying again", self._pause)
            self.schedule.pause(self._pause)
            self._pause = min(self._pause * 2, MAX_PAUSE)
        elif ready:
            self._pause = 1.0

    def _after(self, path: str, st: os.stat_result, wall: float, now: float, outcome) -> None:
        w = self.config.watch
        self.counts[outcome.outcome] += 1
        if self._more_to_scan and len(self.schedule) < MAX_QUEUED // 2:
            self._more_to_scan = False
            self.rescan_soon()
        if outcome.undisposed:
            self._cannot_dispose(path, st, now, outcome)
        elif outcome.again:  # another version has the name now: it takes its turn
            self._forget(path)
            self.schedule.put(path, now)
        elif outcome.outcome == "retry":
            self.schedule.put(path, now + self.attempts[path])
        elif outcome.outcome == "claimed":
            self.attempts[path] -= 1
            self.schedule.put(path, now + max(w.settle_seconds, CLAIMED_RETRY_SECONDS))
        elif outcome.outcome == "pending":
            self.done_at.pop(path, None)
            left = w.incomplete_seconds - self.observed.unchanged_for(path, st)
            self.schedule.put(path, now + max(left, w.settle_seconds))
        else:
            self._forget(path)

    def _cannot_dispose(self, path: str, st: os.stat_result, now: float, outcome) -> None:
        """Reported once, then tried again on a slow schedule; its outcome is recorded once."""
        if self.warned.get(path) != outcome.undisposed:
            LOGGER.warning("%s %r: %s; it stays in the drop folder, trying again every %.0f s",
                           outcome.outcome, outcome.source, outcome.undisposed, DISPOSE_RETRY_SECONDS)
            self.warned[path] = outcome.undisposed
        if outcome.outcome in ("imported", "duplicate", "dicomdir"):
            self.undisposed[path] = (_signature(st), outcome)
        self.attempts[path] = 0
        self.schedule.put(path, now + DISPOSE_RETRY_SECONDS)

    def _dispose_again(self, path: str, st: os.stat_result, now: float) -> None:
        signature, outcome = self.undisposed.pop(path)
        if _signature(st) != signature:  # another version: imported in its turn
            self.schedule.put(path, now)
            return
        outcome = dispose_recorded(path, self.config, outcome)
        if outcome.undisposed:
            self._cannot_dispose(path, st, now, outcome)
            return
        LOGGER.info("%s %r: removed from the drop folder now", outcome.outcome, outcome.source)
        self._forget(path)
        if outcome.again:
            self.schedule.put(path, now)

    def _forget(self, path: str) -> None:
        self.attempts.pop(path, None)
        self.done_at.pop(path, None)
        self.observed.forget(path)
        self.undisposed.pop(path, None)
        self.warned.pop(path, None)

    # -- liveness ----------------------------------------------------------------
    def heartbeat(self, state: str = "running") -> None:
        node = self.node
        values = dict(host=socket.gethostname(), pid=os.getpid(), started_at=self.started_at,
                      last_seen=models.utcnow(), last_rescan=self.last_rescan,
                      queue_depth=len(self.schedule), in_flight=self.schedule.busy_count(),
                      state=state)
        try:
            (models.Heartbeat.insert(node=node, **values)
             .on_conflict(conflict_target=[models.Heartbeat.node], update=values).execute())
        except Exception as exc:
            LOGGER.warning("heartbeat not recorded: %s", exc)
        finally:
            if threading.current_thread() is not threading.main_thread():
                models.database.close()


class _OverflowAlarm(logging.Handler):
    """watchdog logs a kernel event-queue overflow but tells no handler: listen for it and rescan."""

    services: set = set()

    def emit(self, record: logging.LogRecord) -> None:
        if "overflow" in record.getMessage().lower():
            for service in list(self.services):
                LOGGER.warning("kernel event queue overflowed: rescanning %s now",
                               service.config.watch.drop_dir)
                service.rescan_soon()

    @classmethod
    def add(cls, service) -> None:
        if not cls.services:
            for name in ("watchdog.observers.inotify_c", "watchdog.observers.inotify"):
                logging.getLogger(name).addHandler(_ALARM)
        cls.services.add(service)

    @classmethod
    def remove(cls, service) -> None:
        cls.services.discard(service)


_ALARM = _OverflowAlarm(level=logging.WARNING)


def _not_the_stop_race(record: logging.LogRecord) -> bool:
    """watchdog 7 logs an ERROR when its emitter sees events while being stopped: harmless."""
    return "called when the thread is inactive" not in record.getMessage()


logging.getLogger("watchdog.observers.inotify").addFilter(_not_the_stop_race)


def run(config: Config, stop: threading.Event) -> None:
    """Run until ``stop`` is set (the CLI sets it on SIGTERM or SIGINT).

    With more than one process (``import.processes``), this process only
    supervises: it forks one service per shard, restarts one that dies, and
    passes SIGTERM on. A child dies with its parent (PR_SET_PDEATHSIG), so a
    kill -9 of the service is a kill -9 of every part of it.
    """
    processes = config.import_.processes or os.cpu_count() or 1
    if processes == 1:
        with Service(config):
            stop.wait()
        return
    models.database.close()  # the children open their own connections
    children = {_fork(config, (k, processes), stop): k for k in range(processes)}
    restarts = collections.Counter()
    while not stop.wait(0.5):
        pid, status = os.waitpid(-1, os.WNOHANG)
        if pid in children:
            k = children.pop(pid)
            if stop.is_set():  # (systemd signals every process of the service at once)
                break
            restarts[k] += 1
            LOGGER.error("importer %d of %d (pid %d) ended with status %d; starting it again",
                         k + 1, processes, pid, status)
            stop.wait(min(2 ** restarts[k], MAX_PAUSE))
            if not stop.is_set():
                children[_fork(config, (k, processes), stop)] = k
    for pid in children:
        os.kill(pid, signal.SIGTERM)
    for pid in children:
        os.waitpid(pid, 0)


def _fork(config: Config, shard: tuple[int, int], stop: threading.Event) -> int:
    parent = os.getpid()
    pid = os.fork()
    if pid:
        return pid
    code = 1
    try:  # the child: ``stop`` is its own copy, set by the signal handlers it inherited
        ctypes.CDLL(None).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
        if os.getppid() == parent:  # (else the parent died before the prctl)
            models.connect(config.database.url, migrate=False)
            with Service(config, shard=shard):
                stop.wait()
        code = 0
    except BaseException:
        LOGGER.exception("importer %d of %d failed", shard[0] + 1, shard[1])
    finally:
        logging.shutdown()
        os._exit(code)


PR_SET_PDEATHSIG = 1


def _signature(st: os.stat_result) -> tuple:
    return (st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
