"""The docs pages work without internet, and the schema behind them documents each task.

/docs and /redoc reference only this server's own asset URLs (no CDN, no Google Fonts);
those assets answer with JavaScript and CSS. /openapi.json gives every task route a
request example and declares the error statuses a client must handle.
"""

from __future__ import annotations

import re
from typing import Any

import httpx
import pytest

pytestmark = pytest.mark.anyio

TASK_PATHS = ["/classify", "/translate", "/summarize", "/embed"]
ASSET_TYPES = {".js": "javascript", ".css": "text/css", ".png": "image/png"}
PAGE_MARKERS = {"/docs": "SwaggerUIBundle", "/redoc": "<redoc"}


def local_assets(html: str) -> list[str]:
    return re.findall(r'(?:src|href)="([^"]+)"', html)


@pytest.mark.parametrize("page", ["/docs", "/redoc"])
async def test_docs_pages_reference_only_this_servers_assets(client: httpx.AsyncClient, page: str) -> None:
    response = await client.get(page)
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/html")
    html = response.text
    assert PAGE_MARKERS[page] in html
    # Any absolute URL would be another host: a CDN, a font service, a favicon elsewhere.
    assert re.findall(r"(?:https?:)?//[\w.-]+\.\w+", html) == []
    assert "fonts.googleapis" not in html
    assets = local_assets(html)
    assert assets and all(url.startswith("/docs/static/") for url in assets), assets
    assert "default-src 'self'" in response.headers["content-security-policy"]


@pytest.mark.parametrize("page", ["/docs", "/redoc"])
async def test_docs_assets_are_served_from_the_installed_package(client: httpx.AsyncClient, page: str) -> None:
    html = (await client.get(page)).text
    for url in local_assets(html):
        response = await client.get(url)
        assert response.status_code == 200, url
        suffix = url[url.rindex(".") :]
        assert ASSET_TYPES[suffix] in response.headers["content-type"], url
        assert len(response.content) > 1000, url


async def test_swagger_bundle_is_javascript_and_its_css_is_css(client: httpx.AsyncClient) -> None:
    js = await client.get("/docs/static/swagger-ui-bundle.js")
    assert "SwaggerUIBundle" in js.text
    css = await client.get("/docs/static/swagger-ui.css")
    assert ".swagger-ui" in css.text
    redoc = await client.get("/docs/static/redoc.standalone.js")
    assert "Redoc" in redoc.text


async def test_unknown_docs_asset_is_a_404_in_the_error_shape(client: httpx.AsyncClient) -> None:
    response = await client.get("/docs/static/secrets.txt")
    assert response.status_code == 404
    body = response.json()
    assert body["error"] == "not_found"
    assert "secrets.txt" in body["message"]


def resolve(schema: dict[str, Any], spec: dict[str, Any]) -> dict[str, Any]:
    ref = schema.get("$ref")
    if ref is None:
        return schema
    node: Any = spec
    for part in ref.removeprefix("#/").split("/"):
        node = node[part]
    return dict(node)


def request_examples(operation: dict[str, Any], spec: dict[str, Any]) -> list[Any]:
    media = operation["requestBody"]["content"]["application/json"]
    examples = [media["example"]] if "example" in media else []
    examples += [e["value"] for e in media.get("examples", {}).values()]
    return examples + list(resolve(media["schema"], spec).get("examples", []))


async def test_openapi_gives_every_task_a_request_example(client: httpx.AsyncClient) -> None:
    spec = (await client.get("/openapi.json")).json()
    for path in TASK_PATHS:
        operation = spec["paths"][path]["post"]
        assert operation.get("summary"), path
        assert request_examples(operation, spec), f"POST {path} has no request example"
    # The browser test runs this one from the docs page as it stands.
    assert request_examples(spec["paths"]["/classify"]["post"], spec)[0] == {"inputs": "I love this movie"}


async def test_openapi_documents_the_error_statuses_with_an_example_body(client: httpx.AsyncClient) -> None:
    spec = (await client.get("/openapi.json")).json()
    for path in TASK_PATHS:
        responses = spec["paths"][path]["post"]["responses"]
        for status in ["200", "400", "404", "422", "429", "503", "504"]:
            assert status in responses, f"POST {path} does not document {status}"
        for status in ["400", "404", "422", "429", "503", "504"]:
            media = responses[status]["content"]["application/json"]
            assert resolve(media["schema"], spec)["title"] == "ErrorBody", (path, status)
            assert {"error", "message"} <= set(media["example"]), (path, status)


async def test_docs_pages_are_not_operations_in_the_schema(client: httpx.AsyncClient) -> None:
    spec = (await client.get("/openapi.json")).json()
    assert not [path for path in spec["paths"] if path.startswith(("/docs", "/redoc"))]
