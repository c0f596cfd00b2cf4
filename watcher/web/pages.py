"""The pages: server-rendered HTML (Jinja2 templates in templates/), plain forms, no script.
Here: signing in and out, and what one reads; the forms that change studies, accounts and
rights are in manage.py. Every form carries its CSRF token."""

import asyncio
from urllib.parse import quote, urlencode

from fastapi import APIRouter, Form, Request
from fastapi.responses import HTMLResponse, RedirectResponse
from starlette.concurrency import run_in_threadpool

from .. import browse, replication_config, report
from ..studies import accounts, databases, rights
from . import manage
from .auth import LOGIN_COOKIE, SESSION_COOKIE, check_csrf, connected, safe_next
from .html import TEMPLATES, render

PAGE = 50


def router(web) -> APIRouter:
    pages = APIRouter(include_in_schema=False)

    def cookie(response, name: str, value: str, max_age: float | None) -> None:
        response.set_cookie(name, value, max_age=None if max_age is None else int(max_age),
                            httponly=True, samesite="strict", path="/")

    @pages.get("/login", response_class=HTMLResponse)
    def login_form(request: Request, next: str = "/"):
        with connected():
            token, vouch = web.auth.login_csrf()
        response = render(request, "login.html", csrf=token, next=safe_next(next), error=None)
        cookie(response, LOGIN_COOKIE, vouch, 3600)
        return response

    @pages.post("/login", response_class=HTMLResponse)
    async def login(request: Request, name: str = Form(""), password: str = Form(""),
                    csrf: str = Form(""), next: str = Form("/")):
        def check():
            with connected():
                web.auth.check_login_csrf(request, csrf)
                return accounts.verify_password(name, password)
        await asyncio.sleep(web.auth.delay(name))  # (not a thread held: the wait costs nothing)
        account = await run_in_threadpool(check)
        if account is None:
            web.auth.failed(name)
            with_token = await run_in_threadpool(_login_csrf, web)
            response = render(request, "login.html", status_code=401, csrf=with_token[0],
                              next=safe_next(next), error="Wrong name or password, or the account is disabled.")
            cookie(response, LOGIN_COOKIE, with_token[1], 3600)
            return response
        web.auth.succeeded(name)

        def start():
            with connected():
                return web.auth.sign_in(account)
        value = await run_in_threadpool(start)
        response = RedirectResponse(safe_next(next), status_code=303)
        cookie(response, SESSION_COOKIE, value, web.config.http.session_hours * 3600)
        response.delete_cookie(LOGIN_COOKIE, path="/")
        return response

    @pages.post("/logout")
    def logout(request: Request, csrf: str = Form("")):
        with connected():
            _, session = web.auth.page_user(request)
            check_csrf(session.csrf, csrf)
            web.auth.sign_out(request)
        response = RedirectResponse("/login", status_code=303)
        response.delete_cookie(SESSION_COOKIE, path="/")
        return response

    @pages.get("/", response_class=HTMLResponse)
    def dashboard(request: Request):
        with connected():
            user, session = web.auth.page_user(request)
            visible = set(rights.readable_databases(user))
            ids = [d.id for d in databases.StudyDatabase.select().where(
                databases.StudyDatabase.name.in_(list(visible)))] if visible else [-1]
            listing, counted_at = web.counts.latest()
            status = report.status(ids, web.config.distribute.stable_seconds, listing)
            status["databases"] = [d for d in status["databases"] if d["name"] in visible]
            manager = rights.may(user, "manage")
            latest = report.history(limit=20) if manager else []
            ok, health = report.health(web.config)
            pending = report.pending_counts(report.pending(web.config)) if manager else {}
            replications = replication_config.states(web.config) if manager else []
        return render(request, "dashboard.html", user=user, csrf=session.csrf, status=status,
                      latest=latest, pending={k: v for k, v in pending.items() if v},
                      manager=manager, ok=ok, health=health, counted_at=report.iso(counted_at),
                      replications=replications)

    @pages.get("/databases", response_class=HTMLResponse)
    def database_list(request: Request):
        with connected():
            user, session = web.auth.page_user(request)
            visible = set(rights.readable_databases(user))
            rows = [d for d in databases.listing() if d["name"] in visible]
        return render(request, "databases.html", user=user, csrf=session.csrf, databases=rows)

    @pages.get("/databases/{db}", response_class=HTMLResponse)
    def database(request: Request, db: str, patient: str = "", date: str = "", modality: str = "",
                 description: str = "", page: int = 1):
        search = {"patient": patient, "date": date, "modality": modality, "description": description}
        with connected():
            user, session = web.auth.page_user(request)
            row = rights.require(user, "browse", db)
            found = browse.studies(row.id, limit=PAGE, offset=(max(page, 1) - 1) * PAGE, **search)
        pages_total = max(1, -(-found["total"] // PAGE))
        query = urlencode({k: v for k, v in search.items() if v})
        return render(request, "database.html", user=user, csrf=session.csrf, db=db, found=found,
                      search=search, page=max(page, 1), pages=pages_total, query=query)

    @pages.get("/databases/{db}/studies/{uid}", response_class=HTMLResponse)
    def study(request: Request, db: str, uid: str):
        with connected():
            user, session = web.auth.page_user(request)
            row = rights.require(user, "browse", db)
            found = browse.study(row.id, uid)
            may_download = rights.may(user, "download", db)
            targets = manage.targets(user, db)
        return render(request, "study.html", user=user, csrf=session.csrf, db=db, study=found,
                      download=f"/api/databases/{quote(db)}/studies/{quote(uid)}/archive" if may_download else None,
                      targets=targets)

    @pages.get("/rejects", response_class=HTMLResponse)
    def rejects(request: Request):
        with connected():
            user, session = web.auth.page_user(request)
            if not rights.may(user, "manage"):
                raise rights.Forbidden("only a manager sees the rejected files")
            rows = report.rejects()
        return render(request, "rejects.html", user=user, csrf=session.csrf,
                      rejects=rows[::-1][:500], total=len(rows))

    pages.include_router(manage.router(web))
    return pages


def _login_csrf(web):
    with connected():
        return web.auth.login_csrf()


__all__ = ["TEMPLATES", "render", "router"]
