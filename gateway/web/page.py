"""``GET /``: the dashboard page and its static files, with the headers that keep it safe."""

from __future__ import annotations

from importlib import resources
from pathlib import Path

from aiohttp import web


def static_dir() -> Path:
    """Where the page's files are installed."""
    return Path(str(resources.files("gateway") / "static"))


PAGE_HEADERS = {
    # Revalidate page files so an upgraded gateway never mixes old and new modules.
    "Cache-Control": "no-cache",
    # The page loads nothing from elsewhere; say so, so an injected script cannot.
    "Content-Security-Policy": (
        "default-src 'self'; img-src 'self' data:; connect-src 'self'; "
        "frame-ancestors 'none'; base-uri 'none'; form-action 'self'"
    ),
    "X-Content-Type-Options": "nosniff",
    # An old link with ?token= must not pass the token on through Referer (the
    # page says so in a meta tag too; the header covers what loads before it).
    "Referrer-Policy": "no-referrer",
}


async def page_headers(request: web.Request, response: web.StreamResponse) -> None:
    """``on_response_prepare``: the page's headers on ``/`` and ``/static/``."""
    if request.path == "/" or request.path.startswith("/static/"):
        response.headers.update(PAGE_HEADERS)


async def index(request: web.Request) -> web.StreamResponse:
    """``GET /``: the dashboard page (it takes its token from the address's fragment)."""
    return web.FileResponse(static_dir() / "index.html")
