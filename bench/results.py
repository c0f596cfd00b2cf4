"""Result rows shared by every measurement, and how they are shown and saved.

A row is a plain dict: ``corpus, what, procs, cache, files, bytes, seconds, files_per_s,
mb_per_s``. ``cache`` is "cold" (page cache dropped just before), "warm" or "n/a".
MB is 10**6 bytes.
"""

from __future__ import annotations

import json
import statistics
from collections.abc import Callable
from pathlib import Path

FIELDS = ("corpus", "what", "procs", "cache", "files", "bytes", "seconds", "files_per_s", "mb_per_s")

# A measurement takes (corpus name, its files, a scratch folder on the same disk) and returns rows.
Measurement = Callable[[str, list[Path], Path], list[dict]]


def make_row(corpus: str, what: str, *, files: int, bytes_: int, seconds: float, procs: int = 1,
             cache: str = "n/a", moves_bytes: bool = True) -> dict:
    """One result; ``moves_bytes=False`` for work whose cost is not per byte (no MB/s then)."""
    per_s = (lambda amount: amount / seconds) if seconds > 0 else (lambda amount: None)
    mb_per_s = per_s(bytes_ / 1e6) if moves_bytes else None
    return {
        "corpus": corpus, "what": what, "procs": procs, "cache": cache,
        "files": files, "bytes": bytes_, "seconds": round(seconds, 4),
        "files_per_s": None if per_s(files) is None else round(per_s(files), 1),
        "mb_per_s": None if mb_per_s is None else round(mb_per_s, 1),
    }


def _cell(value) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:,.1f}" if value >= 10 else f"{value:.3f}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


def _table(headers, lines_of_cells) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(_cell(c) for c in cells) + " |" for cells in lines_of_cells]
    return "\n".join(lines)


def markdown_table(rows: list[dict]) -> str:
    """Rows as a markdown table; bytes shown as MB; ``vs limit`` where add_ratios found one."""
    headers = ("corpus", "what", "procs", "cache", "files", "MB", "seconds", "files/s", "MB/s",
               "vs limit", "load 1m")
    return _table(headers, (
        (row["corpus"], row["what"], row["procs"], row["cache"], row["files"], row["bytes"] / 1e6,
         row["seconds"], row["files_per_s"], row["mb_per_s"],
         f"{row['vs_limit']:.0%}" if row.get("vs_limit") is not None else None, _load(row))
        for row in rows if not row.get("skipped")))


def _load(row: dict) -> str | None:
    """The 1-minute load average before→after, as recorded with the row."""
    load = row.get("load_1m")
    if not load:
        return None
    return "→".join("?" if value is None else f"{value:.2f}" for value in load)


# Which limit a service row is held against: same corpus, copy_hash_fsync, warm page cache
# (the dropped files were just read), as many processes as the service has workers; small
# and real files are counted in files/s, large ones in MB/s. A lone file cannot be split
# between two processes, so it is held against one.
LIMIT_OF = {"small": ("small", 2, "files_per_s"), "real": ("real", 2, "files_per_s"),
            "large": ("large", 2, "mb_per_s"), "2 GiB": ("large", 1, "mb_per_s")}


def add_ratios(rows: list[dict], limit_what: str = "copy_hash_fsync") -> None:
    """Give each service row (``backend`` set) ``limit`` and ``vs_limit`` = service / limit."""
    for row in rows:
        if not row.get("backend") or row.get("skipped") or row["corpus"] not in LIMIT_OF:
            continue
        corpus, procs, metric = LIMIT_OF[row["corpus"]]
        limits = [r for r in rows if r["corpus"] == corpus and r["what"] == limit_what
                  and r["procs"] == procs and r["cache"] == "warm" and r.get(metric)
                  and r.get("round") == row.get("round")]  # (with --repeat: the same round's)
        if limits and row.get(metric) is not None:
            limit = limits[-1]  # the last warm row is the one that followed a cold read
            row["limit"] = f"{corpus} {limit_what} {procs} procs warm: {limit[metric]:,} {metric}"
            row["vs_limit"] = round(row[metric] / limit[metric], 3)


def _latency(row: dict, key: str):
    return (row.get("latency_ms") or {}).get(key)


def _outcomes(row: dict) -> str:
    counts = dict(row.get("outcomes") or {})
    reasons = row.get("rejection_reasons") or {}
    text = ", ".join(f"{k} {v:,}" for k, v in sorted(counts.items()))
    if reasons:
        text += " (" + ", ".join(f"{k} {v}" for k, v in sorted(reasons.items())) + ")"
    return text or "–"


def service_table(rows: list[dict]) -> str:
    """The service rows' other numbers: load, memory, CPU, latency, stop, what was left."""
    headers = ("corpus", "what", "1st outcome s", "peak RSS MB", "CPU s/1000 files", "p50 ms", "p95 ms",
               "p99 ms", "max ms", "missing", "stop s (exit)", "left in drop",
               "log ERROR lines", "outcomes", "notes")
    lines = []
    for row in rows:
        if not row.get("backend"):
            continue
        if row.get("skipped"):
            lines.append((row["corpus"], row["what"]) + (None,) * 12 + (f"skipped: {row['skipped']}",))
            continue
        several = (row.get("tree_processes") or 1) > 1  # then the parent alone is not the whole story
        lines.append((
            row["corpus"], row["what"], row.get("first_outcome_s"),
            f"{row['peak_rss_mb']} (tree PSS {row['tree_peak_pss_mb']})" if several else row.get("peak_rss_mb"),
            f"{row['cpu_s_per_1000']} (tree {row['tree_cpu_s_per_1000']})" if several else row.get("cpu_s_per_1000"), _latency(row, "p50"), _latency(row, "p95"), _latency(row, "p99"),
            _latency(row, "max"), row.get("never_arrived", row.get("unaccounted")),
            f"{row['stop_seconds']:.2f} ({row['exit_code']})", row.get("left_in_drop"),
            row.get("log_problems"), _outcomes(row), "; ".join(row.get("notes", [])) or None))
    return _table(headers, lines)


def spread_table(rows: list[dict]) -> str:
    """With --repeat: each repeated figure's median and range over the rounds (files/s, MB/s,
    the ratio to the limit, and the tree's CPU per file)."""
    groups: dict = {}
    for row in rows:
        if not row.get("skipped") and row["what"] != "generate":
            groups.setdefault((row["corpus"], row["what"], row["procs"], row["cache"]), []).append(row)

    def spread(values):
        values = sorted(v for v in values if v is not None)
        if not values:
            return None
        return f"{_cell(float(statistics.median(values)))} ({_cell(values[0])}–{_cell(values[-1])})"

    lines = []
    for (corpus, what, procs, cache), group in groups.items():
        if len(group) < 2:
            continue
        ratios = [r["vs_limit"] * 100 for r in group if r.get("vs_limit") is not None]
        lines.append((corpus, what, procs, cache, len(group), spread(r["files_per_s"] for r in group),
                      spread(r["mb_per_s"] for r in group),
                      spread(ratios) and spread(ratios) + " %",
                      spread(r.get("tree_cpu_s_per_1000") for r in group)))
    headers = ("corpus", "what", "procs", "cache", "runs", "files/s median (min–max)", "MB/s",
               "vs limit", "tree CPU s/1000 files")
    return _table(headers, lines)


def write_json(path: Path, rows: list[dict], meta: dict) -> None:
    path.write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")
