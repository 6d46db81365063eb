"""The catalog is validated once at start-up; a bad entry names itself and its field."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from app.catalog import CatalogError, load_catalog
from app.config import DEFAULT_CATALOG, Settings
from app.main import create_app
from app.tasks import Endpoint


def write(tmp_path: Path, text: str, suffix: str = ".yaml") -> Path:
    path = tmp_path / f"catalog{suffix}"
    path.write_text(text)
    return path


def test_shipped_catalog_is_valid_and_has_a_default_per_endpoint() -> None:
    catalog = load_catalog(DEFAULT_CATALOG)
    assert set(catalog.defaults) == set(Endpoint)
    names = {m.name for m in catalog.models}
    assert {"distilbert-sst2", "opus-mt-en-de", "distilbart-cnn", "minilm", "minilm-sentiment"} <= names


@pytest.mark.parametrize(
    ("entry", "expected"),
    [
        (
            "{name: m1, task: translation, source: {hub: a/b}, source_lang: en}",
            "entry 'm1', field 'target_lang'",
        ),
        ("{name: m2, task: embedding, source: {hub: a/b}, device: gpu}", "entry 'm2', field 'device'"),
        ("{name: m3, task: embedding, source: {hub: a/b, path: /x}}", "entry 'm3', field 'source'"),
        ("{name: m4, task: sentiment, source: {hub: a/b}}", "entry 'm4'"),
        (
            "{name: m5, task: embedding, source: {hub: a/b}, trust_remote_code: true}",
            "field 'trust_remote_code'",
        ),
        (
            "{name: m6, task: zero-shot-classification, source: {hub: a/b}, hypothesis_template: nope}",
            "entry 'm6', field 'hypothesis_template'",
        ),
    ],
)
def test_a_bad_entry_is_named_with_its_field(tmp_path: Path, entry: str, expected: str) -> None:
    with pytest.raises(CatalogError) as err:
        load_catalog(write(tmp_path, f"models:\n  - {entry}\n"))
    assert expected in str(err.value)


def test_defaults_must_name_entries_that_serve_the_endpoint(tmp_path: Path) -> None:
    text = "models:\n  - {name: e, task: embedding, source: {hub: a/b}}\ndefaults:\n  classify: [e]\n"
    with pytest.raises(CatalogError, match="'e' \\(embedding\\) cannot serve /classify"):
        load_catalog(write(tmp_path, text))


def test_duplicate_names_are_rejected(tmp_path: Path) -> None:
    entry = "  - {name: e, task: embedding, source: {hub: a/b}}\n"
    with pytest.raises(CatalogError, match="duplicate model names: e"):
        load_catalog(write(tmp_path, "models:\n" + entry + entry))


def test_toml_catalogs_and_relative_paths_work(tmp_path: Path) -> None:
    text = '[[models]]\nname = "local"\ntask = "embedding"\nsource = { path = "models/local" }\n'
    catalog = load_catalog(write(tmp_path, text, ".toml"))
    assert catalog.models[0].source.path == (tmp_path / "models" / "local").resolve()


def test_create_app_refuses_a_bad_catalog(tmp_path: Path) -> None:
    path = write(tmp_path, "models: []\n")
    with pytest.raises(CatalogError, match="models"):
        create_app(Settings(catalog=path, hub="offline"))


def test_serve_command_exits_with_the_message_on_a_bad_catalog(tmp_path: Path) -> None:
    path = write(tmp_path, "models:\n  - {name: bad, task: translation, source: {hub: a/b}}\n")
    proc = subprocess.run(
        [sys.executable, "-m", "app", "serve", "--port", "1"],
        env={"TESSERA_CATALOG": str(path), "PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1"},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2
    assert "entry 'bad', field 'source_lang'" in proc.stderr
