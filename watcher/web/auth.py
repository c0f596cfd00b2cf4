"""Who is asking: a signed session cookie (pages, and the API from a browser) or a bearer token
(programs), and the CSRF tokens that every form posts back.

- The cookie holds a random secret and its HMAC under a key kept in the database (made once,
  shared by every node of a PostgreSQL site, never in code); the ``web_session`` row holds only
  the secret's sha256. HttpOnly, SameSite=Strict. Signing out deletes the row: the cookie is
  dead at once, wherever a copy of it is.
- The account is read again on every request: a disabled one is refused at once, whatever
  cookie or token it holds (``accounts.check_token`` refuses revoked tokens).
- A wrong password is answered late, the later the more wrong ones were tried for that name
  lately (per process: the web app runs in one).
What a signed-in account may do is decided by watcher/studies/rights.py, never here.
"""

import base64
import collections
import datetime
import hashlib
import hmac
import logging
import re
import secrets
import threading
import time

from fastapi import Request
from peewee import IntegrityError

from .. import models
from ..errors import Refused
from ..models import Account, WebSession, WebSetting, utcnow, write_transaction
from ..studies import accounts

LOGGER = logging.getLogger(__name__)
SESSION_COOKIE = "dw_session"
LOGIN_COOKIE = "dw_login"  # the CSRF token of the sign-in form (there is no session yet)
CSRF_HEADER = "x-csrf-token"  # the API from a browser session: a POST carries the token here
KEY_NAME = "session_key"
FAILURE_WINDOW = 900.0  # wrong passwords older than this no longer slow a name down
MAX_DELAY = 10.0


class SignInNeeded(Refused):
    """No valid session or token (the API: 401; a page: to the sign-in form)."""


class BadCsrf(Refused):
    """A POST without the token of its session (403)."""


class _HideKey(logging.Filter):
    """``-vv`` logs SQL with its parameters: never the signing key."""

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.msg, tuple) and len(record.msg) == 2 and isinstance(record.msg[0], str) \
                and '"web_setting"' in record.msg[0]:
            record.msg = (record.msg[0], ["(hidden)" if isinstance(p, str) and len(p) >= 32 else p
                                          for p in record.msg[1] or ()])
        return True


logging.getLogger("peewee").addFilter(_HideKey())


def connected():
    """This request's database connection, taken and given back in the thread that runs it
    (opened and closed on SQLite; from the pool and back on PostgreSQL, models.connect)."""
    return models.database.connection_context()


def _digest(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


class Auth:
    """Sessions, tokens, CSRF and the sign-in throttle of one web app."""

    def __init__(self, session_seconds: float):
        self.session_seconds = session_seconds
        self._key: bytes | None = None
        self._failures: dict[str, collections.deque] = {}
        self._lock = threading.Lock()

    # -- the signing key -----------------------------------------------------------------
    def key(self) -> bytes:
        if self._key is None:
            row = WebSetting.get_or_none(WebSetting.key == KEY_NAME)
            if row is None:
                try:
                    with write_transaction():
                        WebSetting.insert(key=KEY_NAME, value=secrets.token_hex(32)).execute()
                except IntegrityError:  # another node made it first: theirs it is
                    pass
                row = WebSetting.get(WebSetting.key == KEY_NAME)
            self._key = bytes.fromhex(row.value)
        return self._key

    def sign(self, value: str) -> str:
        mac = hmac.new(self.key(), value.encode(), hashlib.sha256).digest()
        return value + "." + base64.urlsafe_b64encode(mac).decode().rstrip("=")

    def unsign(self, signed: str | None) -> str | None:
        value, _, _mac = (signed or "").rpartition(".")
        if value and hmac.compare_digest(self.sign(value), signed):
            return value
        return None

    # -- sessions --------------------------------------------------------------------------
    def sign_in(self, account: Account) -> str:
        """A new session for the account: the cookie's value."""
        secret = secrets.token_urlsafe(32)
        now = utcnow()
        with write_transaction():
            WebSession.delete().where(WebSession.expires_at < now).execute()
            WebSession.insert(token_hash=_digest(secret), account=account.id,
                              csrf=secrets.token_urlsafe(24), created_at=now,
                              expires_at=now + datetime.timedelta(seconds=self.session_seconds)).execute()
        LOGGER.info("%s signed in", account.name)
        return self.sign(secret)

    def session(self, request: Request) -> tuple[Account, WebSession] | None:
        secret = self.unsign(request.cookies.get(SESSION_COOKIE))
        if secret is None:
            return None
        row = (WebSession.select(WebSession, Account).join(Account)
               .where(WebSession.token_hash == _digest(secret), WebSession.expires_at > utcnow(),
                      Account.disabled == False).first())  # noqa: E712
        return None if row is None else (row.account, row)

    def sign_out(self, request: Request) -> None:
        secret = self.unsign(request.cookies.get(SESSION_COOKIE))
        if secret is not None:
            with write_transaction():
                WebSession.delete().where(WebSession.token_hash == _digest(secret)).execute()

    # -- who asks ----------------------------------------------------------------------------
    def api_user(self, request: Request, posting: bool = False) -> Account:
        """A bearer token's account, else the browser session's (a POST must then carry its
        CSRF token in the X-CSRF-Token header); else ``SignInNeeded``."""
        header = request.headers.get("authorization", "")
        if header:
            scheme, _, secret = header.partition(" ")
            account = accounts.check_token(secret.strip()) if scheme.lower() == "bearer" else None
            if account is None:
                raise SignInNeeded("the token is not valid (unknown, revoked, or its account disabled)")
            return account
        found = self.session(request)
        if found is None:
            raise SignInNeeded("sign in, or send Authorization: Bearer <token>")
        account, session = found
        if posting:
            check_csrf(session.csrf, request.headers.get(CSRF_HEADER))
        return account

    def page_user(self, request: Request) -> tuple[Account, WebSession]:
        found = self.session(request)
        if found is None:
            raise SignInNeeded("sign in first")
        return found

    # -- the sign-in form --------------------------------------------------------------------
    def login_csrf(self) -> tuple[str, str]:
        """(the form's token, the cookie that vouches for it)."""
        token = secrets.token_urlsafe(24)
        return token, self.sign("login:" + token)

    def check_login_csrf(self, request: Request, token: str | None) -> None:
        value = self.unsign(request.cookies.get(LOGIN_COOKIE))
        check_csrf(value, "login:" + (token or ""))

    def delay(self, name: str) -> float:
        """How long to wait before checking a password for ``name``: 0 without recent failures,
        then 0.5 s doubling with each, at most MAX_DELAY."""
        with self._lock:
            recent = self._recent(name)
            return 0.0 if not recent else min(0.5 * 2 ** (len(recent) - 1), MAX_DELAY)

    def failed(self, name: str) -> None:
        with self._lock:
            self._recent(name).append(time.monotonic())
            if len(self._failures) > 10000:  # names tried at random: keep the memory bounded
                for other in [n for n, q in self._failures.items() if not q]:
                    del self._failures[other]

    def succeeded(self, name: str) -> None:
        with self._lock:
            self._failures.pop(name, None)

    def _recent(self, name: str) -> collections.deque:
        q = self._failures.setdefault(name, collections.deque(maxlen=32))
        while q and time.monotonic() - q[0] > FAILURE_WINDOW:
            q.popleft()
        return q


def check_csrf(expected: str | None, given: str | None) -> None:
    if not expected or not given or not hmac.compare_digest(expected.encode(), given.encode()):
        raise BadCsrf("the form's security token is missing or stale: reload the page and try again")


def safe_next(target: str | None) -> str:
    """Where to go after signing in: a path of ours only (never another site)."""
    if target and re.match(r"/(?![/\\])", target):
        return target
    return "/"


__all__ = ["Auth", "BadCsrf", "CSRF_HEADER", "LOGIN_COOKIE", "SESSION_COOKIE", "SignInNeeded",
           "check_csrf", "connected", "safe_next"]
