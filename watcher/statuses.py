"""What an outcome means to a sender, in the status codes of PS3.4 Annex B.2.3: C-STORE
answers them (watcher/receive.py), STOW-RS lists them as each failed instance's
FailureReason (watcher/upload.py). One place decides."""

SUCCESS = 0x0000
OUT_OF_RESOURCES = 0xA700  # the archive or the database is unavailable: send again later
DOES_NOT_MATCH = 0xA900  # the dataset is not the SOP Class or Instance the sender said
CANNOT_UNDERSTAND = 0xC000  # a malformed dataset
PROCESSING_FAILURE = 0x0110  # stored, but not where it was sent (held in another database)
CONFLICT = 0xC001  # a "cannot understand" code of our own: the UID is stored with other bytes

_FOR_REASON = {"meta-mismatch": DOES_NOT_MATCH, "conflict": CONFLICT}


def of(outcome) -> int:
    """The status of a ``outcome.Outcome``: success for imported or duplicate."""
    if outcome.outcome in ("imported", "duplicate"):
        return SUCCESS
    return _FOR_REASON.get(outcome.reason, CANNOT_UNDERSTAND)
