"""The docs pages: Swagger UI at /docs and ReDoc at /redoc, served without any CDN.

The service often runs where there is no internet, so the pages' JavaScript, CSS and
favicon come from the installed ``fastapi-offline`` package (it ships the Swagger UI and
ReDoc bundles) and are served under /docs/static. No page references another host:
ReDoc's Google Fonts link is switched off, the favicon is local, and a
Content-Security-Policy stops the bundles themselves from fetching elsewhere.
"""

from __future__ import annotations

from importlib.resources import files
from pathlib import Path

from fastapi import APIRouter, HTTPException, Request
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse

router = APIRouter(include_in_schema=False)
OPENAPI_URL = "/openapi.json"

STATIC_URL = "/docs/static"
ASSET_DIR = Path(str(files("fastapi_offline").joinpath("static")))
# Only these files are served: a fixed table, not a directory listing.
ASSETS: dict[str, str] = {
    "swagger-ui-bundle.js": "text/javascript",
    "swagger-ui.css": "text/css",
    "redoc.standalone.js": "text/javascript",
    "favicon.png": "image/png",
}
# The browser itself refuses anything from another host. ReDoc's sidebar links a logo
# on its CDN; blocked, the image hides itself.
CONTENT_SECURITY_POLICY = "; ".join(
    [
        "default-src 'self'",
        "script-src 'self' 'unsafe-inline'",  # the pages start the UI from an inline script
        "style-src 'self' 'unsafe-inline'",
        "img-src 'self' data:",
        "font-src 'self' data:",
        "worker-src 'self' blob:",
        "connect-src 'self'",
    ]
)


def _static(request: Request, name: str) -> str:
    return f"{request.scope.get('root_path', '')}{STATIC_URL}/{name}"


def _openapi_url(request: Request) -> str:
    return f"{request.scope.get('root_path', '')}{OPENAPI_URL}"


@router.get(OPENAPI_URL)
async def openapi_schema(request: Request) -> JSONResponse:
    """The schema, served here (not by FastAPI) so that API keys can guard it like any route."""
    return JSONResponse(request.app.openapi())


@router.get("/docs")
async def swagger_ui(request: Request) -> HTMLResponse:
    page = get_swagger_ui_html(
        openapi_url=_openapi_url(request),
        title=f"{request.app.title} - Swagger UI",
        swagger_js_url=_static(request, "swagger-ui-bundle.js"),
        swagger_css_url=_static(request, "swagger-ui.css"),
        swagger_favicon_url=_static(request, "favicon.png"),
        oauth2_redirect_url=None,
        swagger_ui_parameters=request.app.swagger_ui_parameters,
    )
    page.headers["Content-Security-Policy"] = CONTENT_SECURITY_POLICY
    return page


@router.get("/redoc")
async def redoc(request: Request) -> HTMLResponse:
    page = get_redoc_html(
        openapi_url=_openapi_url(request),
        title=f"{request.app.title} - ReDoc",
        redoc_js_url=_static(request, "redoc.standalone.js"),
        redoc_favicon_url=_static(request, "favicon.png"),
        with_google_fonts=False,
    )
    page.headers["Content-Security-Policy"] = CONTENT_SECURITY_POLICY
    return page


@router.get(STATIC_URL + "/{name}")
async def asset(name: str) -> FileResponse:
    media_type = ASSETS.get(name)
    if media_type is None:
        raise HTTPException(status_code=404, detail=f"no docs asset named '{name}'")
    # The bundles change only with the package version: let browsers keep them a day.
    return FileResponse(ASSET_DIR / name, media_type=media_type, headers={"Cache-Control": "public, max-age=86400"})
