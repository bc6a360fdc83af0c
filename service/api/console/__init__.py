"""The web console: static ES modules served by the gateway itself (no build step, no CDN).

Everything the console shows comes from the public API, called from the browser with the key the user
signed in with; this package only hands out files and holds no privilege of its own.
"""

from __future__ import annotations

import json
from pathlib import Path

from actprompt.states import TERMINAL_JOB_STATES, EvaluationStatus, JobStatus
from fastapi import APIRouter, FastAPI
from fastapi.responses import FileResponse, RedirectResponse, Response
from fastapi.staticfiles import StaticFiles

STATIC_DIR = Path(__file__).parent / "static"
CONSOLE_PATH = "/console"

router = APIRouter(include_in_schema=False)

#: The page must never be cached past a deploy; the modules are small and revalidated (ETag) each load.
_NO_STORE = {"Cache-Control": "no-cache"}
#: Only the console's own origin may run scripts or be called: a hostile page cannot be framed or injected.
_CSP = (
    "default-src 'self'; img-src 'self' blob: data:; style-src 'self'; script-src 'self'; "
    "connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'none'"
)


@router.get(CONSOLE_PATH)
def console_index() -> FileResponse:
    return FileResponse(
        STATIC_DIR / "index.html",
        media_type="text/html",
        headers={**_NO_STORE, "Content-Security-Policy": _CSP, "X-Content-Type-Options": "nosniff"},
    )


@router.get(CONSOLE_PATH + "/", include_in_schema=False)
def console_slash() -> RedirectResponse:
    return RedirectResponse(CONSOLE_PATH, status_code=308)


def _states_module() -> str:
    """The state lists as an ES module, from the one enum the API uses, so the console never copies them."""
    jobs = [s.value for s in JobStatus]
    return (
        f"export const JOB_STATES = {json.dumps(jobs)};\n"
        f"export const TERMINAL = new Set({json.dumps([s for s in jobs if s in TERMINAL_JOB_STATES])});\n"
        f"export const EVALUATION_STATES = {json.dumps([s.value for s in EvaluationStatus])};\n"
    )


@router.get(CONSOLE_PATH + "/static/states.js")  # ahead of the static mount: generated, not on disk
def console_states() -> Response:
    return Response(_states_module(), media_type="text/javascript", headers=_NO_STORE)


def install_console(app: FastAPI) -> None:
    """`GET /console` and its assets under `/console/static/`."""
    app.include_router(router)
    app.mount(CONSOLE_PATH + "/static", StaticFiles(directory=STATIC_DIR), name="console-static")
