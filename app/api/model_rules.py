"""What each catalog model accepts on a task route, stated in the OpenAPI document.

A task route declares the endpoint it serves (``openapi_extra=serves(Endpoint.embed)``).
When the document is built (app/api/openapi.py), its body's ``model`` lists the catalog
models that can serve that endpoint (app/tasks.py ``can_serve``), and an ``anyOf`` states
what each of them takes beside, one branch per group of models alike: a zero-shot model
takes no ``function_to_apply``, a translation model its own languages, an embedding model
its own vector size as ``dimensions``, a fill-mask model only texts holding its mask token.
The branch that takes ``null`` for ``model`` is the endpoint's default (app/service/choice.py),
which answers a body that names none. The server checks every one of these rules, the service
(app/service) or, for the mask token, the fill-mask runner, answering 404 or 400 with what to
send instead; this module states them, from the same catalog, so that a body the document
allows is one the server answers.
"""

from __future__ import annotations

import copy
import json
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from app.catalog import Catalog, EmbeddingEntry, Entry, FillMaskEntry, TranslationEntry, ZeroShotEntry
from app.errors import ModelNotFound
from app.registry.sources import declared_mask_token, declared_width
from app.service.choice import ModelChoice
from app.tasks import Endpoint, can_serve

ENDPOINT_KEY = "x-endpoint"
NULL = {"type": "null"}
Schema = dict[str, Any]


def serves(endpoint: Endpoint) -> dict[str, Any]:
    """A task route's ``openapi_extra``: the endpoint whose models its body's ``model`` takes."""
    return {ENDPOINT_KEY: endpoint.value}


@dataclass(frozen=True)
class Situation:
    """Where a body meets ``condition``, the models (and the default) of ``endpoint`` answer it."""

    endpoint: Endpoint
    condition: Schema = field(default_factory=dict)
    # Without a model, the body itself picks among all of them (/translate: by its languages).
    picked_by_body: bool = False


def _at(path: tuple[str, ...], schema: Schema, required: bool = False) -> Schema:
    """``schema`` for the field at ``path`` in nested objects (the objects required too if asked)."""
    for name in reversed(path):
        schema = {"properties": {name: schema}, **({"required": [name]} if required else {})}
    return schema


LABELS = ("parameters", "candidate_labels")
# /classify answers with a zero-shot model where the body brings labels (app/service/service.py).
SITUATIONS: dict[Endpoint, tuple[Situation, ...]] = {
    Endpoint.classify: (
        Situation(Endpoint.classify, _at(LABELS, NULL)),
        Situation(Endpoint.zero_shot, _at(LABELS, {"type": "array"}, required=True)),
    ),
    # By its languages: a translation entry's only rule is its languages, so "any entry whose
    # rules the body meets" is exactly the one the service finds (or the default, without them).
    Endpoint.translate: (Situation(Endpoint.translate, picked_by_body=True),),
}


# -- what one entry takes, where the body has the field -----------------------------------


def _no_function_to_apply(entry: Entry, fields: Schema) -> Schema | None:
    if isinstance(entry, ZeroShotEntry) and "parameters" in fields:
        return _at(("parameters", "function_to_apply"), NULL)
    return None


def _languages(entry: Entry, fields: Schema) -> Schema | None:
    if isinstance(entry, TranslationEntry) and {"source_lang", "target_lang"} <= fields.keys():
        return {
            "properties": {
                "source_lang": {"enum": [entry.source_lang, None]},
                "target_lang": {"enum": [entry.target_lang, None]},
            }
        }
    return None


def _dimensions(entry: Entry, fields: Schema) -> Schema | None:
    width = declared_width(entry) if isinstance(entry, EmbeddingEntry) and "dimensions" in fields else None
    return None if width is None else {"properties": {"dimensions": {"enum": [width, None]}}}


def _mask_token(entry: Entry, fields: Schema) -> Schema | None:
    mask = declared_mask_token(entry) if isinstance(entry, FillMaskEntry) and "inputs" in fields else None
    if mask is None:
        return None
    # pattern holds for one text, items for a list: each text holds the token.
    return {"properties": {"inputs": {"pattern": re.escape(mask), "items": {"pattern": re.escape(mask)}}}}


RULES: tuple[Callable[[Entry, Schema], Schema | None], ...] = (
    _no_function_to_apply,
    _languages,
    _dimensions,
    _mask_token,
)


# -- the document -------------------------------------------------------------------------


def state_model_rules(document: Schema, catalog: Catalog, choice: ModelChoice) -> None:
    """Each marked route's body: its models listed, and what each takes (see the module)."""

    def default_for(endpoint: Endpoint) -> str | None:
        try:
            return choice.default_for(endpoint)
        except ModelNotFound:  # the catalog has none: such a body answers 404
            return None

    schemas = document.get("components", {}).get("schemas", {})
    stated: dict[str, Endpoint] = {}
    for path, operations in document["paths"].items():
        for operation in operations.values():
            if ENDPOINT_KEY not in operation:
                continue
            endpoint = Endpoint(operation[ENDPOINT_KEY])
            ref = operation["requestBody"]["content"]["application/json"]["schema"]["$ref"]
            name = ref.rsplit("/", 1)[1]
            if stated.setdefault(name, endpoint) is not endpoint:
                raise RuntimeError(f"{path} shares its body {name} with a route of another endpoint; give it its own")
            _state(schemas[name], endpoint, catalog, default_for)


def _state(body: Schema, endpoint: Endpoint, catalog: Catalog, default_for: Callable[[Endpoint], str | None]) -> None:
    fields = body["properties"]
    if "model" not in fields or "anyOf" in body:
        return  # stated already (one body under several routes), or no model to state
    situations = SITUATIONS.get(endpoint, (Situation(endpoint),))
    names = [e.name for e in catalog.models if any(can_serve(e, s.endpoint) for s in situations)]
    if not names:
        return  # every request answers 404, naming the catalog's missing entry
    fields["model"] = _listing(fields["model"], names)
    branches = [b for s in situations for b in _branches(s, catalog, fields, default_for(s.endpoint))]
    if len(branches) > 1 or set(branches[0]) - {"properties", "required"} or len(branches[0]["properties"]) > 1:
        body["anyOf"] = branches


def _listing(field_schema: Schema, names: list[str]) -> Schema:
    """The ``model`` field, taking these names (and null, where it did)."""
    kept = {k: v for k, v in field_schema.items() if k in ("title", "description", "default")}
    listed = {"type": "string", "enum": names}
    if NULL in field_schema.get("anyOf", []):
        return {"anyOf": [listed, NULL], **kept}
    return {**listed, **kept}


def _branches(situation: Situation, catalog: Catalog, fields: Schema, default: str | None) -> list[Schema]:
    """One branch per group of the situation's models that take the same rules."""
    groups: dict[str, tuple[Schema, list[str | None]]] = {}
    for entry in catalog.models:
        if not can_serve(entry, situation.endpoint):
            continue
        rules = _merged(*(rule for make in RULES if (rule := make(entry, fields)) is not None))
        _, models = groups.setdefault(json.dumps(rules, sort_keys=True), (rules, []))
        models.append(entry.name)
        if (situation.picked_by_body or entry.name == default) and None not in models:
            models.append(None)
    branches = []
    for rules, models in groups.values():
        models.sort(key=lambda name: name is None)  # null last, after the names
        named = {"properties": {"model": {"enum": models}}}
        # Without null, a body must name one of them: a body without a model is the default's.
        required = {} if None in models else {"required": ["model"]}
        branches.append(_merged(situation.condition, rules, named, required))
    return branches


def _merged(*schemas: Schema) -> Schema:
    """Schemas that constrain different fields, as one (their ``properties`` merged deeply)."""
    out: Schema = {}
    for schema in schemas:
        for key, value in schema.items():
            if key == "properties":
                fields = out.setdefault("properties", {})
                for name, sub in value.items():
                    fields[name] = _merged(fields.get(name, {}), sub)
            elif key == "required":
                out["required"] = [*out.get("required", []), *(n for n in value if n not in out.get("required", []))]
            elif key in out and out[key] != value:
                raise ValueError(f"two rules disagree on {key!r}: {out[key]!r} and {value!r}")
            else:
                out[key] = copy.deepcopy(value)
    return out
