"""A study's originals as one zip, made while it is sent: memory stays flat whatever the size.

zipfile writes into a sink that the generator empties after every chunk; entries are stored
(ZIP_STORED: DICOM is compressed or not as it came, and the bytes are the originals), sizes
and CRCs follow each entry (a data descriptor), ZIP64 where an entry needs it. Each original is
checked as it is read: one that no longer matches its checksum (xxh3; sha256 for rows from
before it) ends the download there, so the client gets a broken zip, never a wrong file in a
whole one. WADO-RS hands out the same checked bytes (``read_original``).
"""

import asyncio
import hashlib
import logging
import os
import threading
import zipfile
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from .. import archive

LOGGER = logging.getLogger(__name__)
CHUNK = 1 << 20
AHEAD = 64 * CHUNK  # asked of the disk at a time, before it is needed
HASHING = 4  # chunks sent before they are hashed, at most
READ_AHEAD = 2  # chunks read (and checked) before they are sent, at most (4: no faster)


class _Sink:
    """A write-only, unseekable file for zipfile: what it was given since the last ``take``."""

    def __init__(self):
        self._chunks: list[bytes] = []

    def write(self, data) -> int:
        self._chunks.append(bytes(data))
        return len(data)

    def flush(self) -> None:
        pass

    def take(self) -> bytes:
        out = b"".join(self._chunks)
        self._chunks.clear()
        return out


class DamagedOriginal(Exception):
    """An original is missing or its bytes no longer match its checksum: the download ends."""


def read_original(archive_dir: Path, stored: str, sha256: str, xxh3: str | None = None,
                  size: int | None = None):
    """An original's bytes, a chunk at a time, checked as they are read: ``DamagedOriginal``
    (after the last chunk, or at once when it cannot be read, or is not ``size`` bytes long)
    if they no longer match.

    Checked against ``xxh3`` (archive.quick_digest: costs the sending almost nothing), or for
    rows from before it (NULL), against the sha256."""
    digest, expected = (archive.quick_digest(), xxh3) if xxh3 else (hashlib.sha256(), sha256)
    try:
        src = open(archive_dir / stored, "rb")
    except OSError as exc:
        LOGGER.error("download stopped: the original %s cannot be read (%s); run verify",
                     stored, exc.strerror)
        raise DamagedOriginal(stored) from None
    with src:
        found = os.fstat(src.fileno()).st_size
        if size is not None and found != size:
            LOGGER.error("download stopped: the original %s holds %d bytes, not its %d; run verify",
                         stored, found, size)
            raise DamagedOriginal(stored)
        yield from _hashing(_read_ahead(src), digest, in_thread=not xxh3 and found > CHUNK)
    if digest.hexdigest() != expected:
        LOGGER.error("download stopped: the original %s no longer matches its checksum; "
                     "run verify", stored)
        raise DamagedOriginal(stored)


def _read_ahead(src):
    """``src``'s chunks; the kernel is asked to read up to AHEAD bytes on while each one is
    hashed and sent."""
    asked = 0
    while chunk := src.read(CHUNK):
        if src.tell() + AHEAD > asked:
            os.posix_fadvise(src.fileno(), asked, AHEAD, os.POSIX_FADV_WILLNEED)
            asked += AHEAD
        yield chunk


def _hashing(chunks, digest, in_thread: bool):
    """``chunks``, each fed to ``digest`` on the way. ``in_thread``: by a thread of its own, up
    to HASHING chunks behind the sending (hashlib lets go of the GIL while it hashes), so that
    sending and a sha256 use a core each (sha256 alone runs at about this disk's read speed).
    Every chunk is hashed before the generator ends."""
    if not in_thread:
        for chunk in chunks:
            digest.update(chunk)
            yield chunk
        return
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="download-hash") as hasher:
        behind = deque()
        for chunk in chunks:
            behind.append(hasher.submit(digest.update, chunk))
            if len(behind) > HASHING:
                behind.popleft().result()
            yield chunk
        for update in behind:
            update.result()


async def sent_ahead(chunks, depth: int = READ_AHEAD):
    """``chunks``, a body that reads files (a blocking iterator), run by a thread of its own up
    to ``depth`` chunks ahead of the sending: reading and checking the next chunk overlaps
    sending this one, and no chunk waits its turn in the server's thread pool. What ``chunks``
    raises is raised here, in order; when the sending ends early (the client went away), the
    thread stops at its next chunk and closes ``chunks`` (and so its files)."""
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue = asyncio.Queue()
    room = threading.Semaphore(depth)
    stopped = threading.Event()

    def hand_over(item) -> None:
        try:
            loop.call_soon_threadsafe(queue.put_nowait, item)
        except RuntimeError:  # the event loop is gone (the server stopped)
            stopped.set()

    def read() -> None:
        try:
            for chunk in chunks:
                room.acquire()
                if stopped.is_set():
                    return
                hand_over((chunk, None))
            hand_over((None, None))
        except BaseException as exc:
            hand_over((None, exc))
        finally:
            close = getattr(chunks, "close", None)
            if close is not None:
                close()

    threading.Thread(target=read, name="download-read", daemon=True).start()
    try:
        while True:
            chunk, error = await queue.get()
            if error is not None:
                raise error
            if chunk is None:
                return
            yield chunk
            room.release()
    finally:
        stopped.set()
        room.release()  # (a reader waiting for room sees it has stopped)


def zip_stream(archive_dir: Path, files):
    """Yield the zip of ``files``: (name in the zip, path relative to ``archive_dir``, sha256,
    size, xxh3), as browse.originals gives them."""
    sink = _Sink()
    with zipfile.ZipFile(sink, "w", zipfile.ZIP_STORED, allowZip64=True) as zf:
        for name, stored, sha256, size, xxh3 in files:
            info = zipfile.ZipInfo(name)
            info.compress_type = zipfile.ZIP_STORED
            info.file_size = size
            info.external_attr = 0o644 << 16
            with zf.open(info, "w", force_zip64=size >= zipfile.ZIP64_LIMIT) as dst:
                for chunk in read_original(archive_dir, stored, sha256, xxh3):
                    dst.write(chunk)
                    yield sink.take()
            yield sink.take()
    yield sink.take()


__all__ = ["DamagedOriginal", "read_original", "sent_ahead", "zip_stream"]
