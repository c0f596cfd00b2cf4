"""Result rows shared by every measurement, and how they are shown and saved.

A row is a plain dict: ``corpus, what, procs, cache, files, bytes, seconds, files_per_s,
mb_per_s``. ``cache`` is "cold" (page cache dropped just before), "warm" or "n/a".
MB is 10**6 bytes.
"""

from __future__ import annotations

import json
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


def markdown_table(rows: list[dict]) -> str:
    """Rows as a markdown table; bytes shown as MB."""
    headers = ("corpus", "what", "procs", "cache", "files", "MB", "seconds", "files/s", "MB/s")
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    for row in rows:
        cells = (row["corpus"], row["what"], row["procs"], row["cache"], row["files"],
                 row["bytes"] / 1e6, row["seconds"], row["files_per_s"], row["mb_per_s"])
        lines.append("| " + " | ".join(_cell(c) for c in cells) + " |")
    return "\n".join(lines)


def write_json(path: Path, rows: list[dict], meta: dict) -> None:
    path.write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")
