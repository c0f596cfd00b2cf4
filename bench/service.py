"""The real service, ``dicom-watcher run``, measured from outside: batch, stream, memory.

- batch: the service waits on an empty drop folder; the whole corpus is renamed in at once
  (copies staged on the same disk, so the drop costs no copying) and the clock runs until
  every file is accounted for in the database.
- stream: a writer renames files in at a steady rate; latency is ``instance.imported_at``
  minus the moment of the rename.
- memory: peak RSS with a 2 GiB file, with a backlog waiting before start-up, and with one
  file whose Pixel Data declares 0xFFFFFFFE bytes.

Every run gets a fresh database (SQLite file, or PostgreSQL ``bench_<pid>``) and empty folders.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import multiprocessing
import os
import re
import shutil
import struct
import time
from pathlib import Path

from .backends import Backend, Sqlite, available_backends
from .corpus import PIXEL_DATA_OW_HEADER, small_instances
from .process import ServiceRun, load_1m
from .results import Measurement, make_row

LOGGER = logging.getLogger(__name__)

POLL_SECONDS = 0.1
HOSTILE_LENGTH = 0xFFFFFFFE
TWO_GIB = 2 << 30


@dataclasses.dataclass(frozen=True)
class Variant:
    """Service code to measure: this checkout (no command), or a baseline revision run from
    its own copy of ``watcher/`` (``--baseline REV``), so before and after share one run."""

    label: str = ""  # appended to the row's ``what``
    command: tuple[str, ...] | None = None
    code: str | None = None  # what ``watcher_code`` the rows record


THIS_CHECKOUT = Variant()


@dataclasses.dataclass(frozen=True)
class Settings:
    backends: tuple[str, ...] = ("sqlite", "postgres")
    stream_rate: float = 200.0  # files per second
    stream_seconds: float = 30.0
    backlog_files: int = 100_000
    backlog_seconds: float = 150.0  # then stop it, backlog or not: the peak comes early
    stall_seconds: float = 20.0  # no new outcome for this long (plus 1 s per 50 MB of the largest
    # file): stop waiting and report what is missing
    log_dir: Path | None = None  # keep each run's service log here
    workers: int | None = None  # import.workers in the service's config; None: its own default
    variants: tuple[Variant, ...] = ()  # the code measured in batches; () = this checkout only
    extras: bool = True  # the stream, backlog and memory rows (once per benchmark, not per round)


QUICK = Settings(stream_rate=100.0, stream_seconds=5.0, backlog_files=2_000, backlog_seconds=60.0,
                 stall_seconds=10.0)
FULL = Settings()


# -- helpers ---------------------------------------------------------------------------------

def service_run(workdir: Path, backend: Backend, settings: Settings, name: str, **options) -> ServiceRun:
    """A fresh run; its log is kept as ``log_dir/<name>-<backend>.log`` when log_dir is set."""
    slug = re.sub(r"[^A-Za-z0-9]+", "-", f"{name}-{backend.name}").strip("-").lower()
    keep = settings.log_dir / f"{slug}.log" if settings.log_dir else None
    return ServiceRun(workdir, backend, keep_log=keep, workers=settings.workers, **options)


def stage(paths: list[Path], staging: Path) -> list[Path]:
    """Copy the corpus into ``staging`` (same disk) and sync it; relative paths.

    Copies, not hard links: a dropped file with a second name elsewhere cannot be
    taken into the archive as it is (watcher/archive.py), so links would measure the
    copying path only. The sync leaves the copies on disk like the corpus the limits read.
    """
    root = Path(os.path.commonpath([p.parent for p in paths]))
    made, relative = set(), []
    for path in paths:
        rel = path.relative_to(root)
        target = staging / rel
        if target.parent not in made:
            target.parent.mkdir(parents=True, exist_ok=True)
            made.add(target.parent)
        shutil.copyfile(path, target)
        relative.append(rel)
    os.sync()
    return relative


def drop_all(relative: list[Path], staging: Path, drop: Path) -> None:
    """Rename every staged file into the drop folder, making its sub-folders first."""
    made = set()
    for rel in relative:
        target = drop / rel
        if target.parent not in made:
            target.parent.mkdir(parents=True, exist_ok=True)
            made.add(target.parent)
        os.rename(staging / rel, target)


def wait_accounted(run: ServiceRun, expected: int, stall_seconds: float,
                   limit_seconds: float | None = None) -> int:
    """Poll until ``expected`` files are accounted for, the count stalls for ``stall_seconds``,
    ``limit_seconds`` have passed, or the service dies. Returns the count."""
    last, last_change = -1, time.monotonic()
    deadline = None if limit_seconds is None else last_change + limit_seconds
    while True:
        count = run.backend.accounted()
        now = time.monotonic()
        if count >= expected:
            return count
        if deadline is not None and now > deadline:
            LOGGER.info("%d of %d files accounted for after %.0f s; not waiting longer", count,
                        expected, limit_seconds)
            return count
        if count != last:
            last, last_change = count, now
        elif now - last_change > stall_seconds:
            LOGGER.warning("%d of %d files accounted for; nothing new for %.0f s", count, expected,
                           stall_seconds)
            return count
        if run.proc.poll() is not None:
            LOGGER.error("the service exited with %s; log:\n%s", run.proc.returncode, run.log_tail())
            return count
        run.stats()  # samples the process tree's memory
        time.sleep(POLL_SECONDS)


def span(backend: Backend, started: float) -> dict:
    """Seconds from ``started`` to the first and to the last outcome in the database."""
    first, last = backend.outcome_span()
    return {"first_outcome_s": None if first is None else round(first - started, 3),
            "seconds": float("nan") if last is None else last - started}


def add_note(row: dict, note: str) -> None:
    row["notes"] = [*row.get("notes", []), note]


def percentile(sorted_values: list[float], q: float) -> float | None:
    """Nearest-rank percentile of an ascending list (q in 0..100)."""
    if not sorted_values:
        return None
    rank = max(1, -(-len(sorted_values) * q // 100))
    return sorted_values[int(rank) - 1]


def finish(run: ServiceRun, row: dict, before, load_start: float, files: int) -> dict:
    """Read the service's counters, stop it, and add everything to ``row``."""
    after = run.stats()
    load_end = load_1m()
    left = run.files_in_drop()
    outcomes, reasons = run.backend.outcomes(), run.backend.rejection_reasons()
    temporaries = run.archive_temporaries()
    restarted = run.server_restarted()
    stopped = run.stop()
    cpu = after.cpu_seconds - before.cpu_seconds
    tree_cpu = after.tree_cpu_seconds - before.tree_cpu_seconds
    row.update({
        "backend": run.backend.name, "workers": run.workers, "watcher_code": run.code,
        "load_1m": [load_start, load_end],
        "idle_rss_mb": before.rss_mb, "peak_rss_mb": after.peak_rss_mb,
        "cpu_seconds": round(cpu, 2), "cpu_seconds_total": round(after.cpu_seconds, 2),
        "cpu_s_per_1000": round(cpu * 1000 / files, 2) if files else None,
        "cpu_s_per_gb": round(cpu * 1e9 / row["bytes"], 2) if row["bytes"] else None,
        "tree_processes": run.max_processes, "tree_peak_pss_mb": run.peak_tree_pss_mb,
        "tree_cpu_s_per_1000": round(tree_cpu * 1000 / files, 2) if files else None,
        "outcomes": outcomes, "rejection_reasons": reasons,
        "left_in_drop": len(left), "left_sample": left[:5], "archive_temporaries": temporaries,
        "exit_code": stopped.exit_code, "stop_seconds": stopped.stop_seconds, "killed": stopped.killed,
        "log_problems": stopped.log_problems, "log_warnings": stopped.log_warnings,
        "log_sample": stopped.log_sample,
    })
    if run.max_processes > 1:
        add_note(row, f"the service ran {run.max_processes} processes: see tree_* in the JSON")
    if restarted:
        LOGGER.warning("the %s server restarted during this run", run.backend.name)
        add_note(row, f"the {run.backend.name} server restarted during the run (not by the benchmark)")
    if stopped.log_problems:
        LOGGER.warning("service log has %d ERROR/Traceback lines, e.g. %s", stopped.log_problems,
                       stopped.log_sample[:2])
    return row


# -- the measurements ------------------------------------------------------------------------

def batch(corpus: str, paths: list[Path], workdir: Path, backend: Backend, settings: Settings,
          what: str = "service batch", command: list[str] | None = None,
          variant: Variant = THIS_CHECKOUT) -> dict:
    """Rename the whole corpus into the drop folder of a running service; time until all is in."""
    sizes = [p.stat().st_size for p in paths]
    size = sum(sizes)
    stall = settings.stall_seconds + max(sizes) / 50e6
    what += variant.label
    command = command or (list(variant.command) if variant.command else None)
    with service_run(workdir, backend, settings, f"{corpus} {what}", command=command,
                     code=variant.code) as run:
        relative = stage(paths, run.staging)
        run.start()
        before, load_start = run.stats(), load_1m()
        started = time.time()
        drop_all(relative, run.staging, run.drop)
        drop_seconds = time.time() - started
        count = wait_accounted(run, len(paths), stall)
        times = span(backend, started)
        row = make_row(corpus, f"{what} ({backend.name})", files=len(paths), bytes_=size,
                       seconds=times["seconds"], cache="warm")
        row.update({"accounted": count, "unaccounted": len(paths) - count,
                    "drop_seconds": round(drop_seconds, 3), "first_outcome_s": times["first_outcome_s"]})
        finish(run, row, before, load_start, len(paths))
    LOGGER.info("%s", row)
    return row


def _write_stream(drop: str, payloads: list[bytes], rate: float, out: str) -> None:
    """The writer process: each file to ``.name.tmp``, then renamed in, one every 1/rate s."""
    renamed, lag = {}, 0.0
    start = time.perf_counter()
    for index, data in enumerate(payloads):
        delay = start + index / rate - time.perf_counter()
        if delay > 0:
            time.sleep(delay)
        else:
            lag = max(lag, -delay)
        name = f"s{index:06d}.dcm"
        tmp = os.path.join(drop, f".{name}.tmp")
        with open(tmp, "wb") as f:
            f.write(data)
        os.rename(tmp, os.path.join(drop, name))
        renamed[name] = time.time()
    with open(out, "w") as f:
        json.dump({"renamed": renamed, "max_lag": lag, "seconds": time.perf_counter() - start}, f)


def stream(workdir: Path, backend: Backend, settings: Settings) -> dict:
    """Steady writes at ``stream_rate`` for ``stream_seconds``; latency percentiles of imported_at."""
    count = int(settings.stream_rate * settings.stream_seconds)
    payloads = [data for _, data in small_instances(count, seed=7)]
    with service_run(workdir, backend, settings, "stream") as run:
        run.start()
        before, load_start = run.stats(), load_1m()
        out = run.workdir / "writer.json"
        writer = multiprocessing.get_context("fork").Process(
            target=_write_stream, args=(str(run.drop), payloads, settings.stream_rate, str(out)))
        writer.start()
        writer.join()
        if writer.exitcode != 0:
            raise RuntimeError(f"the stream writer failed with exit code {writer.exitcode}")
        written = json.loads(out.read_text())
        accounted = wait_accounted(run, count, min(settings.stall_seconds, 20))
        imported = backend.imported_at()
        in_order = [(imported[name] - at) * 1000 for name, at in sorted(written["renamed"].items())
                    if name in imported]
        latencies = sorted(in_order)
        tenth = max(1, len(in_order) // 10)  # does it keep up? compare the first and last tenth
        row = make_row("stream", f"service stream ({backend.name})", files=count,
                       bytes_=sum(map(len, payloads)), seconds=written["seconds"], cache="warm")
        row.update({
            "rate_asked": settings.stream_rate, "writer_max_lag_ms": round(written["max_lag"] * 1000, 1),
            "latency_ms": {f"p{q}": round(percentile(latencies, q), 1) if latencies else None
                           for q in (50, 95, 99)},
            "never_arrived": count - len(latencies), "accounted": accounted,
            "p50_first_tenth_ms": round(percentile(sorted(in_order[:tenth]), 50), 1) if in_order else None,
            "p50_last_tenth_ms": round(percentile(sorted(in_order[-tenth:]), 50), 1) if in_order else None,
            "drain_seconds": round(max(imported.values()) - max(written["renamed"].values()), 3)
            if imported else None,
        })
        row["latency_ms"]["max"] = round(latencies[-1], 1) if latencies else None
        row["latency_ms"]["min"] = round(latencies[0], 1) if latencies else None
        first, last = row["p50_first_tenth_ms"], row["p50_last_tenth_ms"]
        if latencies and last > max(100.0, 2 * first):
            add_note(row, f"falls behind: p50 {first:,.0f} ms in the first tenth, {last:,.0f} ms in the last")
        finish(run, row, before, load_start, count)
    LOGGER.info("%s", row)
    return row


def backlog(workdir: Path, backend: Backend, settings: Settings) -> dict:
    """``backlog_files`` tiny files wait in the drop folder before the service starts."""
    count = settings.backlog_files
    with service_run(workdir, backend, settings, "backlog") as run:
        size, made = 0, set()
        for rel, data in small_instances(count, seed=11, rows=8, columns=8):
            target = run.drop / rel
            if target.parent not in made:
                target.parent.mkdir(parents=True, exist_ok=True)
                made.add(target.parent)
            target.write_bytes(data)
            size += len(data)
        time.sleep(2.5)  # older than settle_seconds: due at the first scan, as after a restart
        load_start = load_1m()
        started = time.time()
        heartbeat_seconds = run.start()
        at_heartbeat = run.stats()
        accounted = wait_accounted(run, count, settings.stall_seconds,
                                   settings.backlog_seconds - heartbeat_seconds)
        times = span(backend, started)
        row = make_row("backlog", f"memory: backlog of {count:,} files ({backend.name})", files=accounted,
                       bytes_=size * accounted // count, seconds=times["seconds"], cache="warm")
        row.update({"first_outcome_s": times["first_outcome_s"], "backlog_files": count, "accounted": accounted, "unaccounted": count - accounted,
                    "start_seconds": round(heartbeat_seconds, 2),
                    "rss_at_heartbeat_mb": at_heartbeat.rss_mb})
        if accounted < count:
            add_note(row, f"stopped after {settings.backlog_seconds:.0f} s with {count - accounted:,} "
                          f"files still queued (by design); RSS after the start-up scan "
                          f"{at_heartbeat.rss_mb} MB")
        from_start = dataclasses.replace(at_heartbeat, cpu_seconds=0.0, tree_cpu_seconds=0.0)  # the start-up scan counts too
        finish(run, row, from_start, load_start, accounted)
    LOGGER.info("%s", row)
    return row


def hostile_file() -> bytes:
    """A small CT instance whose Pixel Data length says 0xFFFFFFFE bytes (it holds 24,200)."""
    _, data = next(small_instances(1, seed=13))
    at = data.rfind(PIXEL_DATA_OW_HEADER)
    if at < 0:
        raise RuntimeError("no OW Pixel Data element in the small template")
    length_at = at + len(PIXEL_DATA_OW_HEADER)
    return data[:length_at] + struct.pack("<I", HOSTILE_LENGTH) + data[length_at + 4:]


def hostile(workdir: Path, backend: Backend, settings: Settings) -> dict:
    """One hostile file; it is rejected (truncated) after incomplete_seconds = 60, the lowest allowed."""
    data = hostile_file()
    with service_run(workdir, backend, settings, "hostile", incomplete_seconds=60) as run:
        (run.staging / "hostile.dcm").write_bytes(data)
        run.start()
        before, load_start = run.stats(), load_1m()
        started = time.time()
        os.rename(run.staging / "hostile.dcm", run.drop / "hostile.dcm")
        accounted = wait_accounted(run, 1, 90)
        row = make_row("hostile", f"memory: Pixel Data length 0xFFFFFFFE ({backend.name})", files=1,
                       bytes_=len(data), seconds=span(backend, started)["seconds"], moves_bytes=False)
        row.update({"accounted": accounted, "unaccounted": 1 - accounted})
        finish(run, row, before, load_start, 1)
    LOGGER.info("%s", row)
    return row


def skipped_row(corpus: str, what: str, backend: str, reason: str) -> dict:
    row = make_row(corpus, f"{what} ({backend})", files=0, bytes_=0, seconds=0)
    row.update({"backend": backend, "skipped": reason})
    return row


def measurement(settings: Settings) -> Measurement:
    """The service measurement for ``python -m bench``: batches on every corpus and backend;
    the stream and memory checks ride along with the ``small`` and ``large`` corpora."""
    backends, skipped = available_backends(settings.backends)
    for name, reason in skipped.items():
        LOGGER.warning("skipping %s: %s", name, reason)

    def measure_service(corpus: str, paths: list[Path], scratch: Path) -> list[dict]:
        rows = []
        workdir = scratch / "service"
        for backend in backends:
            for variant in settings.variants or (THIS_CHECKOUT,):
                rows.append(batch(corpus, paths, workdir, backend, settings, variant=variant))
        rows += [skipped_row(corpus, "service batch", name, why) for name, why in skipped.items()]
        if not settings.extras:
            return rows
        if corpus == "small":
            for backend in backends:
                rows.append(stream(workdir, backend, settings))
            rows += [skipped_row("stream", "service stream", name, why) for name, why in skipped.items()]
            rows.append(backlog(workdir, Sqlite(), settings))
            rows.append(hostile(workdir, Sqlite(), settings))
        if corpus == "large":
            huge = [p for p in paths if p.stat().st_size >= TWO_GIB - (1 << 20)]
            if huge:
                rows.append(batch("2 GiB", huge[:1], workdir, Sqlite(), settings, what="memory: one file"))
        return rows

    return measure_service
