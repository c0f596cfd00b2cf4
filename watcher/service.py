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
import dataclasses
import datetime
import errno
import json
import logging
import os
import signal
import socket
import stat
import threading
import time
import zlib
from pathlib import Path

from apscheduler.schedulers.background import BackgroundScheduler
from watchdog.observers import Observer
from watchdog.observers.polling import PollingObserver

from . import archive, beneath, claims, detect, dispose, logs, models, ports, settle, systemd, timings
from .config import Config
from .discs import warn_incomplete
from .errors import Unavailable
from .names import to_text
from .outcome import is_unavailable
from .pipeline import dispose_recorded, ingest_together
from .studies.routine import Routine
from .schedule import Schedule
from .troubles import Troubles

LOGGER = logging.getLogger(__name__)
HEARTBEAT_SECONDS = 5.0
DIR_QUIET_SECONDS = 60.0  # an emptied sub-folder may be about to receive a copy's next file
MAX_PAUSE = 30.0
MAX_QUEUED = 10_000  # paths queued at once; a larger backlog is rescanned in slices
CLAIMED_RETRY_SECONDS = 5.0  # another node holds the file: look again (it is gone by then, usually)
BATCH = 64  # files a worker takes at once, when that many are due: one commit for all
DISPOSE_RETRY_SECONDS = 60.0  # a file that cannot be removed or moved: look again this often
WAITING_ROWS = 10_000  # held-back files a node shows in the database at most
WATCH_RETRY_SECONDS = 5.0  # watches missing (the kernel's limit): try to set them up this often
ROUTINE_SECONDS = 5.0  # late arrivals follow their study, stable studies meet the rules
STALLED_SECONDS = 30.0
IGNORED_CHECK_SECONDS = 3600.0  # how often ignored files are looked at for DICOM content
IGNORED_WARN_SECONDS = 86400.0  # an ignored file that looks like DICOM, in the folder this long: WARNING  # a batch that has not committed after this long is reported as stalled


class Service:
    def __init__(self, config: Config, clock=time.time, shard: tuple[int, int] = (0, 1),
                 monotonic=time.monotonic, listeners: "Listeners | None" = None):
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
        self._routine = Routine(config)
        self._receiver = None  # the DICOM network receiver, with a [dicom] section (each shard)
        self._listeners = listeners or Listeners()  # sockets opened by run() before the fork
        self._web = None  # the web app, with an [http] section (shard 0)
        self.schedule = Schedule(monotonic)
        self.observed = settle.Observed(monotonic)
        self.done_at: dict = {}  # path -> when (wall) a writer closed it or it was renamed in
        self.undisposed: dict = {}  # path -> (signature, Outcome): recorded, not yet removed
        self.warned: dict = {}  # path -> the disposal error already logged for it
        self.waiting: dict = {}  # path -> (state, detail, since, next attempt): held back, and why
        self._waiting_changed = False
        self.attempts = collections.Counter()
        self.counts = collections.Counter()
        self.stopping = threading.Event()
        self._pause_lock = threading.Lock()
        self.started_at = models.utcnow()
        self.last_rescan = None
        self._drop_identity = None
        self._observer = None
        self._scheduler = None
        self._workers = []
        self._pause = 1.0
        self._backed_off_at = None  # (monotonic) when the pause last began, during an outage
        self.troubles = Troubles(self.heartbeat_soon)  # what pauses this node, since when (status shows it)
        self._busy_since: dict = {}  # worker thread -> when (monotonic) its current batch began
        self._drop_fd = None  # the watched drop folder, held open: a replaced one has no links
        self._ignored_warned: set = set()
        self._more_to_scan = False

    # -- life cycle --------------------------------------------------------------
    def start(self) -> "Service":
        logs.name_process(self.node)
        self.config.archive.dir.mkdir(parents=True, exist_ok=True)  # (status --check looks at it)
        claims.release_stale(self.config.import_.node)
        archive.remove_stale_temporaries(self.config.archive.dir)
        folder = self.config.watches
        if self.shard[0] == 0 and folder:
            for rel in dispose.recover(self.config.watch.drop_dir):
                LOGGER.warning("put back %s (its removal was cut short by a crash)", rel)
        if folder:
            self.rescan()
            self._start_observer()
        self._scheduler = BackgroundScheduler(daemon=True)
        self._scheduler.add_job(self.heartbeat, "interval", seconds=HEARTBEAT_SECONDS,
                                id="heartbeat", max_instances=1, coalesce=True)
        if folder:
            self._scheduler.add_job(self.rescan, "interval", seconds=max(self.config.watch.rescan_seconds, 0.1),
                                    id="rescan", max_instances=1, coalesce=True)
            self._scheduler.add_job(warn_incomplete, "interval", args=(self.config, self.config.import_.node),
                                    seconds=max(min(self.config.watch.rescan_seconds, 30.0), 0.1),
                                    id="discs", max_instances=1, coalesce=True)  # copies stopped half-way
            self._scheduler.add_job(self.rewatch, "interval", seconds=WATCH_RETRY_SECONDS,
                                    id="rewatch", max_instances=1, coalesce=True)
        if self.shard[0] == 0 and folder:
            self._scheduler.add_job(self.check_ignored, "interval", seconds=IGNORED_CHECK_SECONDS,
                                    id="ignored", max_instances=1, coalesce=True,
                                    next_run_time=datetime.datetime.now())
        if self.shard[0] == 0:
            self._scheduler.add_job(self.distribute, "interval", seconds=ROUTINE_SECONDS,
                                    id="distribute", max_instances=1, coalesce=True)
            if self.config.replication:  # [[replication]]: pulls from other archives
                from . import replication_config
                self._scheduler.add_job(replication_config.run_due, "interval", seconds=60,
                                        args=(self.config, self.stopping), id="replication",
                                        max_instances=1, coalesce=True,
                                        next_run_time=datetime.datetime.now())
        self._scheduler.start()
        if self.config.dicom is not None:
            from .receive import Receiver
            self._receiver = Receiver(self.config, self.node, self._listeners.dicom).start()
        if self.shard[0] == 0 and self.config.http is not None:
            from .web.server import WebServer
            self._web = WebServer(self.config, self._listeners.http).start()
        for n in range(self.config.import_.workers if folder else 0):
            worker = threading.Thread(target=self._work, name=f"watcher-worker-{n}", daemon=True)
            worker.start()
            self._workers.append(worker)
        self.heartbeat()
        if folder:
            LOGGER.info("watching %s (%s, %d workers)", self.config.watch.drop_dir,
                        "polling" if self.config.watch.poll else "events", len(self._workers))
        else:
            LOGGER.info("no drop folder ([watch]): %s only", ", ".join(
                what for what, on in (("the DICOM receiver", self.config.dicom), ("the web app", self.config.http),
                                      ("replication", self.config.replication)) if on))
        return self

    def stop(self) -> None:
        """Finish the files in hand, then stop observer, scheduler and workers."""
        self.stopping.set()
        if self._web is not None:
            self._web.stop()
        if self._receiver is not None:
            self._receiver.stop()
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
        detect.WATCH_FAILURES.discard(self._watch_failure)
        if self._drop_fd is not None:
            os.close(self._drop_fd)
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
            self.troubles.began("drop-folder", f"the drop folder {drop} is gone ({exc.strerror}); "
                                "waiting for it")
            self._drop_identity = None
            return
        identity = (st.st_dev, st.st_ino)
        if self._drop_fd is not None and os.fstat(self._drop_fd).st_nlink == 0:
            identity = None  # the folder we watch was deleted: one of the same inode number is another
        if self._drop_identity is not None and identity != self._drop_identity:
            LOGGER.warning("the drop folder %s was replaced or remounted; watching it again", drop)
            self._restart_observer()
        elif self._drop_identity is None and self.troubles.ended("drop-folder"):
            self._restart_observer()
        if identity != self._drop_identity or self._drop_fd is None:
            self._hold_drop_folder()
            identity = (st.st_dev, st.st_ino)
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

    def distribute(self) -> None:
        """Late arrivals follow their study; stable studies go where the rules say."""
        try:
            self._routine.run()
        except Exception as exc:
            if is_unavailable(exc):
                return  # the importers report the outage; look again next time
            LOGGER.exception("distributing studies failed; trying again in %.0f s", ROUTINE_SECONDS)

    def check_ignored(self) -> None:
        """Warn once about each file that matches ``ignore`` yet looks like DICOM and has been in
        the drop folder (ctime: it cannot be faked) for more than a day: likely a mistake."""
        drop, patterns = self.config.watch.drop_dir, self.config.watch.ignore
        wall = self.clock()
        for path, st in detect.scan(drop):
            rel = os.path.relpath(path, drop)
            pattern = detect.ignored_by(rel, patterns)
            if (pattern is None or rel in self._ignored_warned or not stat.S_ISREG(st.st_mode)
                    or wall - st.st_ctime < IGNORED_WARN_SECONDS):
                continue
            try:
                with beneath.parent(drop, rel) as (fd, name):
                    file_fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK, dir_fd=fd)
                    try:
                        head = os.pread(file_fd, 132, 0)
                    finally:
                        os.close(file_fd)
            except (OSError, beneath.Outside):
                continue
            if detect.looks_like_dicom(head):
                self._ignored_warned.add(rel)
                LOGGER.warning("ignored for %.0f days, though it looks like DICOM: %r matches the ignore "
                               "pattern %r; rename it to import it", (wall - st.st_ctime) / 86400,
                               to_text(rel), pattern)

    def _hold_drop_folder(self) -> None:
        if self._drop_fd is not None:
            os.close(self._drop_fd)
            self._drop_fd = None
        try:
            self._drop_fd = os.open(self.config.watch.drop_dir, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except OSError:
            pass

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

    def heartbeat_soon(self) -> None:
        """Report now, in the scheduler's thread (a trouble began or ended)."""
        self._run_soon("heartbeat")

    def rescan_soon(self) -> None:
        """Rescan now, in the scheduler's thread (a folder moved in, an event queue overflow)."""
        self._run_soon("rescan")

    def _run_soon(self, job: str) -> None:
        if self._scheduler is not None and not self.stopping.is_set():
            try:
                self._scheduler.modify_job(job, next_run_time=datetime.datetime.now())
            except Exception:  # not started yet or already shut down
                pass

    def _start_observer(self) -> None:
        # Full events: a file renamed in from outside the drop folder is a move (done), not a
        # creation (maybe still being written), so it need not wait out settle_seconds.
        handler = detect.Handler(self.notify, self.look_into)
        self._watch_failed = None
        detect.WATCH_FAILURES.add(self._watch_failure)
        observer = None
        try:  # the kernel's limits (inotify instances, watches) fail one step or another,
            # as watchdog's version has it: making the observer, scheduling, starting
            observer = (PollingObserver(timeout=1) if self.config.watch.poll
                        else Observer(generate_full_events=True))
            observer.daemon = True
            observer.schedule(handler, str(self.config.watch.drop_dir),
                              recursive=True, event_filter=detect.events(self.config.watch.poll))
            observer.start()
        except OSError as exc:
            self._watch_failed = (str(self.config.watch.drop_dir), exc)
            if observer is not None:
                observer.stop()  # and any inotify reader thread it started
            observer = None
        self._observer = observer
        _OverflowAlarm.add(self)
        if self._watch_failed is None:
            self.troubles.ended("watches")
        else:
            self._watches_lost(*self._watch_failed)

    def _watches_lost(self, folder: str, exc: OSError) -> None:
        """The kernel gave no watch for ``folder`` (from watchdog's thread, or at start): files
        there are found by the rescans only, until the watches can be set up again."""
        self._watch_failed = (folder, exc)
        limit = ""
        if exc.errno == errno.ENOSPC:
            limit = f" (fs.inotify.max_user_watches = {_sysctl('fs/inotify/max_user_watches')})"
        elif exc.errno == errno.EMFILE:
            limit = f" (fs.inotify.max_user_instances = {_sysctl('fs/inotify/max_user_instances')})"
        self.troubles.began("watches", f"cannot watch {to_text(folder)}: {exc.strerror or exc}{limit}; "
                            f"its files are found by the rescan every {self.config.watch.rescan_seconds:g} s "
                            "until the watches can be set up again")

    def _watch_failure(self, path: bytes, exc: OSError) -> None:
        folder = os.fsdecode(path)
        drop = str(self.config.watch.drop_dir)
        if folder == drop or folder.startswith(drop + os.sep):
            self._watches_lost(folder, exc)

    def rewatch(self) -> None:
        """Every WATCH_RETRY_SECONDS: a drop folder gone, back or replaced is rescanned (and watched
        again) now, not at the next rescan; missing watches are set up again if they can be."""
        if self.stopping.is_set():
            return
        if self._drop_folder_changed():
            self.rescan_soon()
        elif "watches" in self.troubles and self._drop_identity is not None:
            self._restart_observer()

    def _drop_folder_changed(self) -> bool:
        """Cheap: the folder we hold open was deleted, or its name now leads elsewhere (or nowhere)."""
        try:
            st = os.stat(self.config.watch.drop_dir)
        except OSError:
            return self._drop_identity is not None
        if self._drop_identity is None or (st.st_dev, st.st_ino) != self._drop_identity:
            return True
        return self._drop_fd is not None and os.fstat(self._drop_fd).st_nlink == 0

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
        me = threading.get_ident()
        self._busy_since[me] = now
        try:
            for (path, st, _), outcome in zip(ready, ingest_together(files, self.config)):
                if isinstance(outcome, Unavailable):  # not the file's fault: it stays, untouched
                    unavailable = outcome
                    self.attempts[path] -= 1
                    self.schedule.put(path, now)
                else:
                    self._after(path, st, wall, now, outcome)
        finally:
            self._busy_since.pop(me, None)
        if unavailable is not None:
            self._paused(unavailable, now)
        elif ready and (self._backed_off_at is None or now > self._backed_off_at) \
                and self.troubles.ended("unavailable"):  # (a batch begun before the pause proves nothing)
            self._pause, self._backed_off_at = 1.0, None

    def _paused(self, unavailable, now: float) -> None:
        """One WARNING when an outage starts; the pause doubles at most once per pause, whatever
        the number of workers that meet it."""
        models.reset_connection()
        self.troubles.began("unavailable", f"cannot import now, files stay where they are: {unavailable}")
        now = self.monotonic()  # (when the pause began: batches begun before it end nothing)
        with self._pause_lock:
            if self._backed_off_at is not None:
                if now - self._backed_off_at < self._pause:
                    return  # another worker met it in this pause already
                self._pause = min(self._pause * 2, MAX_PAUSE)
            self._backed_off_at = now
        LOGGER.debug("still paused (%s); next try in %.0f s", unavailable, self._pause)
        self.schedule.pause(self._pause)

    def _after(self, path: str, st: os.stat_result, wall: float, now: float, outcome) -> None:
        w = self.config.watch
        self.counts[outcome.outcome] += 1
        if self._more_to_scan and len(self.schedule) < MAX_QUEUED // 2:
            self._more_to_scan = False
            self.rescan_soon()
        self._note_waiting(path, outcome, now)
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

    def _note_waiting(self, path: str, outcome, now: float) -> None:
        """What ``pending`` shows for this file (written to the database with the heartbeat)."""
        w = self.config.watch
        if outcome.undisposed:
            state, after = "cannot-dispose", DISPOSE_RETRY_SECONDS
        elif outcome.outcome == "retry":
            state, after = "retrying", self.attempts[path]
        elif outcome.outcome == "claimed":
            state, after = "claimed", max(w.settle_seconds, CLAIMED_RETRY_SECONDS)
        elif outcome.outcome == "pending":
            state, after = outcome.waiting or "incomplete", w.rescan_seconds
        else:
            if self.waiting.pop(path, None) is not None:
                self._waiting_changed = True
            return
        detail = outcome.undisposed or outcome.detail
        previous = self.waiting.get(path)
        since = previous[2] if previous and previous[0] == state else models.utcnow()
        if state in ("incomplete", "open-for-writing", "changing") and (not previous or previous[0] != state):
            LOGGER.info("pending %r: %s: %s%s", outcome.source, state, detail,
                        f" (rejected if unchanged for {w.incomplete_seconds:g} s)" if state == "incomplete" else "")
        self.waiting[path] = (state, detail, since,
                              models.utcnow() + datetime.timedelta(seconds=after))
        self._waiting_changed = True

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
        if self.waiting.pop(path, None) is not None:
            self._waiting_changed = True

    # -- liveness ----------------------------------------------------------------
    def _check_stalled(self) -> None:
        """A batch whose commit has waited STALLED_SECONDS (a database lock held for minutes,
        a disk that does not answer) is a trouble a person should see."""
        busy = list(self._busy_since.values())
        oldest = self.monotonic() - min(busy) if busy else 0.0
        if oldest >= STALLED_SECONDS:
            self.troubles.began("stalled", f"an import has waited {oldest:.0f} s to be stored and "
                                "committed (is the database locked, or the archive disk stuck?)")
        elif "stalled" in self.troubles:
            self.troubles.ended("stalled")

    def heartbeat(self, state: str = "running") -> None:
        self._check_stalled()
        outage, outage_since = self.troubles.summary()
        node = self.node
        values = dict(host=socket.gethostname(), pid=os.getpid(), started_at=self.started_at,
                      last_seen=models.utcnow(), last_rescan=self.last_rescan,
                      queue_depth=len(self.schedule), in_flight=self.schedule.busy_count(),
                      state=state, outage=outage, outage_since=outage_since,
                      durations=json.dumps(timings.IMPORTS.snapshot()),
                      associations=self._receiver.active() if self._receiver is not None else 0)
        try:
            (models.Heartbeat.insert(node=node, **values)
             .on_conflict(conflict_target=[models.Heartbeat.node], update=values).execute())
            if self._waiting_changed or state != "running":
                self._record_waiting(node, state == "running")
        except Exception as exc:
            LOGGER.warning("heartbeat not recorded: %s", exc)
        finally:
            if threading.current_thread() is not threading.main_thread():
                models.database.close()


    def _record_waiting(self, node: str, running: bool) -> None:
        """This node's held-back files, as ``pending`` shows them (at most WAITING_ROWS)."""
        self._waiting_changed = False
        drop = self.config.watch.drop_dir
        rows = [dict(node=node, path=to_text(os.path.relpath(path, drop)), state=state, detail=detail,
                     since=since, next_attempt=next_attempt)
                for path, (state, detail, since, next_attempt) in list(self.waiting.items())[:WAITING_ROWS]]
        with models.write_transaction():
            models.Waiting.delete().where(models.Waiting.node == node).execute()
            if running and rows:
                models.Waiting.insert_many(rows).execute()


def _sysctl(name: str) -> str:
    try:
        return Path("/proc/sys", name).read_text().strip()
    except OSError:
        return "?"


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

    Under systemd (Type=notify) this process tells it READY=1 once the service
    (every child) has started, STOPPING=1 on the way out, and, with WatchdogSec=,
    WATCHDOG=1 every half interval while every child shows life: a child that
    hangs or dies stops the pings, and systemd restarts the whole service unless
    the child is back (restarted) in time.
    """
    processes = config.import_.processes or os.cpu_count() or 1
    watchdog = systemd.watchdog_seconds()
    claims.await_dead_holders(config.import_.node)
    if processes == 1:
        with Service(config):
            systemd.notify("READY=1")
            while not stop.wait(watchdog / 2 if watchdog else None):
                systemd.notify("WATCHDOG=1")
            systemd.notify("STOPPING=1")
        return
    models.disconnect()  # the children open their own connections
    listener = Listeners.open(config)
    life, life_w = os.pipe()  # each child writes its shard number here every LIFE_SECONDS
    os.set_blocking(life, False)
    children = {_fork(config, (k, processes), stop, life_w, listener): k for k in range(processes)}
    pulse = _Pulse(processes, watchdog)
    restarts = collections.Counter()
    while not stop.wait(0.5):
        pulse.beat(_lives(life))
        pid, status = os.waitpid(-1, os.WNOHANG)
        if pid in children:
            k = children.pop(pid)
            if stop.is_set():  # (systemd signals every process of the service at once)
                break
            pulse.ended(k, _lives(life))
            restarts[k] += 1
            LOGGER.error("importer %d of %d (pid %d) ended with status %d; starting it again",
                         k + 1, processes, pid, status)
            stop.wait(min(2 ** restarts[k], MAX_PAUSE))
            if not stop.is_set():
                children[_fork(config, (k, processes), stop, life_w, listener)] = k
    systemd.notify("STOPPING=1")
    for pid in children:
        os.kill(pid, signal.SIGTERM)
    for pid in children:
        os.waitpid(pid, 0)
    os.close(life)
    os.close(life_w)
    listener.close()


LIFE_SECONDS = 1.0  # an importer child shows life this often
STALE_SECONDS = 3.0  # ... and is taken for hung after this long without (or half the watchdog, if longer)


class _Pulse:
    """The supervisor's view of its children: READY=1 once all have shown life, then
    WATCHDOG=1 every half watchdog interval while all still do."""

    def __init__(self, processes: int, watchdog: float | None, monotonic=time.monotonic):
        self.processes, self.watchdog, self.monotonic = processes, watchdog, monotonic
        self.stale = max(STALE_SECONDS, watchdog / 2 if watchdog else 0)
        self.seen: dict = {}  # shard -> when (monotonic) its importer last showed life
        self.ready = False
        self.silent: set = set()  # shards already warned about
        self.next_ping = 0.0

    def beat(self, shards: set) -> None:
        now = self.monotonic()
        self.seen.update((k, now) for k in shards)
        silent = {k for k in range(self.processes)
                  if k not in self.seen or now - self.seen[k] > self.stale}
        for k in sorted(silent - self.silent):
            if k in self.seen:
                LOGGER.warning("importer %d of %d has shown no life for %.0f s: hung or stopped; "
                               "no watchdog pings until it does", k + 1, self.processes, self.stale)
        self.silent = silent
        if silent:
            return
        if not self.ready:
            self.ready = True
            systemd.notify("READY=1")
        if self.watchdog and now >= self.next_ping:
            systemd.notify("WATCHDOG=1")
            self.next_ping = now + self.watchdog / 2

    def ended(self, k: int, shards: set) -> None:
        """Importer ``k`` ended; ``shards``: what the pipe still held, some of it from the dead one."""
        self.seen.update((s, self.monotonic()) for s in shards)
        self.seen.pop(k, None)
        self.silent.add(k)


def _lives(fd: int) -> set:
    """The shards whose importers wrote to the life pipe since the last look."""
    shards = set()
    while True:
        try:
            data = os.read(fd, 4096)
        except BlockingIOError:
            return shards
        if not data:
            return shards
        shards.update(data)


def _show_life(fd: int, k: int, stop: threading.Event) -> None:
    """In an importer child: write ``k`` to the supervisor every LIFE_SECONDS until ``stop``."""
    while True:
        try:
            os.write(fd, bytes([k]))
        except OSError:
            return
        if stop.wait(LIFE_SECONDS):
            return


@dataclasses.dataclass
class Listeners:
    """The service's listening sockets, opened by the supervisor before it forks: a port that
    is taken stops ``run`` at once, with a message naming its key, instead of an importer
    that fails and is restarted again and again. Every importer accepts DICOM associations
    on ``dicom``; importer 0 serves the web app on ``http``."""

    dicom: "socket.socket | None" = None
    http: "socket.socket | None" = None

    @classmethod
    def open(cls, config: Config) -> "Listeners":
        opened = cls()
        try:
            if config.dicom is not None:
                opened.dicom = ports.listen("dicom", config.dicom.bind, config.dicom.port)
            if config.http is not None:
                opened.http = ports.listen("http", config.http.bind, config.http.port)
        except BaseException:
            opened.close()
            raise
        return opened

    def close(self) -> None:
        for sock in (self.dicom, self.http):
            if sock is not None:
                sock.close()


def _fork(config: Config, shard: tuple[int, int], stop: threading.Event, life: int,
          listeners: "Listeners | None" = None) -> int:
    parent = os.getpid()
    pid = os.fork()
    if pid:
        return pid
    code = 1
    try:  # the child: ``stop`` is its own copy, set by the signal handlers it inherited
        ctypes.CDLL(None).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
        if os.getppid() == parent:  # (else the parent died before the prctl)
            models.connect(config.database.url, migrate=False)
            with Service(config, shard=shard, listeners=listeners):
                threading.Thread(target=_show_life, args=(life, shard[0], stop),
                                 name="watcher-life", daemon=True).start()
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
