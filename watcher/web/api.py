"""The JSON API under /api/: databases, their studies, series and instances, a study's
originals as a zip, and distribution. Every question goes through rights.require: a database
the account has no right on answers 404 everywhere, exactly like one that does not exist."""

from typing import Literal

from fastapi import APIRouter, Request
from fastapi.responses import StreamingResponse
from pydantic import BaseModel, ConfigDict, Field

from .. import browse
from ..models import IMPORT
from ..studies import databases, distribute, rights
from .auth import connected
from .download import sent_ahead, zip_stream


class DistributeRequest(BaseModel):
    model_config = ConfigDict(populate_by_name=True, extra="forbid")
    keys: list[str] = Field(min_length=1, description="Study Instance UIDs (or Series Instance "
                            "UIDs, Patient IDs: see kind)")
    to: str = Field(description="the study database to move (or copy) them into")
    source: str = Field(IMPORT, alias="from", description="the database they are in")
    kind: Literal["study", "series", "patient"] = "study"
    copy_: bool = Field(False, alias="copy", description="keep them in the source too")
    dry_run: bool = False


def router(web) -> APIRouter:
    api = APIRouter(prefix="/api", tags=["api"])

    @api.get("/databases")
    def list_databases(request: Request) -> list[dict]:
        """The databases this account may read, with their counts."""
        with connected():
            user = web.auth.api_user(request)
            visible = set(rights.readable_databases(user))
            return [{k: v for k, v in d.items() if k != "id"} | {"level": rights.level_of(user, d["name"])}
                    for d in databases.listing() if d["name"] in visible]

    @api.get("/databases/{db}/studies")
    def list_studies(request: Request, db: str, patient: str = "", date: str = "",
                     modality: str = "", description: str = "", limit: int = 50,
                     offset: int = 0) -> dict:
        """The studies of a database, newest first, searched and a page at a time: ``patient``
        (part of the Patient ID or name), ``date`` (YYYYMMDD or a range YYYYMMDD-YYYYMMDD),
        ``modality``, ``description`` (part of it)."""
        with connected():
            row = rights.require(web.auth.api_user(request), "browse", db)
            return browse.studies(row.id, patient, date, modality, description, limit, offset)

    @api.get("/databases/{db}/studies/{uid}")
    def get_study(request: Request, db: str, uid: str) -> dict:
        """One study: its series, and where its instances came from (creator, origin, who
        distributed them from where and when)."""
        with connected():
            row = rights.require(web.auth.api_user(request), "browse", db)
            return browse.study(row.id, uid)

    @api.get("/databases/{db}/studies/{uid}/series")
    def list_series(request: Request, db: str, uid: str) -> list[dict]:
        with connected():
            row = rights.require(web.auth.api_user(request), "browse", db)
            return browse.study(row.id, uid)["series_list"]

    @api.get("/databases/{db}/studies/{uid}/instances")
    def list_instances(request: Request, db: str, uid: str) -> list[dict]:
        with connected():
            row = rights.require(web.auth.api_user(request), "browse", db)
            return browse.instances(row.id, uid)

    @api.get("/databases/{db}/studies/{uid}/series/{series_uid}/instances")
    def list_series_instances(request: Request, db: str, uid: str, series_uid: str) -> list[dict]:
        with connected():
            row = rights.require(web.auth.api_user(request), "browse", db)
            return browse.instances(row.id, uid, series_uid)

    @api.get("/databases/{db}/studies/{uid}/archive", response_class=StreamingResponse)
    def download(request: Request, db: str, uid: str):
        """The study's originals, byte for byte, as a zip (``<series>/<sop>.dcm``), streamed."""
        with connected():
            row = rights.require(web.auth.api_user(request), "download", db)
            files = browse.originals(row.id, uid)
        name = "".join(c for c in uid if c.isdigit() or c == ".") or "study"
        return StreamingResponse(sent_ahead(zip_stream(web.config.archive.dir, files)),
                                 media_type="application/zip",
                                 headers={"Content-Disposition": f'attachment; filename="{name}.zip"'})

    @api.post("/distribute")
    def post_distribute(request: Request, body: DistributeRequest) -> dict:
        """Move (``copy``: copy) studies, series or patients from one database into another:
        needs read on the source and write on the target (a manager may everywhere).
        ``dry_run``: say what would move, move nothing."""
        with connected():
            user = web.auth.api_user(request, posting=True)
            source = rights.require(user, "distribute-from", body.source)
            target = rights.require(user, "distribute-into", body.to)
            unknown = browse.missing(body.kind, body.keys, source.id)
            unknown = browse.missing(body.kind, unknown, target.id) if unknown else []
            if unknown:  # (said here: the command's message names the databases that hold them)
                raise browse.NotFound(f"not in {body.source!r} (nor in {body.to!r}): "
                                      f"{', '.join(unknown[:10])}; nothing was moved")
            return distribute.distribute(body.keys, body.to, body.source, body.kind, body.copy_,
                                         body.dry_run, actor=f"{user.name} (web)")

    return api


__all__ = ["DistributeRequest", "router"]
