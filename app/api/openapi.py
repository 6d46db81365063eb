"""The OpenAPI document of one server: what its catalog and settings let a client send.

FastAPI writes the document from the routes; this module then makes it this server's own:
limits marked ``x-limit`` (app.api.fields) take the settings' values, each catalog model
gets its own ``/models/<name>`` path with the Hugging Face body and answer of its task
(app.api.compat_hf), model-name path parameters list the catalog, each task route's body
lists its endpoint's models and what each takes (app.api.model_rules), and with keys the
document says which operations need which kind. What the document says is what the
validators and the service enforce; CI checks it with schemathesis
(tests/test_schema_contract.py).
"""

from __future__ import annotations

import copy
from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from pydantic import TypeAdapter
from pydantic.json_schema import models_json_schema

from app.api.compat_hf import HfTask
from app.api.fields import LIMIT_KEY
from app.api.model_rules import state_model_rules
from app.config import Settings

REF = "#/components/schemas/{model}"
HF_PATH = "/models/{name}"


def build_openapi(app: FastAPI) -> dict[str, Any]:
    """The app's document, built once the app has started (its defaults are the engine's)."""
    if app.openapi_schema is None:
        document = get_openapi(
            title=app.title,
            version=app.version,
            description=app.description,
            routes=app.routes,
            tags=app.openapi_tags,
        )
        settings: Settings = app.state.settings
        _model_paths(document, app.state.hf_tasks)
        _catalog_names(document, sorted(app.state.hf_tasks))
        state_model_rules(document, app.state.catalog, app.state.service.choice)
        _fill_limits(document, settings)
        _security(document, settings)
        app.openapi_schema = document
    return app.openapi_schema


def _model_paths(document: dict[str, Any], tasks: dict[str, HfTask]) -> None:
    """``/models/{name}`` becomes one path per catalog model, each with its own HF body:
    which body a request may carry depends on the model the path names."""
    template = document["paths"].pop(HF_PATH)
    schemas = document.setdefault("components", {}).setdefault("schemas", {})
    # One generation for every body, so that no two models' schemas share a name.
    refs, bodies = models_json_schema([(task.body, "validation") for task in tasks.values()], ref_template=REF)
    _merge(schemas, bodies.get("$defs", {}))
    for name, task in tasks.items():
        body = refs[(task.body, "validation")]["$ref"]
        answer = TypeAdapter(task.adapter.answer).json_schema(ref_template=REF)
        _merge(schemas, answer.pop("$defs", {}))
        describe = _without_name(template["get"], name)
        describe["summary"] = f"Describe {name}"
        infer = _without_name(template["post"], name)
        infer["summary"] = f"{task.task}: {name}"
        infer["requestBody"] = {
            "required": True,
            "content": {"application/json": {"schema": {"$ref": body}, "example": task.adapter.example}},
        }
        infer["responses"]["200"] = {
            "description": f"The HF Inference API answer of {task.task}.",
            "content": {"application/json": {"schema": answer, "example": task.adapter.answer_example}},
        }
        document["paths"][f"/models/{name}"] = {"get": describe, "post": infer}


def _merge(schemas: dict[str, Any], more: dict[str, Any]) -> None:
    """Add component schemas; two different models under one name would leave one of them
    documented for both, so that is a bug, stopped here. (FastAPI writes a model it has
    seen with its own touches: no null defaults, 1.0 for 1; those are the same model.)"""
    for name, schema in more.items():
        if name in schemas and _plain(schemas[name]) != _plain(schema):
            raise RuntimeError(f"two different schemas are named {name!r} in the OpenAPI document; rename one")
        schemas.setdefault(name, schema)


def _plain(node: Any) -> Any:
    if isinstance(node, dict):
        return {k: _plain(v) for k, v in node.items() if not (k == "default" and v is None)}
    if isinstance(node, list):
        return [_plain(v) for v in node]
    if isinstance(node, float) and node.is_integer():
        return int(node)
    return node


def _without_name(operation: dict[str, Any], name: str) -> dict[str, Any]:
    copied = copy.deepcopy(operation)
    copied["parameters"] = [p for p in copied.get("parameters", []) if p.get("name") != "name"]
    if not copied["parameters"]:
        del copied["parameters"]
    copied["operationId"] = f"{copied['operationId']}_{name}"
    return copied


def _catalog_names(document: dict[str, Any], names: list[str]) -> None:
    """A ``{name}`` path parameter takes the catalog's names."""
    for operations in document["paths"].values():
        for operation in operations.values():
            for parameter in operation.get("parameters", []):
                if parameter.get("in") == "path" and parameter.get("name") == "name":
                    parameter["schema"] = {"type": "string", "enum": names, "title": "Name"}


def _fill_limits(node: Any, settings: Settings) -> None:
    """Every ``x-limit`` marker becomes the keywords it names, valued from the settings."""
    if isinstance(node, dict):
        for keyword, setting in node.pop(LIMIT_KEY, {}).items():
            node[keyword] = getattr(settings, setting)
        for value in node.values():
            _fill_limits(value, settings)
    elif isinstance(node, list):
        for value in node:
            _fill_limits(value, settings)


MANAGEMENT = ("/models/{name}/load", "/models/{name}/unload")


def _security(document: dict[str, Any], settings: Settings) -> None:
    """With keys, the document says which operations need which: every one but health an
    inference (or admin) key where TESSERA_API_KEYS is set, loading and unloading an admin key."""
    schemes: dict[str, Any] = {}
    if settings.api_keys:
        schemes["apiKey"] = {"type": "http", "scheme": "bearer", "description": "One of TESSERA_API_KEYS (or admin)."}
        document["security"] = [{"apiKey": []}]
    if settings.admin_keys:
        schemes["adminKey"] = {"type": "http", "scheme": "bearer", "description": "One of TESSERA_ADMIN_KEYS."}
    if not schemes:
        return
    document["components"]["securitySchemes"] = schemes
    for path, operations in document["paths"].items():
        for operation in operations.values():
            if path.startswith("/health/"):
                operation["security"] = []
            elif path in MANAGEMENT and settings.admin_keys:
                operation["security"] = [{"adminKey": []}]
