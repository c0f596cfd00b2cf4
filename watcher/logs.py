"""How log lines look: the one place that configures logging (the CLI calls ``setup``).

- Each line names the process that wrote it (``node``, ``node#1``: see ``name_process``).
- Under systemd, when stderr is the journal (``JOURNAL_STREAM`` names it), each line starts
  with its syslog priority (``<4>`` for a warning), so ``journalctl -p warning`` finds it;
  the journal adds the time itself.
- A traceback is printed once per distinct error (type, message and where it was raised);
  the same error again is one line that says so.
- ``-v`` shows our debug lines; SQL statements only with ``-vv``.
"""

import logging
import os
import sys
import traceback

PRIORITY = {logging.DEBUG: 7, logging.INFO: 6, logging.WARNING: 4, logging.ERROR: 3, logging.CRITICAL: 2}
_process = {"name": "dicom-watcher"}


def name_process(name: str) -> None:
    """Name this process in every line it logs from now on (an importer: ``node#1``)."""
    _process["name"] = name


def stderr_is_journal(stream=None) -> bool:
    """systemd sets JOURNAL_STREAM=device:inode of the journal's socket on our stderr."""
    value = os.environ.get("JOURNAL_STREAM", "")
    try:
        device, inode = (int(part) for part in value.split(":"))
        st = os.fstat((stream or sys.stderr).fileno())
    except (ValueError, OSError, AttributeError):
        return False
    return (st.st_dev, st.st_ino) == (device, inode)


class _Context(logging.Filter):
    """Adds ``process_name`` and ``priority``; keeps the first traceback of each distinct error."""

    def __init__(self):
        super().__init__()
        self.seen: set = set()

    def filter(self, record: logging.LogRecord) -> bool:
        record.process_name = _process["name"]
        record.priority = PRIORITY.get(record.levelno, 6)
        if record.exc_info and record.exc_info[1] is not None:
            exc = record.exc_info[1]
            where = traceback.extract_tb(exc.__traceback__)[-1:] if exc.__traceback__ else []
            key = (type(exc).__name__, str(exc), tuple((f.filename, f.lineno) for f in where))
            if key in self.seen:
                record.msg = f"{record.msg} ({type(exc).__name__}: {exc}; traceback shown before)"
                record.exc_info = record.exc_text = None
            else:
                self.seen.add(key)
        return True


class _JournalFormatter(logging.Formatter):
    """Every line of a record (a traceback's too) carries the record's priority."""

    def format(self, record: logging.LogRecord) -> str:
        return "\n".join(f"<{record.priority}>{line}" for line in super().format(record).splitlines())


def setup(verbose: int = 0, quiet: int = 0, stream=None) -> logging.Handler:
    stream = stream or sys.stderr
    level = min(max(logging.INFO - 10 * verbose + 10 * quiet, logging.DEBUG), logging.CRITICAL)
    handler = logging.StreamHandler(stream)
    if stderr_is_journal(stream):
        handler.setFormatter(_JournalFormatter("%(process_name)s %(levelname)s %(name)s: %(message)s"))
    else:
        handler.setFormatter(logging.Formatter(
            "%(asctime)s %(process_name)s %(levelname)s %(name)s: %(message)s"))
    handler.addFilter(_Context())
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level)
    logging.getLogger("apscheduler").setLevel(max(level, logging.WARNING))
    for library in ("peewee", "psycopg", "watchdog", "pydicom", "urllib3"):  # their debug lines: -vv
        logging.getLogger(library).setLevel(logging.DEBUG if verbose >= 2 else max(level, logging.INFO))
    # pynetdicom's INFO lines (an association accepted, each store request, its release) repeat
    # our one line per object; -v shows them
    logging.getLogger("pynetdicom").setLevel(logging.DEBUG if verbose >= 2 else
                                             logging.INFO if verbose else max(level, logging.WARNING))
    # (each migration is logged by watcher.models already)
    logging.getLogger("peewee.migrations").setLevel(logging.DEBUG if verbose >= 2 else logging.WARNING)
    return handler
