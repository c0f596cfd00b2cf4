"""The few exceptions that say what happened to one file, or to the whole service."""


class ConfigError(Exception):
    """The configuration file is wrong; the message names the key."""


class Refused(Exception):
    """A person asked for something that cannot be done as asked (an unknown database or UID, a
    name taken, a database not empty); nothing was changed. The message says why."""


class Rejected(Exception):
    """This file can never be imported as it is: it goes to the rejected folder.

    ``reason`` is one of ``REASONS`` (stable, for machines); ``detail`` is a
    sentence for a person, saying what is wrong and, where possible, what to do.
    """

    def __init__(self, reason: str, detail: str):
        assert reason in REASONS, reason
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


class NotReady(Exception):
    """The file is not complete (yet): leave it where it is and look again later.

    ``reason`` is what the file is rejected as if it stays like this for
    ``incomplete_seconds``.
    """

    def __init__(self, detail: str, reason: str = "truncated"):
        super().__init__(detail)
        self.detail = detail
        self.reason = reason


class Busy(NotReady):
    """A writer still has the file open (the kernel refused a read lease): wait for it.

    Never turned into a rejection, however long it lasts: rejecting a file that is
    still being written would take it away from its writer."""

    def __init__(self, detail: str, state: str = "open-for-writing"):
        super().__init__(detail, reason="truncated")
        self.state = state  # open-for-writing, or changing (written to while we read it)


class CannotDispose(Exception):
    """The file's outcome is recorded but it cannot be removed or moved (a folder that
    cannot be written, say): it stays where it is and is tried again on a slow schedule."""


class Unavailable(Exception):
    """The archive or the database cannot take files right now (disk full,
    database down). Not the file's fault: it stays, and the service waits."""


REASONS = {
    "not-dicom": "not a DICOM file",
    "truncated": "the file ends before its last element does, and stayed so",
    "malformed": "DICOM, but its structure is invalid",
    "missing-attribute": "a required UID (SOP Class, SOP Instance, Study, Series) is missing or empty",
    "invalid-uid": "a required UID is not a valid UID",
    "meta-mismatch": "the file meta and the dataset disagree on the SOP Instance UID",
    "conflict": "an instance with this SOP Instance UID but other bytes is already imported",
    "unreadable": "the file cannot be read (permissions or I/O error)",
    "symlink": "a symbolic link; links are never followed",
    "special-file": "not a regular file (FIFO, socket or device)",
    "error": "an unexpected error repeated on every attempt",
    "media-type": "a part of an upload that says it is not application/dicom",
}
