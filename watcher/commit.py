"""Group commit: many files' rows in one transaction, so one fsync serves many files.

The originals and their folders are made durable first (``archive.make_durable``), then every record is
written in one transaction and committed once. Nothing is acknowledged before
its commit: per-file durability is kept, only the fsyncs are shared.
A service worker commits all the files it took at once this way
(``pipeline.ingest_together``); ``commit_now`` is the same for one file.
"""

import logging

from . import archive, catalog, models

LOGGER = logging.getLogger(__name__)


def commit_now(record):
    """Commit one record (an instance's or a disc's) now; its outcome, or raise its rejection."""
    result = commit_all([record])[0]
    if isinstance(result, Exception):
        raise result
    return result


def commit_all(records: list) -> list:
    """Commit ``records`` together; for each, "imported" (or "dicomdir"), "duplicate" or the
    exception it met.

    When the transaction fails, nothing of it is committed and every record gets the error.
    """
    try:
        archive.make_durable([r.stored for r in records])
        with catalog.ids.batch(), models.write_transaction():
            return catalog.record(records)
    except Exception as exc:
        LOGGER.debug("commit of %d failed: %s", len(records), exc)
        models.reset_connection()
        return [exc] * len(records)
