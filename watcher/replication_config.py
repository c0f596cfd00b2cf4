"""Replication on a schedule: the ``[[replication]]`` tables of the config, and ``run_due``,
which the service calls every minute or so and which runs each replication whose interval
has passed (watcher/replicate.py does the work).

```toml
[[replication]]
from = "http://pacs:8042/dicom-web/"
token = "…"                      # optional: sent as Authorization: Bearer
to = "trial-a"                   # optional: default import
interval_seconds = 3600          # optional: default 3600
studies = ["1.2.3.4"]            # optional: only these; or
since = "2026-01-01"             # optional: studies dated from then on; or
since_days = 7                   # optional: studies of the last 7 days (a rolling window)
creator = "nightly-pull"         # optional: recorded as the instances' creator (default: the OS user)
```
"""

import dataclasses
import datetime
import logging
import math
import threading

from .errors import ConfigError, Refused
from .models import ReplicationState, utcnow, write_transaction
from .report import iso
from .studies.databases import check_name

LOGGER = logging.getLogger(__name__)
MIN_INTERVAL_SECONDS = 60.0


@dataclasses.dataclass(frozen=True)
class Replication:
    source: str  # the DICOMweb root ("from" in the file)
    token: str | None = None
    to: str = "import"
    interval_seconds: float = 3600.0
    studies: tuple = ()
    since: str = ""  # YYYYMMDD
    since_days: int | None = None
    creator: str = ""

    def since_now(self, today: datetime.date | None = None) -> str:
        """The study date the run starts from (YYYYMMDD), or "" for every study."""
        if self.since_days is None:
            return self.since
        today = today or datetime.date.today()
        return (today - datetime.timedelta(days=self.since_days)).strftime("%Y%m%d")


KEYS = {"from", "token", "to", "interval_seconds", "studies", "since", "since_days", "creator"}


def parse(value) -> tuple:
    """The ``[[replication]]`` tables (``data.get("replication", [])``) as Replications;
    ``ConfigError`` naming the key otherwise."""
    if not isinstance(value, list) or not all(isinstance(v, dict) for v in value):
        raise ConfigError("replication must be tables ([[replication]]), one per source")
    return tuple(_one(table, f"replication[{n}]") for n, table in enumerate(value, 1))


def _one(table: dict, where: str) -> Replication:
    unknown = set(table) - KEYS
    if unknown:
        raise ConfigError(f"unknown key {where}.{sorted(unknown)[0]}; known: {', '.join(sorted(KEYS))}")
    if "from" not in table:
        raise ConfigError(f"missing key {where}.from (the source's DICOMweb root URL)")
    source = _text(table["from"], f"{where}.from")
    if not source.startswith(("http://", "https://")):
        raise ConfigError(f"{where}.from must be the http:// or https:// URL of a DICOMweb root")
    source = source.rstrip("/") + "/"
    token = _text(table["token"], f"{where}.token") if "token" in table else None
    to = _text(table.get("to", "import"), f"{where}.to")
    try:
        check_name(to)
    except Refused as exc:
        raise ConfigError(f"{where}.to: {exc}") from None
    interval = table.get("interval_seconds", 3600.0)
    if (not isinstance(interval, (int, float)) or isinstance(interval, bool)
            or not math.isfinite(interval) or interval < MIN_INTERVAL_SECONDS):
        raise ConfigError(f"{where}.interval_seconds must be a number, at least "
                          f"{MIN_INTERVAL_SECONDS:g}")
    studies = table.get("studies", [])
    if not isinstance(studies, list) or not all(isinstance(s, str) and s.strip() for s in studies):
        raise ConfigError(f"{where}.studies must be a list of Study Instance UIDs")
    if sum(k in table for k in ("studies", "since", "since_days")) > 1:
        raise ConfigError(f"{where}: give at most one of studies, since and since_days")
    since = ""
    if "since" in table:
        text = _text(table["since"], f"{where}.since")
        try:
            since = datetime.date.fromisoformat(text).strftime("%Y%m%d")
        except ValueError:
            raise ConfigError(f"{where}.since must be a date, YYYY-MM-DD, not {text!r}") from None
    days = table.get("since_days")
    if days is not None and (not isinstance(days, int) or isinstance(days, bool) or days < 0):
        raise ConfigError(f"{where}.since_days must be a whole number of days (0: today)")
    creator = _text(table["creator"], f"{where}.creator") if "creator" in table else ""
    return Replication(source, token, to, float(interval), tuple(s.strip() for s in studies),
                       since, days, creator)


def _text(value, key: str) -> str:
    if not isinstance(value, str) or not value.strip():
        raise ConfigError(f"{key} must be a non-empty string")
    return value.strip()


BACKOFF_SECONDS = 60.0  # a failing source is tried again after 1, 2, 4… minutes, at most its interval
_running = threading.Lock()


def run_due(config, stopping: threading.Event | None = None,
            now: datetime.datetime | None = None) -> dict:
    """Run every configured replication (``config.replication``) that is due: never run, its
    interval passed since its last start, or (failing) its backoff passed. The state is the
    catalog's (``ReplicationState``), so every node sees it, ``status`` shows it, and one node
    at a time takes a due source. Never raises: a source that cannot be reached, a refused
    target, an outage are logged, recorded and tried again with backoff. ``stopping``: set it to
    stop between two instances. ``now``: UTC, for tests. Returns {source URL: the studies'
    reports, or the error's message} of the runs it made."""
    if not _running.acquire(blocking=False):
        return {}  # the previous call is still at work
    try:
        done = {}
        for r in getattr(config, "replication", ()):
            if stopping is not None and stopping.is_set():
                break
            started = now or utcnow()
            if not _take(r, config.import_.node, started):
                continue
            done[r.source] = result = _run(config, r, stopping)
            _record(r, result, started, now or utcnow())
        return done
    finally:
        _running.release()


def _take(r: Replication, node: str, now: datetime.datetime) -> bool:
    """This node runs ``r`` now if it is due; until it ends, it is not due for anyone (for one
    interval: a node killed on the way leaves it to the others after that)."""
    with write_transaction():
        ReplicationState.insert(source=_key(r), next_attempt=now).on_conflict_ignore().execute()
        taken = (ReplicationState.update(node=node, last_started=now,
                                         next_attempt=now + datetime.timedelta(seconds=r.interval_seconds))
                 .where(ReplicationState.source == _key(r), ReplicationState.next_attempt <= now)
                 .execute())
    return taken == 1


def _record(r: Replication, result, started: datetime.datetime, ended: datetime.datetime) -> None:
    """How the run ended, and when the source is due again: after its interval when every
    study came whole, else after the backoff."""
    if isinstance(result, str):
        failed = result
    else:
        incomplete = [x for x in result if not x.complete]
        failed = (f"{len(incomplete)} of {len(result)} studies incomplete: "
                  + "; ".join(x.errors[0] for x in incomplete if x.errors)[:500]) if incomplete else ""
    row = ReplicationState.get(ReplicationState.source == _key(r))
    failures = row.failures + 1 if failed else 0
    wait = min(r.interval_seconds, BACKOFF_SECONDS * 2 ** (failures - 1)) if failed else r.interval_seconds
    with write_transaction():
        (ReplicationState.update(last_ended=ended, failures=failures, last_error=failed,
                                 next_attempt=started + datetime.timedelta(seconds=wait),
                                 **({} if failed else {"last_ok": ended}))
         .where(ReplicationState.source == _key(r)).execute())


def states(config) -> list[dict]:
    """What ``status`` shows of each configured replication source."""
    rows = {s.source: s for s in ReplicationState.select()}
    found = []
    for r in getattr(config, "replication", ()):
        s = rows.get(_key(r))
        found.append({"source": _shown(r.source), "to": r.to, "interval_seconds": r.interval_seconds,
                      "state": "never run" if s is None or s.last_started is None else
                      "running" if s.last_ended is None or s.last_ended < s.last_started else
                      "failing" if s.failures else "ok",
                      "node": s.node if s else None, "last_started": _iso(s, "last_started"),
                      "last_ok": _iso(s, "last_ok"), "failures": s.failures if s else 0,
                      "last_error": (s.last_error or None) if s else None,
                      "next_attempt": _iso(s, "next_attempt")})
    return found


def _iso(row, field: str) -> str | None:
    return iso(getattr(row, field)) if row is not None else None


def _key(r: Replication) -> str:
    """Its row: the source (without credentials) and where its studies go."""
    return f"{_shown(r.source)} to {r.to}"


def _shown(url: str) -> str:
    from .replicate import public_url  # (replicate imports config: not at the top)
    return public_url(url)


def _run(config, r: Replication, stopping):
    from .replicate import SourceError, os_user, replicate  # (replicate imports config: not at the top)
    try:
        reports = replicate(config, r.source, r.token, r.studies, r.since_now(), r.to,
                            actor=r.creator or os_user(), stopping=stopping)
    except Exception as exc:
        LOGGER.warning("replication from %s failed: %s: %s", r.source, type(exc).__name__, exc,
                       exc_info=not isinstance(exc, SourceError))
        return f"{type(exc).__name__}: {exc}"
    incomplete = [x for x in reports if not x.complete]
    LOGGER.info("replication from %s: %d studies, %d stored, %d incomplete", r.source,
                len(reports), sum(x.stored for x in reports), len(incomplete))
    return reports
