"""Physical limits on a corpus: how fast can any importer copy+hash+fsync, or parse headers?

Each measurement runs on 1 and on 2 processes (the file list split by size), first "cold"
(sync + drop the page cache, when the kernel lets us: root on a real or virtual machine) and
then "warm" (right after, every file just read). Files dropped by a scanner or a copy are
usually still in the page cache, so "warm" is the likelier case for the service.
"""

from __future__ import annotations

import hashlib
import itertools
import logging
import multiprocessing
import os
import queue
import shutil
import time
import traceback
import warnings
from pathlib import Path

import pydicom

from .results import make_row

LOGGER = logging.getLogger(__name__)

BUFFER_SIZE = 1 << 20
PROCESS_COUNTS = (1, 2)


def drop_page_cache() -> bool:
    """sync, then ask the kernel to drop clean caches; False if it refuses (not root, container)."""
    os.sync()
    try:
        with open("/proc/sys/vm/drop_caches", "w") as control:
            control.write("3\n")
    except OSError as exc:
        LOGGER.debug("cannot drop page cache: %s", exc)
        return False
    return True


def split_by_size(paths: list[Path], parts: int) -> list[list[Path]]:
    """Greedy split into ``parts`` lists of similar total size (largest files first)."""
    bins: list[list[Path]] = [[] for _ in range(parts)]
    totals = [0] * parts
    for path in sorted(paths, key=lambda p: p.stat().st_size, reverse=True):
        lightest = totals.index(min(totals))
        bins[lightest].append(path)
        totals[lightest] += path.stat().st_size
    return bins


def copy_hash_fsync(source: Path, dest_dir: Path, name: str, buffer: memoryview) -> tuple[int, str]:
    """Read once, sha256 while reading, write a temp file, fsync it, rename. (size, hex digest)"""
    digest, size = hashlib.sha256(), 0
    partial, final = dest_dir / f".{name}.partial", dest_dir / name
    with source.open("rb", buffering=0) as src, partial.open("wb") as out:
        while count := src.readinto(buffer):
            chunk = buffer[:count]
            digest.update(chunk)
            out.write(chunk)
            size += count
        out.flush()
        os.fsync(out.fileno())
    os.replace(partial, final)
    return size, digest.hexdigest()


def _copy_files(paths: list[Path], dest_dir: Path, prefix: str) -> tuple[int, int]:
    buffer = memoryview(bytearray(BUFFER_SIZE))
    total = 0
    for index, path in enumerate(paths):
        size, _ = copy_hash_fsync(path, dest_dir, f"{prefix}{index:07d}.dcm", buffer)
        total += size
    return len(paths), total


def _parse_headers(paths: list[Path], dest_dir: Path, prefix: str) -> tuple[int, int]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # some real files warn (e.g. implicit VR found)
        for path in paths:
            pydicom.dcmread(path, stop_before_pixels=True)
    return len(paths), 0


WORK = {"copy_hash_fsync": (_copy_files, True), "header_parse": (_parse_headers, False)}


def _child(work, paths, dest_dir, prefix, barrier, results) -> None:
    barrier.wait()
    try:
        results.put(("ok", work(paths, dest_dir, prefix)))
    except BaseException:
        results.put(("error", traceback.format_exc()))


def run_in_processes(work, chunks: list[list[Path]], dest_dir: Path) -> tuple[float, int, int]:
    """Run ``work`` on each chunk in its own process, all released at once.

    Returns (wall seconds from release to the last result, files, bytes).
    """
    context = multiprocessing.get_context("fork")
    barrier, results = context.Barrier(len(chunks) + 1), context.Queue()
    children = [context.Process(target=_child, args=(work, chunk, dest_dir, f"p{i}_", barrier, results))
                for i, chunk in enumerate(chunks)]
    for child in children:
        child.start()
    barrier.wait()
    started = time.perf_counter()
    outcomes = []
    while len(outcomes) < len(children):
        try:
            outcomes.append(results.get(timeout=1))
        except queue.Empty:
            if not any(child.is_alive() for child in children) and results.empty():
                raise RuntimeError("a benchmark process died without a result") from None
    seconds = time.perf_counter() - started
    for child in children:
        child.join()
    errors = [detail for status, detail in outcomes if status == "error"]
    if errors:
        raise RuntimeError("benchmark process failed:\n" + errors[0])
    return seconds, sum(o[1][0] for o in outcomes), sum(o[1][1] for o in outcomes)


def measure_limits(corpus: str, paths: list[Path], scratch: Path) -> list[dict]:
    """header_parse and copy_hash_fsync on 1 and 2 processes; copies go to scratch/limits-copy."""
    rows = []
    dest_dir = scratch / "limits-copy"
    corpus_bytes = sum(path.stat().st_size for path in paths)
    for what, (work, moves_bytes) in WORK.items():
        for procs, wanted in itertools.product(PROCESS_COUNTS, ("cold", "warm")):
            chunks = split_by_size(paths, procs)  # before the cache drop: it stats every file
            shutil.rmtree(dest_dir, ignore_errors=True)
            dest_dir.mkdir(parents=True)
            # "warm" directly follows "cold", which has just read every file of the corpus.
            cache = "cold" if wanted == "cold" and drop_page_cache() else "warm"
            seconds, files, copied = run_in_processes(work, chunks, dest_dir)
            if moves_bytes and copied != corpus_bytes:
                raise RuntimeError(f"{what} moved {copied} bytes of {corpus_bytes}")
            row = make_row(corpus, what, files=files, bytes_=corpus_bytes, seconds=seconds,
                           procs=procs, cache=cache, moves_bytes=moves_bytes)
            LOGGER.info("%s", row)
            rows.append(row)
    shutil.rmtree(dest_dir, ignore_errors=True)
    return rows
