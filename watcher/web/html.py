"""The pages' one way to answer: a Jinja2 template of templates/, rendered for a request.

No page is kept by the browser (``Cache-Control: no-store``): after signing out, the back
button asks the server again, and finds the sign-in form, not what the account saw."""

from pathlib import Path

from fastapi import Request
from fastapi.responses import HTMLResponse
from fastapi.templating import Jinja2Templates

TEMPLATES = Jinja2Templates(directory=str(Path(__file__).with_name("templates")))


def render(request: Request, name: str, status_code: int = 200, **context) -> HTMLResponse:
    return TEMPLATES.TemplateResponse(request, name, context, status_code=status_code,
                                      headers={"Cache-Control": "no-store"})


__all__ = ["TEMPLATES", "render"]
