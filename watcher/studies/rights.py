"""Who may do what: the one place that decides. Every caller (the web app, the API) asks here.

- A **manager** may do everything, on every database, the Import database included.
- Anyone else has, on each database, the level a manager granted them, or nothing:
  ``read`` lets them browse, download and distribute *from* it; ``write`` also lets them upload
  and distribute *into* it (write includes read). ``manage`` (accounts, grants, databases) is a
  manager's alone.
- A database on which someone has no right at all does not exist for them: ``require`` says
  "no database named ..." exactly as for a name that does not exist (the web app answers 404),
  so that its name, or that it exists, does not leak.
- A disabled account may do nothing, from the moment it is disabled: rights are read from the
  database on every question, never from an account row held since sign-in.
- The command line is run by the site's OS administrator and acts as a manager
  (``Administrator``).
"""

import logging
from dataclasses import dataclass

from ..errors import Refused
from ..models import Account, Grant, StudyDatabase, write_transaction
from . import accounts
from . import databases as dbs

LOGGER = logging.getLogger(__name__)
READ, WRITE, MANAGE = "read", "write", "manage"
LEVELS = (READ, WRITE)  # what can be granted, weakest first
ACTIONS = {"browse": READ, "download": READ, "distribute-from": READ,
           "upload": WRITE, "distribute-into": WRITE, "manage": MANAGE}


@dataclass(frozen=True)
class Administrator:
    """The one who runs the command line: a manager, known by their OS user name."""
    name: str
    id = None
    is_manager = True
    disabled = False


class NotVisible(Refused):
    """The database does not exist, or not for this user (the web app: 404)."""


class Forbidden(Refused):
    """The user sees the database but may not do this there (the web app: 403)."""


def _current(user) -> "Account | Administrator | None":
    """The user as the database knows them now; None when disabled (or gone)."""
    if isinstance(user, Administrator):
        return user
    if user is None or user.id is None:
        return None
    return Account.get_or_none(Account.id == user.id, Account.disabled == False)  # noqa: E712


def level_of(user, database: str) -> str | None:
    """``write``, ``read`` or None: what ``user`` has on the database named ``database``."""
    who = _current(user)
    row = StudyDatabase.get_or_none(StudyDatabase.name == database)
    if who is None or row is None:
        return None
    if who.is_manager:
        return WRITE
    grant = Grant.get_or_none(Grant.account == who.id, Grant.study_database == row.id)
    return grant.level if grant else None


def may(user, action: str, database: str | None = None) -> bool:
    """Whether ``user`` may do ``action`` (one of ``ACTIONS``) on the database named
    ``database`` (``manage`` needs none)."""
    needed = ACTIONS[action]  # an unknown action is a bug in the caller: KeyError
    if needed == MANAGE:
        who = _current(user)
        return bool(who and who.is_manager) and (database is None or level_of(user, database) is not None)
    has = level_of(user, database) if database is not None else None
    return has is not None and LEVELS.index(has) >= LEVELS.index(needed)


def require(user, action: str, database: str) -> StudyDatabase:
    """The database, if ``user`` may do ``action`` there; else ``NotVisible`` (no right at all,
    or no such database: the same message) or ``Forbidden``."""
    if level_of(user, database) is None:
        raise NotVisible(f"no database named {database!r}")
    if not may(user, action, database):
        raise Forbidden(f"you may not {action} in {database!r}")
    return StudyDatabase.get(StudyDatabase.name == database)


def readable_databases(user) -> list[str]:
    """The names of the databases ``user`` sees (may read), in the order they were created."""
    who = _current(user)
    if who is None:
        return []
    query = StudyDatabase.select(StudyDatabase.name)
    if not who.is_manager:
        query = query.join(Grant).where(Grant.account == who.id)
    return [name for name, in query.order_by(StudyDatabase.id).tuples()]


def grant(name: str, database: str, level: str) -> dict:
    """Give the account ``level`` (read or write) on the database, replacing what it had."""
    if level not in LEVELS:
        raise Refused(f"{level!r} is not a level: use {' or '.join(LEVELS)}")
    with write_transaction():
        account = accounts.get(name)
        row = dbs.get(database)
        dbs.lock(row.id)  # PostgreSQL: not deleted before this commits
        (Grant.insert(account=account.id, study_database=row.id, level=level)
         .on_conflict(conflict_target=[Grant.account, Grant.study_database],
                      update={Grant.level: level})
         .execute())
    LOGGER.info("granted %s on %s to %s", level, database, name)
    return {"name": name, "database": database, "level": level}


def revoke(name: str, database: str) -> dict:
    """Take away the account's right on the database; ``revoked`` False if it had none."""
    with write_transaction():
        account = accounts.get(name)
        row = dbs.get(database)
        gone = Grant.delete().where(Grant.account == account.id, Grant.study_database == row.id).execute()
    if gone:
        LOGGER.info("revoked the right of %s on %s", name, database)
    return {"name": name, "database": database, "revoked": bool(gone)}


__all__ = ["ACTIONS", "Administrator", "Forbidden", "LEVELS", "NotVisible", "grant", "level_of", "may",
           "readable_databases", "require", "revoke"]
