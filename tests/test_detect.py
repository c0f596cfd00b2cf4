"""Events from a real watchdog observer, with watcher.detect's cookie index for move pairs."""

import os
import threading
import time

from watchdog.events import FileSystemEventHandler
from watchdog.observers import Observer

from conftest import wait_for
from watcher import detect


class Recorder(FileSystemEventHandler):
    def __init__(self):
        self.moves = []
        self.lock = threading.Lock()

    def on_moved(self, event):
        with self.lock:
            self.moves.append((os.fsdecode(event.src_path), os.fsdecode(event.dest_path)))


def test_moves_are_paired_inside_and_unpaired_from_outside(tmp_path):
    assert detect.MOVES_PAIRED_BY_COOKIE  # the watchdog this project pins has the expected grouper
    drop, outside = tmp_path / "drop", tmp_path / "outside"
    drop.mkdir(), outside.mkdir()
    recorder = Recorder()
    observer = Observer(generate_full_events=True)
    observer.schedule(recorder, str(drop), recursive=True, event_filter=detect.events(False))
    observer.start()
    try:
        count = 2000  # many renames in at once: the queue is long, each must still be delivered once
        for i in range(count):
            (outside / f"{i}.dcm").write_bytes(b"x")
        (drop / "a.part").write_bytes(b"x")
        for i in range(count):
            os.rename(outside / f"{i}.dcm", drop / f"{i}.dcm")
        os.rename(drop / "a.part", drop / "a.dcm")
        assert wait_for(lambda: len(recorder.moves) >= count + 1)
    finally:
        observer.stop()
        observer.join()
    moves = dict((dest, src) for src, dest in recorder.moves)
    assert len(recorder.moves) == count + 1
    assert moves[str(drop / "a.dcm")] == str(drop / "a.part")  # paired: a rename inside the folder
    assert all(not moves[str(drop / f"{i}.dcm")] for i in range(count))  # from outside: no source


class Everything(FileSystemEventHandler):
    def __init__(self):
        self.events = []
        self.lock = threading.Lock()

    def on_any_event(self, event):
        with self.lock:
            self.events.append((event.event_type, os.fsdecode(event.src_path),
                                os.fsdecode(getattr(event, "dest_path", "") or "")))


def test_own_captures_reach_no_handler_and_given_back_files_do(tmp_path):
    """A capture (a rename to a private .dw~ name) is dropped as it is read; a file given
    back its name (a rename from a private name) is an event like any rename in."""
    assert detect.SKIPS_OWN_CAPTURES  # the watchdog this project pins has the expected reader
    drop = tmp_path / "drop"
    drop.mkdir()
    for i in range(200):
        (drop / f"{i}.dcm").write_bytes(b"x")
    recorder = Everything()
    observer = Observer(generate_full_events=True)
    observer.schedule(recorder, str(drop), recursive=True, event_filter=detect.events(False))
    observer.start()
    try:
        for i in range(200):  # as dispose.capture does
            os.rename(drop / f"{i}.dcm", drop / f"{detect.PRIVATE}{i:08x}~{i}.dcm")
        os.rename(drop / f"{detect.PRIVATE}{7:08x}~7.dcm", drop / "7.dcm")  # put back
        (drop / "late.dcm").write_bytes(b"y")  # an ordinary event after them all
        assert wait_for(lambda: any(e[1].endswith("late.dcm") for e in recorder.events))
        time.sleep(2 * detect.UNPAIRED_MOVE_SECONDS)  # any unpaired half would be out by now
    finally:
        observer.stop()
        observer.join()
    private = [e for e in recorder.events if detect.PRIVATE in e[2] or
               e[0] == "moved" and not e[2] and not e[1].endswith("7.dcm")]
    assert private == []  # 200 captures: no event reached the handler
    assert ("moved", str(drop / f"{detect.PRIVATE}{7:08x}~7.dcm"), str(drop / "7.dcm")) in recorder.events
