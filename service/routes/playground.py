"""GET /: the playground, a static page that watches the canvas converge over the WebSocket API.

The page, its JavaScript modules and its stylesheet live in `service/static/` and are served from here
(no build step, no CDN): `GET /` is the page, `GET /static/<name>` one of its files. Only the files that
are in that folder can be served (the names are listed once, at import). The page itself needs no API
key; what it calls (`/v1/models`, `/ws/generate`) does, and the page asks for the key when it is needed.
"""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter, HTTPException
from fastapi.responses import FileResponse

STATIC_DIR = Path(__file__).resolve().parent.parent / "static"
MEDIA_TYPES = {
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".svg": "image/svg+xml",
    ".png": "image/png",
    ".ico": "image/x-icon",
}
# revalidate every time (cheap: ETag / Last-Modified), so a changed page is never served stale
HEADERS = {"Cache-Control": "no-cache", "X-Content-Type-Options": "nosniff"}
PAGE_HEADERS = {
    **HEADERS,
    # everything comes from this origin; the WebSocket goes to this host (ws: or wss:)
    "Content-Security-Policy": "default-src 'self'; connect-src 'self' ws: wss:; img-src 'self' data:; "
                               "style-src 'self'; script-src 'self'; base-uri 'none'; form-action 'none'; "
                               "frame-ancestors 'none'",
    "Referrer-Policy": "no-referrer",
}

router = APIRouter(tags=["playground"])


def _files() -> dict[str, Path]:
    if not STATIC_DIR.is_dir():
        return {}
    return {p.name: p for p in STATIC_DIR.iterdir() if p.is_file() and p.suffix in MEDIA_TYPES}


FILES = _files()


@router.api_route("/", methods=["GET", "HEAD"], include_in_schema=False)
async def page() -> FileResponse:
    index = FILES.get("index.html")
    if index is None:
        raise HTTPException(status_code=404, detail="the playground is not installed (service/static/index.html)")
    return FileResponse(index, media_type=MEDIA_TYPES[".html"], headers=PAGE_HEADERS)


@router.api_route("/static/{name}", methods=["GET", "HEAD"], include_in_schema=False)
async def static_file(name: str) -> FileResponse:
    path = FILES.get(name)
    if path is None:
        raise HTTPException(status_code=404, detail=f"no static file {name!r}")
    return FileResponse(path, media_type=MEDIA_TYPES[path.suffix], headers=HEADERS)
