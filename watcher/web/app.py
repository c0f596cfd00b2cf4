"""The web app and API, made from an explicit Config (no globals): ``create_app(config)``.

Routes call the read modules (watcher/browse.py, report.py) and watcher/studies/; who may do
what is asked of watcher/studies/rights.py alone. Each request takes a database connection in
the thread that runs it and gives it back after (auth.connected; pooled on PostgreSQL).
"""

import logging
from dataclasses import dataclass

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, RedirectResponse, Response
from peewee import InterfaceError, OperationalError
from prometheus_client import CONTENT_TYPE_LATEST
from urllib.parse import quote

from .. import browse, report
from ..config import Config
from ..errors import Refused
from ..studies import rights
from . import api, dicomweb, metrics, pages
from .auth import Auth, BadCsrf, SignInNeeded, connected
from .counts import Counts

LOGGER = logging.getLogger(__name__)


@dataclass
class Web:
    """What the routes share: the config, the sign-in machinery of this one app, and the
    databases' counts (made in the background once the server starts it)."""
    config: Config
    auth: Auth
    counts: Counts


def create_app(config: Config) -> FastAPI:
    hours = config.http.session_hours if config.http is not None else 12.0
    web = Web(config, Auth(hours * 3600), Counts())
    app = FastAPI(title="dicom-watcher", summary="The Import database and the study databases",
                  docs_url="/api/docs", redoc_url=None, openapi_url="/api/openapi.json")
    app.state.web = web
    registry = metrics.registry(config)

    @app.get("/healthz", response_class=PlainTextResponse, include_in_schema=False)
    def healthz():
        """What ``status --check`` says: 200 when a service reported lately, none is paused and
        the archive has room; else 503, with the reason."""
        try:
            with connected():
                ok, why = report.health(config)
        except (OperationalError, InterfaceError) as exc:
            ok, why = False, f"the database does not answer: {exc}"
        return PlainTextResponse(why + "\n", status_code=200 if ok else 503)

    @app.get("/metrics", include_in_schema=False)
    def metrics_():
        with connected():
            return Response(metrics.scrape(registry), media_type=CONTENT_TYPE_LATEST)

    app.include_router(api.router(web))
    app.include_router(dicomweb.router(web))
    app.include_router(pages.router(web))
    _errors(app)
    return app


def _errors(app: FastAPI) -> None:
    def answer(request: Request, status: int, message: str):
        if _for_programs(request):
            headers = {"WWW-Authenticate": "Bearer"} if status == 401 else None
            return JSONResponse({"detail": message}, status_code=status, headers=headers)
        return pages.render(request, "error.html", status_code=status, status=status, message=message)

    @app.exception_handler(SignInNeeded)
    def sign_in(request: Request, exc: SignInNeeded):
        if _for_programs(request) or request.method != "GET":
            return answer(request, 401, str(exc))
        target = request.url.path + (f"?{request.url.query}" if request.url.query else "")
        return RedirectResponse("/login?next=" + quote(target, safe=""), status_code=303)

    @app.exception_handler(BadCsrf)
    def bad_csrf(request: Request, exc: BadCsrf):
        return answer(request, 403, str(exc))

    @app.exception_handler(rights.NotVisible)
    @app.exception_handler(browse.NotFound)
    def not_found(request: Request, exc: Refused):
        return answer(request, 404, str(exc))

    @app.exception_handler(dicomweb.NotAcceptable)
    def not_acceptable(request: Request, exc: Refused):
        return answer(request, 406, str(exc))

    @app.exception_handler(rights.Forbidden)
    def forbidden(request: Request, exc: Refused):
        return answer(request, 403, str(exc))

    @app.exception_handler(Refused)
    def refused(request: Request, exc: Refused):
        return answer(request, 400, str(exc))

    @app.exception_handler(OperationalError)
    @app.exception_handler(InterfaceError)
    def unavailable(request: Request, exc: Exception):
        LOGGER.warning("web: the database did not answer %s %s: %s", request.method, request.url.path, exc)
        return answer(request, 503, "the database is not available; try again in a moment")


def _for_programs(request: Request) -> bool:
    """The API and DICOMweb answer in JSON (401 asks for a token); the pages in HTML."""
    return request.url.path.startswith(("/api/", "/dicom-web/"))


__all__ = ["Web", "create_app"]
