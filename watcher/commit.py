"""Group commit: many workers' rows in one transaction, so one fsync serves many files.

A worker hands its instance record to ``GroupCommit.run`` and waits. The
committer thread takes every record handed in meanwhile, makes the stored
originals' folders durable (fsync), writes them all in one transaction,
commits once and wakes the workers, each with its own outcome or rejection. Nothing is acknowledged before its commit:
per-file durability is kept, only the fsyncs are shared.

``commit_now`` is the same without the thread, for one file at a time.
"""

import logging
import queue
import threading

from . import archive, catalog, models

LOGGER = logging.getLogger(__name__)
MAX_BATCH = 256


def commit_now(record):
    """Commit one instance record now; its outcome, or raise its rejection."""
    return _outcome(_commit([record])[0])


def _commit(records: list) -> list:
    """fsync the originals' folders, then write all records in one transaction."""
    for folder in {r.stored.folder for r in records}:
        archive.fsync_dir(folder)
    with catalog.ids.batch(), models.write_transaction():
        return catalog.record_instances(records)


def _outcome(result):
    if isinstance(result, Exception):
        raise result
    return result


class _Item:
    __slots__ = ("record", "result", "done")

    def __init__(self, record):
        self.record = record
        self.result = None
        self.done = threading.Event()


class GroupCommit:
    def __init__(self):
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._loop, name="watcher-commit", daemon=True)
        self.batches = 0
        self.items = 0

    def start(self) -> "GroupCommit":
        self._thread.start()
        return self

    def stop(self) -> None:
        self._queue.put(None)
        self._thread.join()

    def run(self, record):
        """Commit ``record`` with the next group; its outcome once committed, or raise."""
        item = _Item(record)
        self._queue.put(item)
        item.done.wait()
        return _outcome(item.result)

    __call__ = run

    def _loop(self) -> None:
        try:
            while True:
                first = self._queue.get()
                if first is None:
                    return
                batch = [first]
                while len(batch) < MAX_BATCH:
                    try:
                        item = self._queue.get_nowait()
                    except queue.Empty:
                        break
                    if item is None:
                        self._queue.put(None)  # stop after this batch
                        break
                    batch.append(item)
                self._commit(batch)
        finally:
            models.database.close()

    def _commit(self, batch) -> None:
        try:
            results = _commit([item.record for item in batch])
        except Exception as exc:  # nothing of this batch is committed
            LOGGER.debug("group commit of %d failed: %s", len(batch), exc)
            models.reset_connection()
            results = [exc] * len(batch)
        for item, result in zip(batch, results):
            item.result = result
        self.batches += 1
        self.items += len(batch)
        for item in batch:
            item.done.set()
