"""DICOMweb, one root per study database: ``/dicom-web/{database}/``, so that any DICOMweb
client (a viewer, another archive, ``replicate``) can be pointed at one database.

- QIDO-RS: ``studies``, ``series``, ``instances`` at every level (watcher/qido.py);
- WADO-RS: a study, a series or an instance as its stored originals, byte for byte, in
  ``multipart/related; type="application/dicom"``; never transcoded, so a request for another
  transfer syntax than the stored one is answered 406;
- STOW-RS: ``POST studies`` (or ``studies/{uid}``) stores uploads (watcher/upload.py) into the
  database, the uploader recorded as their creator.

Rights as everywhere (studies/rights.py): browse to search, download to retrieve, upload to
store; a database the account may not read answers 404, like one that does not exist.
"""

import logging

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.concurrency import run_in_threadpool
from starlette.requests import ClientDisconnect

from .. import archive, multipart, qido, statuses, upload
from ..errors import Refused
from ..studies import rights
from .auth import connected
from .download import read_original, sent_ahead

LOGGER = logging.getLogger(__name__)
DICOM_JSON = "application/dicom+json"


class NotAcceptable(Refused):
    """The client asks for a form we do not serve (another transfer syntax: we never transcode)."""


def router(web) -> APIRouter:
    dw = APIRouter(prefix="/dicom-web/{db}", tags=["dicomweb"])
    archive_dir = web.config.archive.dir

    def root(request: Request, db: str) -> str:
        return str(request.base_url) + f"dicom-web/{db}/"

    def search(request: Request, db: str, find, **where):
        with connected():
            row = rights.require(web.auth.api_user(request), "browse", db)
            found, more = find(row.id, dict(request.query_params), root(request, db), **where)
        headers = {"Warning": f'299 {request.url.hostname}: "There are additional results that '
                              f'can be requested"'} if more else None
        return JSONResponse(found, media_type=DICOM_JSON, headers=headers)

    @dw.get("/studies", summary="QIDO-RS: search for studies")
    def search_studies(request: Request, db: str):
        return search(request, db, qido.studies)

    @dw.get("/series", summary="QIDO-RS: search for series")
    def search_series(request: Request, db: str):
        return search(request, db, qido.series)

    @dw.get("/instances", summary="QIDO-RS: search for instances")
    def search_instances(request: Request, db: str):
        return search(request, db, qido.instances)

    @dw.get("/studies/{study}/series", summary="QIDO-RS: the series of a study")
    def search_study_series(request: Request, db: str, study: str):
        return search(request, db, qido.series, study_uid=study)

    @dw.get("/studies/{study}/instances", summary="QIDO-RS: the instances of a study")
    def search_study_instances(request: Request, db: str, study: str):
        return search(request, db, qido.instances, study_uid=study)

    @dw.get("/studies/{study}/series/{series}/instances", summary="QIDO-RS: the instances of a series")
    def search_series_instances(request: Request, db: str, study: str, series: str):
        return search(request, db, qido.instances, study_uid=study, series_uid=series)

    def retrieve(request: Request, db: str, study: str, series: str | None = None,
                 instance: str | None = None):
        with connected():
            row = rights.require(web.auth.api_user(request), "download", db)
            found = qido.originals(row.id, study, series, instance)
        if not found:
            raise rights.NotVisible(f"no such {'instance' if instance else 'series' if series else 'study'} "
                                    f"in {db!r}")
        _check_accept(request.headers.get("accept", ""), {syntax for *_, syntax in found})
        boundary = multipart.new_boundary()
        parts = (read_original(archive_dir, stored, sha, xxh3, size)
                 for stored, sha, xxh3, size, _ in found)
        # Its length said up front: the body goes as it is, not in chunks that the server would
        # copy each original into and the client take apart again.
        length = multipart.body_length([size for _, _, _, size, _ in found], boundary)
        return StreamingResponse(sent_ahead(multipart.body(parts, boundary)), media_type=(
            f'multipart/related; type="{multipart.DICOM}"; boundary={boundary}'),
            headers={"Content-Length": str(length)})

    @dw.get("/studies/{study}", summary="WADO-RS: a study's originals")
    def retrieve_study(request: Request, db: str, study: str):
        return retrieve(request, db, study)

    @dw.get("/studies/{study}/series/{series}", summary="WADO-RS: a series' originals")
    def retrieve_series(request: Request, db: str, study: str, series: str):
        return retrieve(request, db, study, series)

    @dw.get("/studies/{study}/series/{series}/instances/{instance}", summary="WADO-RS: an original")
    def retrieve_instance(request: Request, db: str, study: str, series: str, instance: str):
        return retrieve(request, db, study, series, instance)

    async def store(request: Request, db: str, study: str | None):
        def allowed():
            with connected():
                user = web.auth.api_user(request, posting=True)
                rights.require(user, "upload", db)
                return user.name
        user = await run_in_threadpool(allowed)
        boundary = multipart.boundary_of(request.headers.get("content-type", ""))
        folder = upload.incoming_folder(web.config)
        parser = multipart.PartsToFiles(folder, boundary, prefix="stow", max_bytes=archive.room(folder))
        try:
            async for chunk in request.stream():
                await run_in_threadpool(parser.feed, chunk)
            parts = parser.close()
        except ClientDisconnect:
            parser.abandon()
            LOGGER.info("upload by %s into %s cut short by the client: nothing stored", user, db)
            return Response(status_code=400)
        except BaseException:
            parser.abandon()
            raise

        def ingest():
            with connected():  # asked again: the account may have been disabled, or its right
                again = web.auth.api_user(request, posting=True)  # revoked, while the body came
                rights.require(again, "upload", db)
                return upload.store_parts(parts, web.config, user, request.client.host if request.client
                                          else "", db, study)
        try:
            result = await run_in_threadpool(ingest)
        finally:
            parser.abandon()  # (each part's file is gone already unless ingest failed early)
        return _stow_answer(result, root(request, db))

    @dw.post("/studies", summary="STOW-RS: store instances")
    async def store_instances(request: Request, db: str):
        return await store(request, db, None)

    @dw.post("/studies/{study}", summary="STOW-RS: store instances of one study")
    async def store_study_instances(request: Request, db: str, study: str):
        return await store(request, db, study)

    return dw


def _check_accept(accept: str, syntaxes: set[str]) -> None:
    """``NotAcceptable`` unless the Accept header admits the originals as they are stored."""
    if not accept.strip():
        return
    for option in accept.split(","):
        kind, params = multipart.media_type(option.strip())
        if kind in ("*/*", "multipart/*"):
            return
        if kind != "multipart/related" or params.get("type", multipart.DICOM).lower() != multipart.DICOM:
            continue
        wanted = params.get("transfer-syntax", "*")
        if wanted == "*" or syntaxes == {wanted}:
            return
    raise NotAcceptable(f"the originals are stored as {', '.join(sorted(syntaxes))} and are served as "
                        f"they are (never transcoded): accept multipart/related; "
                        f"type=\"application/dicom\"; transfer-syntax=*")


def _stow_answer(result: upload.Result, root: str) -> JSONResponse:
    """PS3.18 10.5.3: 200 when every instance is stored, 202 when some are, 409 when none."""
    body: dict = {}
    if result.stored:
        body["00081199"] = {"vr": "SQ", "Value": [
            {"00081150": {"vr": "UI", "Value": [cls]}, "00081155": {"vr": "UI", "Value": [sop]},
             "00081190": {"vr": "UR", "Value": [f"{root}studies/{study}"]}}
            for cls, sop, study, _ in result.stored]}
    if result.failed:
        body["00081198"] = {"vr": "SQ", "Value": [
            {**({"00081150": {"vr": "UI", "Value": [cls]}} if cls else {}),
             **({"00081155": {"vr": "UI", "Value": [sop]}} if sop else {}),
             "00081197": {"vr": "US", "Value": [status]},
             "00000902": {"vr": "LO", "Value": [reason]}}  # ErrorComment: why, for a person
            for cls, sop, status, reason in result.failed]}
    code = 200 if not result.failed else 202 if result.stored else 409
    if result.failed and all(s == statuses.OUT_OF_RESOURCES for _, _, s, _ in result.failed) \
            and not result.stored:
        code = 503  # the archive or the database is away: nothing was stored; send again later
    return JSONResponse(body, status_code=code, media_type=DICOM_JSON)


__all__ = ["router"]
