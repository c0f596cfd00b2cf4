"""Events from a real watchdog observer, with watcher.detect's cookie index for move pairs."""

import os
import threading

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
