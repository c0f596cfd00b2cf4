"""Find the files in the drop folder: a full listing (what is there) and
watchdog events (when to look). The event handler only hands paths on.
"""

import errno
import fnmatch
import functools
import logging
import os
import re
import stat
import time
from pathlib import Path

from watchdog.events import (DirCreatedEvent, DirMovedEvent, FileClosedEvent, FileCreatedEvent,
                             FileModifiedEvent, FileMovedEvent, FileSystemEventHandler)

from . import beneath
from .dispose import PRIVATE

LOGGER = logging.getLogger(__name__)


@functools.lru_cache(maxsize=16)
def _matcher(patterns: tuple):
    return re.compile("|".join(fnmatch.translate(p) for p in patterns) or "(?!)").match


def is_ignored(name: str, patterns) -> bool:
    return _matcher(tuple(patterns))(name) is not None


def ignored_by(rel: str, patterns) -> str | None:
    """The ignore pattern that hides ``rel`` (a path relative to the drop folder: the file's
    name or one of its folders' names matches it), or None."""
    for part in rel.split("/"):
        if is_ignored(part, patterns):
            return next(p for p in patterns if is_ignored(part, (p,)))
    return None


def looks_like_dicom(head: bytes) -> bool:
    """The first bytes of a file: a Part 10 preamble and ``DICM``, or a bare dataset that starts
    with a group 0008 element (as validate.py accepts it)."""
    return head[128:132] == b"DICM" or head[:2] == b"\x08\x00"


def scan(drop_dir: Path, ignore=(), under: str = ""):
    """Yield (path, lstat) for every file below ``drop_dir`` (or its sub-folder ``under``),
    links and FIFOs included.

    Each folder is opened from its parent's descriptor without following links
    (watcher/beneath.py): a sub-folder swapped for a link is never listed. Ignored
    names (files or folders) and our own captures (``.dw~…``) are skipped.
    """
    drop_dir = Path(drop_dir)
    stack = [under]
    while stack:
        rel = stack.pop()
        found = []
        try:
            with beneath.folder(drop_dir, rel) as fd, os.scandir(fd) as entries:
                for entry in entries:
                    name = entry.name
                    if name.startswith(PRIVATE) or is_ignored(name, ignore):
                        continue
                    try:
                        found.append((name, entry.stat(follow_symlinks=False)))
                    except FileNotFoundError:
                        continue
        except (FileNotFoundError, NotADirectoryError, beneath.Outside):
            continue
        except PermissionError as exc:
            LOGGER.warning("cannot list %s: %s", drop_dir / rel, exc.strerror)
            continue
        for name, st in found:
            child = f"{rel}/{name}" if rel else name
            if stat.S_ISDIR(st.st_mode):
                stack.append(child)
            else:
                yield drop_dir / child, st


def events(poll: bool) -> list:
    """The events we act on. Asking inotify for these alone spares the observer the
    flood of modify events from every write() of a large copy, and the open,
    close-without-write and delete events of our own reads and removals. A
    poller has no close events: its (cheap) modify events say a file grew."""
    wanted = [FileCreatedEvent, FileClosedEvent, FileMovedEvent, DirCreatedEvent, DirMovedEvent]
    return wanted + [FileModifiedEvent] if poll else wanted


class Handler(FileSystemEventHandler):
    """Hands every event's path to ``notify(path, done)``; ``done`` when the
    writer closed the file or it was renamed into place. A folder created or
    moved in is handed to ``look_into(folder)``."""

    def __init__(self, notify, look_into):
        self.notify = notify
        self.look_into = look_into

    def on_any_event(self, event):
        kind = event.event_type
        if kind in ("opened", "closed_no_write", "deleted") or kind == "moved" and not event.dest_path:
            return  # (a move with no destination: moved out of the drop folder)
        if event.is_directory:
            if kind in ("created", "moved"):  # its files may come with no event of their own
                self.look_into(os.fsdecode(event.dest_path if kind == "moved" else event.src_path))
            return
        path = event.dest_path if kind == "moved" else event.src_path
        self.notify(os.fsdecode(path), kind in ("closed", "moved"))


def _pair_moves_by_cookie() -> bool:
    """Make watchdog's pairing of IN_MOVED_FROM with IN_MOVED_TO cheap and stall-free.

    watchdog 7 holds each moved-from event for 0.5 s, waiting for its moved-to
    half, and (1) scans its whole queue of pending events, twice, for every file
    renamed into the tree: with thousands of files renamed in at once that is
    half a millisecond of CPU per file; (2) its reader sleeps out the 0.5 s
    when a moved-from event is at the head of the queue, even if the moved-to
    half arrives a microsecond later, so a rename inside the drop folder could
    wait half a second; and a file moved *out* (to the rejected folder, say)
    holds up every event behind it for that long.

    Here the pending moved-from events are also kept in a dict by cookie (the
    queue is scanned only when a pair really exists), the reader waits on the
    queue's condition instead of sleeping (a pair that arrives wakes it), and
    an unpaired moved-from is held 50 ms, not 500: the two halves of one rename
    come from one read of the inotify file descriptor. Events and their order are
    otherwise unchanged. Applied only when watchdog has the shape this was
    written against; otherwise watchdog runs as it is.
    """
    try:
        from watchdog.observers import inotify_move_event_grouper as grouper
        from watchdog.utils.delayed_queue import DelayedQueue
    except ImportError:  # not Linux
        return False
    cls = grouper.InotifyMoveEventGrouper
    needed = ("put_event", "read_event", "get_queued_moved_from_event", "discard_pending_events")
    queue_parts = ("_queue", "_not_empty", "_closed", "delay", "put", "remove", "clear")
    probe = DelayedQueue(0.1)
    if (not all(hasattr(cls, name) for name in needed) or not hasattr(grouper, "PathedInotifyEvent")
            or not all(hasattr(probe, name) for name in queue_parts)):
        return False

    def pending(self) -> dict:
        if "_pending_from" not in self.__dict__:
            self._pending_from = {}
        return self._pending_from

    def put_event(self, event) -> None:
        ev = event.ev
        if ev.is_moved_from:
            pending(self)[ev.cookie] = event
            self._queue.put(event, delay=True)
            return
        if ev.is_moved_to:
            source = pending(self).pop(ev.cookie, None)
            if source is not None and self._queue.remove(lambda e: e is source) is not None:
                event = (source, event)
        self._queue.put(event, delay=False)

    def read_event(self):
        queue = self._queue
        with queue._not_empty:
            while True:
                if queue._closed:
                    return None
                if not queue._queue:
                    queue._not_empty.wait()
                    continue
                event, inserted, delayed = queue._queue[0]
                left = inserted + queue.delay - time.monotonic() if delayed else 0
                if left > 0:
                    queue._not_empty.wait(left)  # a put (its pair, say) wakes us early
                    continue
                queue._queue.popleft()
                break
        if isinstance(event, grouper.PathedInotifyEvent) and event.ev.is_moved_from:
            pending(self).pop(event.ev.cookie, None)  # unpaired: moved out of the tree
        return event

    def get_queued_moved_from_event(self, cookie):
        return pending(self).get(cookie)

    def discard_pending_events(self) -> None:
        pending(self).clear()
        self._queue.clear()

    cls.delay = UNPAIRED_MOVE_SECONDS
    cls.put_event, cls.read_event = put_event, read_event
    cls.get_queued_moved_from_event = get_queued_moved_from_event
    cls.discard_pending_events = discard_pending_events
    return True


UNPAIRED_MOVE_SECONDS = 0.05
MOVES_PAIRED_BY_COOKIE = _pair_moves_by_cookie()


def _read_in_batches_without_own_captures() -> bool:
    """Spare the observer our own renames, and read inotify in batches.

    Taking a file whole (watcher/dispose.py ``capture``) renames it to a private
    ``.dw~`` name in its folder: two inotify events per imported file that the
    handler would only discard. Carried through watchdog's three threads, in each
    importer, they cost more CPU than the rest of the file's import outside the
    fsync (measured: 2.4 CPU-ms per file against 1.8 without the rename).

    Here a rename *to* a private name is dropped as soon as it is read, with its
    moved-from half when both came in one read (a half that did not is discarded
    downstream, as before). Renames *from* a private name (a file given back its
    name) pass, so the file is looked at again. And after a read that returned
    events the reader waits BATCH_SECONDS before the next, so that a busy folder's
    events arrive in batches rather than one wake-up each; an idle reader still
    wakes at once for the first event. Applied only when watchdog has the shape
    this was written against.
    """
    try:
        from watchdog.observers.inotify_c import InotifyConstants, InotifyFD
    except ImportError:  # not Linux
        return False
    original = getattr(InotifyFD, "read_events", None)
    if original is None or getattr(original, "_skips_own_captures", False):
        return False
    moved_to, moved = InotifyConstants.IN_MOVED_TO, InotifyConstants.IN_MOVE
    is_dir, private = InotifyConstants.IN_ISDIR, os.fsencode(PRIVATE)

    @functools.wraps(original)
    def read_events(self, *args, **kwargs):
        if self.__dict__.get("_was_busy"):
            time.sleep(BATCH_SECONDS)  # let the next events gather
        events = original(self, *args, **kwargs)
        self._was_busy = bool(events)
        ours = {e.cookie for e in events
                if e.mask & moved_to and not e.mask & is_dir and e.name.startswith(private)}
        if ours:
            events = [e for e in events if not (e.mask & moved and e.cookie in ours)]
        return events

    read_events._skips_own_captures = True
    InotifyFD.read_events = read_events
    return True


BATCH_SECONDS = 0.01
SKIPS_OWN_CAPTURES = _read_in_batches_without_own_captures()


WATCH_FAILURES: set = set()  # callables (folder: bytes, exc: OSError) told of a watch the kernel refused


def _report_refused_watches() -> bool:
    """Tell WATCH_FAILURES when the kernel refuses a watch for lack of watches or instances.

    watchdog 7 swallows the OSError of every sub-folder's watch it cannot add
    (only the root's reaches the caller), so a drop folder past
    ``fs.inotify.max_user_watches`` silently loses the events of its newer
    folders. The error still passes through ``InotifyFD.add_callback``: note it
    there and let watchdog go on as it does. Applied only when watchdog has the
    shape this was written against.
    """
    try:
        from watchdog.observers.inotify_c import InotifyFD
    except ImportError:  # not Linux
        return False
    original = getattr(InotifyFD, "add_callback", None)
    if original is None or getattr(original, "_reports_refusals", False):
        return False

    @functools.wraps(original)
    def add_callback(self, path, *args, **kwargs):
        try:
            return original(self, path, *args, **kwargs)
        except OSError as exc:
            if exc.errno in (errno.ENOSPC, errno.EMFILE, errno.ENOMEM):
                for tell in list(WATCH_FAILURES):
                    tell(path, exc)
            raise

    add_callback._reports_refusals = True
    InotifyFD.add_callback = add_callback
    return True


REPORTS_REFUSED_WATCHES = _report_refused_watches()
