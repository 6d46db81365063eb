"""A catalog from model names alone: ``python -m app serve --model NAME_OR_PATH`` (or
``TESSERA_MODELS``) serves a hub id or a local ``save_pretrained`` directory without a
catalog file, each model's task read from its own files (TEI's ``--model-id``, vLLM's
``vllm serve MODEL``).

The task comes from the model's ``config.json`` (its architectures and ``id2label``) and
files beside it (a sentence-transformers model is an embedder), or from ``--task``. Each
model becomes its endpoints' default, in the order given. A hub model's config is read from
the hub where it is reachable, else from the local cache; where neither has it, the error
says what to pass. Every process of a server builds the same catalog from the same settings.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from huggingface_hub import hf_hub_download, try_to_load_from_cache

from app.catalog import NAME_PATTERN, Catalog, CatalogError, load_catalog
from app.config import Settings
from app.registry.sources import hf_offline_flag
from app.tasks import TASKS, Endpoint, can_serve

HUB_ID = re.compile(r"[\w.-]+/[\w.-]+")
TASK_NAMES = sorted({f"{t.task}" for t in TASKS})
NLI_LABELS = {"entailment", "contradiction"}
SUMMARIZERS = {"bart", "pegasus", "led", "bigbird_pegasus", "prophetnet"}
OPUS_PAIR = re.compile(r"opus-mt-([a-z]{2,3})-([a-z]{2,3})$")


def catalog_of(settings: Settings) -> Catalog:
    """The catalog this server serves: built from ``settings.models`` when given, else read
    from ``settings.catalog``. Raises CatalogError with what to change."""
    if not settings.models:
        return load_catalog(settings.catalog)
    online = settings.hub != "offline" and not hf_offline_flag()
    entries = [entry_for(spec, settings.task, online) for spec in settings.models]
    names: set[str] = set()
    for entry in entries:  # two models of one name (two folders called "model") get a suffix
        base, n = entry["name"], 2
        while entry["name"] in names:
            entry["name"] = f"{base[:60]}-{n}"
            n += 1
        names.add(entry["name"])
    try:
        catalog = Catalog.model_validate({"models": entries})
    except ValueError as exc:
        raise CatalogError(f"cannot serve {', '.join(settings.models)}: {exc}") from exc
    defaults: dict[Endpoint, list[str]] = {}
    for endpoint in Endpoint:
        served = [m.name for m in catalog.models if can_serve(m, endpoint)]
        if served:
            defaults[endpoint] = served
    return catalog.model_copy(update={"defaults": defaults})


def entry_for(spec: str, task: str | None, online: bool) -> dict[str, Any]:
    """A catalog entry for one ``--model``: a local directory or a hub id."""
    path = Path(spec).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise CatalogError(f"{spec}: no config.json in that directory; pass a save_pretrained model directory")
        source: dict[str, Any] = {"path": str(path.resolve())}
        name = path.resolve().name
        files = {p.name for p in path.iterdir()}
        config = _json(path / "config.json")
        tokenizer = _json(path / "tokenizer_config.json")
    elif HUB_ID.fullmatch(spec):
        source, name = {"hub": spec}, spec.rsplit("/", 1)[1]
        config, files = _hub_json(spec, "config.json", online), set()
        tokenizer = _hub_json(spec, "tokenizer_config.json", online) if config else {}
        if config and _hub_json(spec, "modules.json", online):
            files.add("modules.json")
        if not config and task is None:
            where = "the hub is not reachable from here" if not online else "the hub did not give it"
            raise CatalogError(
                f"{spec}: cannot read its config.json ({where}, and it is not in the local cache): pass "
                f"--task TASK ({', '.join(TASK_NAMES)}) to serve it anyway (it loads once the hub is "
                f"reachable), or download it first where the hub is reachable: TESSERA_MODELS={spec} python -m "
                "app download"
            )
    else:
        raise CatalogError(
            f"{spec}: neither a local model directory nor a hub id ('org/name'); pass a save_pretrained "
            "directory or a Hugging Face model id"
        )
    fields = _task_fields(spec, task, config or {}, files, tokenizer or {}, name)
    return {"name": _name(name), "source": source, **fields}


def _task_fields(
    spec: str, task: str | None, config: dict[str, Any], files: set[str], tokenizer: dict[str, Any], name: str
) -> dict[str, Any]:
    """The entry's task and what that task needs, from ``--task`` or the model's files."""
    architectures = " ".join(config.get("architectures") or [])
    model_type = str(config.get("model_type", ""))
    labels = {str(v).lower() for v in (config.get("id2label") or {}).values()}
    if task is None:
        task = _inferred_task(spec, architectures, model_type, labels, files)
    if task not in TASK_NAMES:
        raise CatalogError(f"--task {task}: not a task this server serves; one of {', '.join(TASK_NAMES)}")
    if task == "zero-shot-classification":
        return {"task": task, "engine": "nli" if labels >= NLI_LABELS or not labels else "similarity"}
    if task == "summarization":
        return {"task": task, "prefix": "summarize: " if model_type == "t5" else ""}
    if task == "translation":
        pair = _language_pair(tokenizer, name)
        if pair is None:
            raise CatalogError(
                f"{spec}: a translation model whose languages its files do not say; serve it from a catalog "
                "(TESSERA_CATALOG) entry with source_lang and target_lang"
            )
        return {"task": task, "source_lang": pair[0], "target_lang": pair[1]}
    return {"task": task}


def _inferred_task(spec: str, architectures: str, model_type: str, labels: set[str], files: set[str]) -> str:
    if "modules.json" in files or "config_sentence_transformers.json" in files:
        return "embedding"
    if "ForSequenceClassification" in architectures:
        return "zero-shot-classification" if labels >= NLI_LABELS else "text-classification"
    if "ForMaskedLM" in architectures:
        return "fill-mask"
    if model_type == "marian" or "MTModel" in architectures:
        return "translation"
    if model_type in SUMMARIZERS:
        return "summarization"
    if architectures and architectures.split()[0].endswith("Model") and "ForConditionalGeneration" not in architectures:
        return "embedding"  # an encoder without a head: its pooled hidden states
    what = architectures or (f"model_type '{model_type}'" if model_type else "no architectures in its config")
    raise CatalogError(f"{spec}: cannot tell its task from {what}; pass --task ({', '.join(TASK_NAMES)})")


def _language_pair(tokenizer: dict[str, Any], name: str) -> tuple[str, str] | None:
    source, target = tokenizer.get("source_lang"), tokenizer.get("target_lang")
    if isinstance(source, str) and isinstance(target, str) and source and target:
        return source[:12], target[:12]
    match = OPUS_PAIR.search(name.lower())
    return (match[1], match[2]) if match else None


def _name(raw: str) -> str:
    name = re.sub(r"[^A-Za-z0-9._-]+", "-", raw).strip("-._")[:64] or "model"
    return name if re.fullmatch(NAME_PATTERN, name) else f"m-{name}"[:64]


def _json(path: Path) -> dict[str, Any]:
    try:
        value = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return value if isinstance(value, dict) else {}


def _hub_json(repo: str, filename: str, online: bool) -> dict[str, Any]:
    """A small file of a hub model: from the hub where reachable, else from the cache; {} if neither."""
    cached = try_to_load_from_cache(repo, filename)
    if isinstance(cached, str):
        return _json(Path(cached))
    if online:
        try:
            return _json(Path(hf_hub_download(repo, filename, etag_timeout=10)))
        except Exception:  # not there, or the hub did not answer: as if absent
            return {}
    return {}
