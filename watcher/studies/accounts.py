"""The people who sign in (to the web app): their accounts, passwords and API tokens.

A password is kept only as its argon2 hash (``argon2-cffi``), a token only as the sha256 of its
secret; the secret is shown once, by ``issue_token``. A disabled account is refused at once, by
password and by token. Nothing here logs or returns a password, a secret or a hash.
What an account may do is decided in one place: ``watcher/studies/rights.py``.
"""

import functools
import hashlib
import logging
import re
import secrets

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError, VerifyMismatchError
from peewee import IntegrityError, fn

from ..errors import Refused
from ..models import Account, ApiToken, Grant, StudyDatabase, utcnow, write_transaction

LOGGER = logging.getLogger(__name__)
NAME = re.compile(r"[a-z0-9][a-z0-9._@-]{0,63}\Z")
MIN_PASSWORD = 8
TOKEN_PREFIX = "dw_"  # says what a leaked secret is, in a log or a search for secrets

class _HideHashes(logging.Filter):
    """``-vv`` logs every SQL statement with its parameters (peewee): never a password hash
    or a token hash."""

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.msg, tuple) and len(record.msg) == 2 and isinstance(record.msg[0], str) \
                and ('"password_hash"' in record.msg[0] or '"token_hash"' in record.msg[0]):
            sql, params = record.msg
            record.msg = (sql, [_hidden(p) for p in params or ()])
        return True


def _hidden(value):
    if isinstance(value, str) and (value.startswith("$argon2") or re.fullmatch(r"[0-9a-f]{64}", value)):
        return "(hidden)"
    return value


logging.getLogger("peewee").addFilter(_HideHashes())
_hasher = PasswordHasher()  # argon2id with the library's current recommended parameters


@functools.lru_cache(maxsize=1)
def _nobody() -> str:
    """A hash verified for unknown names (equal timing); made on first use, not at import:
    every command imports this module, and one argon2 hash costs 0.2 s."""
    return _hasher.hash(secrets.token_urlsafe(16))


def check_name(name: str) -> str:
    if not NAME.match(name or ""):
        raise Refused(f"{name!r} cannot name an account: use 1 to 64 lower-case letters, digits, "
                      "'.', '_', '@' or '-', starting with a letter or digit")
    return name


def get(name: str) -> Account:
    account = Account.get_or_none(Account.name == name)
    if account is None:
        raise Refused(f"no account named {name!r} (dicom-watcher users list shows them)")
    return account


def add(name: str, password: str, manager: bool = False) -> dict:
    check_name(name)
    if len(password or "") < MIN_PASSWORD:
        raise Refused(f"the password is too short: use at least {MIN_PASSWORD} characters")
    password_hash = _hasher.hash(password)
    try:
        with write_transaction():
            Account.insert(name=name, password_hash=password_hash, is_manager=manager,
                           disabled=False, created_at=utcnow()).execute()
    except IntegrityError:  # the name is unique
        raise Refused(f"an account named {name!r} exists already") from None
    LOGGER.info("account added: %s%s", name, " (manager)" if manager else "")
    return {"name": name, "is_manager": manager}


def disable(name: str) -> dict:
    """Refuse the account from now on, and revoke its tokens (enabling it again, one day, must
    not bring back a secret that may have leaked meanwhile)."""
    with write_transaction():
        account = get(name)
        Account.update(disabled=True).where(Account.id == account.id).execute()
        revoked = (ApiToken.update(revoked=True)
                   .where(ApiToken.account == account.id, ApiToken.revoked == False)  # noqa: E712
                   .execute())
    LOGGER.info("account disabled: %s (%d tokens revoked)", name, revoked)
    return {"name": name, "disabled": True, "tokens_revoked": revoked}


def listing() -> list[dict]:
    """Every account, its rights and how many live tokens it has; never a hash."""
    grants: dict[int, dict[str, str]] = {}
    for account_id, db_name, level in (Grant.select(Grant.account, StudyDatabase.name, Grant.level)
                                       .join(StudyDatabase).order_by(StudyDatabase.id).tuples()):
        grants.setdefault(account_id, {})[db_name] = level
    tokens = dict(ApiToken.select(ApiToken.account, fn.COUNT(ApiToken.id))
                  .where(ApiToken.revoked == False).group_by(ApiToken.account).tuples())  # noqa: E712
    return [{"name": a.name, "is_manager": a.is_manager, "disabled": a.disabled,
             "created_at": a.created_at.isoformat(timespec="seconds"),
             "grants": grants.get(a.id, {}), "tokens": tokens.get(a.id, 0)}
            for a in Account.select(Account.id, Account.name, Account.is_manager, Account.disabled,
                                    Account.created_at).order_by(Account.name)]


def verify_password(name: str, password: str) -> Account | None:
    """The account, if ``password`` is its password and it is not disabled; else None (the same
    None, after the same work, for an unknown name, a wrong password and a disabled account)."""
    account = Account.get_or_none(Account.name == name)
    try:
        _hasher.verify(account.password_hash if account else _nobody(), password or "")
    except (VerifyMismatchError, VerificationError, InvalidHashError):
        return None
    if account is None or account.disabled:
        return None
    if _hasher.check_needs_rehash(account.password_hash):  # parameters raised since it was set
        account.password_hash = _hasher.hash(password)
        with write_transaction():
            Account.update(password_hash=account.password_hash).where(Account.id == account.id).execute()
        LOGGER.info("password hash of %s brought up to the current parameters", name)
    return account


def _digest(secret: str) -> str:
    return hashlib.sha256(secret.encode("utf-8")).hexdigest()


def issue_token(name: str) -> str:
    """A new API token for the account: the secret, returned this once and never kept."""
    secret = TOKEN_PREFIX + secrets.token_urlsafe(32)
    with write_transaction():
        account = get(name)
        if account.disabled:
            raise Refused(f"the account {name!r} is disabled")
        token_id = ApiToken.insert(account=account.id, token_hash=_digest(secret),
                                   created_at=utcnow(), revoked=False).execute()
    LOGGER.info("API token %s issued to %s", token_id, name)
    return secret


def check_token(secret: str) -> Account | None:
    """The account a token belongs to, if the token is live and the account not disabled."""
    if not secret or not secret.startswith(TOKEN_PREFIX):
        return None
    return (Account.select().join(ApiToken)
            .where(ApiToken.token_hash == _digest(secret), ApiToken.revoked == False,  # noqa: E712
                   Account.disabled == False)  # noqa: E712
            .first())


def revoke_token(secret: str) -> bool:
    """Revoke one token by its secret; False if there is no such live token."""
    with write_transaction():
        revoked = (ApiToken.update(revoked=True)
                   .where(ApiToken.token_hash == _digest(secret), ApiToken.revoked == False)  # noqa: E712
                   .execute())
    if revoked:
        LOGGER.info("an API token was revoked")
    return bool(revoked)


__all__ = ["add", "check_name", "check_token", "disable", "get", "issue_token", "listing",
           "revoke_token", "verify_password"]
