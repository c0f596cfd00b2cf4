"""Find the files in the drop folder: a full listing (what is there) and
watchdog events (when to look). The event handler only hands paths on.
"""

import fnmatch
import functools
import logging
import os
import re
from pathlib import Path

from watchdog.events import (DirCreatedEvent, DirMovedEvent, FileClosedEvent, FileCreatedEvent,
                             FileModifiedEvent, FileMovedEvent, FileSystemEventHandler)

LOGGER = logging.getLogger(__name__)


@functools.lru_cache(maxsize=16)
def _matcher(patterns: tuple):
    return re.compile("|".join(fnmatch.translate(p) for p in patterns) or "(?!)").match


def is_ignored(name: str, patterns) -> bool:
    return _matcher(tuple(patterns))(name) is not None


def scan(drop_dir: Path, ignore=()):
    """Yield (path, lstat) for every file below ``drop_dir``, links and FIFOs included.

    Folders are entered but never through a link; ignored names (files or
    folders) are skipped.
    """
    stack = [str(drop_dir)]
    while stack:
        folder = stack.pop()
        try:
            entries = list(os.scandir(folder))
        except (FileNotFoundError, NotADirectoryError):
            continue
        except PermissionError as exc:
            LOGGER.warning("cannot list %s: %s", folder, exc.strerror)
            continue
        for entry in entries:
            if is_ignored(entry.name, ignore):
                continue
            try:
                if entry.is_dir(follow_symlinks=False):
                    stack.append(entry.path)
                else:
                    yield Path(entry.path), entry.stat(follow_symlinks=False)
            except FileNotFoundError:
                continue


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
