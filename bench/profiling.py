"""``python -m bench --profile``: the small batch with the service under a profiler.

With py-spy (``pip install py-spy``) the service is sampled from outside, every thread, idle
time included (``--idle``), so a worker's wall time shows where it waits (fsync, the SQLite
write lock, the GIL) as well as where it computes. Without py-spy, ``bench.threadprofile``
runs it under cProfile in every thread. Either way: the top functions by own and by
cumulative time.
"""

from __future__ import annotations

import collections
import io
import logging
import pstats
import re
import shutil
import sys
from pathlib import Path

from .backends import Sqlite
from .process import service_command
from .service import Settings, batch

LOGGER = logging.getLogger(__name__)
WORKER_THREAD = "watcher-worker"
SAMPLE_RATE = 100


def pyspy_path() -> str | None:
    beside = Path(sys.executable).with_name("py-spy")
    return str(beside) if beside.exists() else shutil.which("py-spy")


def _thread_name(frame: str) -> str:
    """'thread (1234): watcher-worker-0' -> 'watcher-worker-N' (numbers folded)."""
    name = frame.split(":", 1)[1].strip() if ":" in frame else frame
    return re.sub(r"\d+", "N", name) or "?"


def summarize_pyspy(raw: Path, top: int = 25) -> str:
    """Tables from py-spy's collapsed stacks (``--threads --format raw``)."""
    per_thread, own, cumulative = collections.Counter(), collections.Counter(), collections.Counter()
    others = collections.defaultdict(collections.Counter)  # thread -> own frames
    worker_samples = 0
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        frames, samples = stack.split(";"), int(count)
        while frames and frames[0].startswith("process "):  # (--subprocesses) all importers together
            frames = frames[1:]
        if not frames:
            continue
        thread = _thread_name(frames[0]) if frames[0].startswith("thread") else "?"
        per_thread[thread] += samples
        body = frames[1:] if frames[0].startswith("thread") else frames
        if not thread.startswith(WORKER_THREAD):
            others[thread][body[-1] if body else "?"] += samples
            continue
        worker_samples += samples
        if body:
            own[body[-1]] += samples
        for frame in set(body):
            cumulative[frame] += samples
    total = sum(per_thread.values())
    out = [f"py-spy, {SAMPLE_RATE} samples/s per thread, idle included; {total:,} samples in all.",
           "", "Samples per thread (wall time; idle threads count too):", ""]
    for name, samples in per_thread.most_common():
        out.append(f"  {samples:>8,}  {100 * samples / total:5.1f} %  {name}")
        for frame, count in others.get(name, collections.Counter()).most_common(4):
            out.append(f"  {'':>8}  {100 * count / samples:5.1f} %    own: {frame}")
    for title, counter in (("own", own), ("cumulative", cumulative)):
        out += ["", f"Worker threads, top {top} by {title} time (% of the workers' wall time):", ""]
        for frame, samples in counter.most_common(top):
            out.append(f"  {100 * samples / max(worker_samples, 1):5.1f} %  {frame}")
    return "\n".join(out)


def summarize_cprofile(path: Path, top: int = 25) -> str:
    out = ["cProfile in every thread (bench.threadprofile); times are CPU-ish wall time per call,",
           "summed over threads, so waits in one thread and work in another both count.", ""]
    for key in ("tottime", "cumulative"):
        buffer = io.StringIO()
        stats = pstats.Stats(str(path), stream=buffer)
        stats.sort_stats(key).print_stats(top)
        text = buffer.getvalue()
        out += [f"Top {top} by {key}:", text[text.find("   ncalls"):].rstrip(), ""]
    return "\n".join(out)


def run_profile(corpus: str, paths: list[Path], scratch: Path, settings: Settings, tool: str = "auto",
                out_dir: Path | None = None) -> tuple[dict, str]:
    """The batch on SQLite with the service under a profiler: (its row, the summary text)."""
    out_dir = out_dir or scratch
    out_dir.mkdir(parents=True, exist_ok=True)
    pyspy = pyspy_path() if tool in ("auto", "py-spy") else None
    if tool == "py-spy" and pyspy is None:
        raise SystemExit("py-spy is not installed: pip install py-spy")
    if pyspy:
        raw = out_dir / "profile.pyspy.txt"
        command = [pyspy, "record", "--rate", str(SAMPLE_RATE), "--idle", "--threads", "--function",
                   "--subprocesses",  # the importers are processes forked by the service
                   "--format", "raw", "--output", str(raw), "--", *service_command()]
    else:
        raw = out_dir / "profile.pstats"
        command = [sys.executable, str(Path(__file__).with_name("threadprofile.py")), str(raw)]
    LOGGER.info("profiling with %s", "py-spy" if pyspy else "cProfile (bench.threadprofile)")
    row = batch(corpus, paths, scratch / "profile", Sqlite(), settings, what="service batch, profiled",
                command=command)
    summary = summarize_pyspy(raw) if pyspy else summarize_cprofile(raw)
    row["profile"] = {"tool": "py-spy" if pyspy else "cProfile", "output": str(raw)}
    return row, summary
