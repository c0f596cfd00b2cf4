"""The pages that change things: distributing a study (a dry run first, then the move), and the
accounts and their rights. Plain forms, each carrying its session's CSRF token; who may post
what is decided by watcher/studies/rights.py, as for the API (a database one has no right on
answers 404, an account page for a non-manager 403). A refusal (``Refused``) is shown on the
page it came from."""

import logging
from urllib.parse import quote

from fastapi import APIRouter, Form, Request
from fastapi.responses import HTMLResponse, RedirectResponse

from .. import browse
from ..errors import Refused
from ..studies import accounts, distribute, rights
from .auth import check_csrf, connected
from .html import render

LOGGER = logging.getLogger(__name__)


def targets(user, source: str) -> list[str]:
    """The databases ``user`` may distribute a study of ``source`` into (none when they may
    not distribute from it)."""
    if not rights.may(user, "distribute-from", source):
        return []
    return [name for name in rights.readable_databases(user)
            if name != source and rights.may(user, "distribute-into", name)]


def router(web) -> APIRouter:
    manage = APIRouter(include_in_schema=False)

    def signed_in(request: Request, csrf: str | None = None, manager: bool = False):
        """(account, session) of the request; a POST's token checked; a manager's alone if
        ``manager``. (Call inside ``connected()``.)"""
        user, session = web.auth.page_user(request)
        if csrf is not None:
            check_csrf(session.csrf, csrf)
        if manager and not rights.may(user, "manage"):
            raise rights.Forbidden("only a manager manages accounts and rights")
        return user, session

    # -- distribution ----------------------------------------------------------------------
    @manage.post("/databases/{db}/studies/{uid}/distribute", response_class=HTMLResponse)
    def distribute_study(request: Request, db: str, uid: str, to: str = Form(""),
                         mode: str = Form("move"), dry_run: bool = Form(False), csrf: str = Form("")):
        """``dry_run``: what would move, and the button that moves it; else move (or copy)."""
        copy = mode == "copy"
        error, summary, status = None, None, 200
        with connected():
            user, session = signed_in(request, csrf)
            source = rights.require(user, "distribute-from", db)
            if to:
                target = rights.require(user, "distribute-into", to)
                if browse.missing("study", browse.missing("study", [uid], source.id), target.id):
                    raise browse.NotFound(f"no study {uid!r} in {db!r} (nor in {to!r}); nothing was moved")
            try:
                if not to:
                    raise Refused("choose the database to distribute the study into")
                summary = distribute.distribute([uid], to, db, "study", copy=copy, dry_run=dry_run,
                                                actor=f"{user.name} (web)")
            except Refused as exc:
                error, status = str(exc), 400
            choices = targets(user, db)
        return render(request, "distribute.html", status_code=status, user=user, csrf=session.csrf,
                      db=db, uid=uid, to=to, copy=copy, targets=choices, summary=summary, error=error,
                      study_url=f"/databases/{quote(db)}/studies/{quote(uid)}",
                      target_url=f"/databases/{quote(to)}/studies/{quote(uid)}" if to else None)

    # -- accounts and rights ----------------------------------------------------------------
    def users_page(request: Request, user, session, status: int = 200, error: str | None = None,
                   form: dict | None = None):
        return render(request, "users.html", status_code=status, user=user, csrf=session.csrf,
                      accounts=accounts.listing(), databases=rights.readable_databases(user),
                      levels=rights.LEVELS, error=error, form=form or {})

    def change(request: Request, csrf: str, what: str, action, form: dict | None = None):
        """Do ``action(manager)`` as a manager; back to the list (its rows show what changed),
        or the list again with the refusal and what was typed."""
        with connected():
            user, session = signed_in(request, csrf, manager=True)
            try:
                action(user)
            except Refused as exc:
                return users_page(request, user, session, 400, str(exc), form)
            LOGGER.info("%s by %s (web)", what, user.name)
        return RedirectResponse("/users", status_code=303)

    @manage.get("/users", response_class=HTMLResponse)
    def users(request: Request):
        with connected():
            user, session = signed_in(request, manager=True)
            return users_page(request, user, session)

    @manage.post("/users", response_class=HTMLResponse)
    def add_user(request: Request, name: str = Form(""), password: str = Form(""),
                 manager: bool = Form(False), csrf: str = Form("")):
        return change(request, csrf, f"account {name} added{' (manager)' if manager else ''}",
                      lambda _: accounts.add(name.strip(), password, manager=manager),
                      {"name": name, "manager": manager})

    @manage.post("/users/{name}/disable", response_class=HTMLResponse)
    def disable_user(request: Request, name: str, csrf: str = Form("")):
        def disable(manager):
            if name == manager.name:
                raise Refused("you cannot disable your own account here: ask another manager, "
                              "or run dicom-watcher users disable")
            accounts.disable(name)
        return change(request, csrf, f"account {name} disabled", disable)

    @manage.post("/users/{name}/grant", response_class=HTMLResponse)
    def grant(request: Request, name: str, database: str = Form(""), level: str = Form(""),
              csrf: str = Form("")):
        return change(request, csrf, f"{level} on {database} granted to {name}",
                      lambda _: rights.grant(name, database, level))

    @manage.post("/users/{name}/revoke", response_class=HTMLResponse)
    def revoke(request: Request, name: str, database: str = Form(""), csrf: str = Form("")):
        return change(request, csrf, f"right of {name} on {database} revoked",
                      lambda _: rights.revoke(name, database))

    return manage


__all__ = ["router", "targets"]
