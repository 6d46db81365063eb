"""/translate and /summarize: seq2seq models through generate, prefixes, long inputs."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch
from fastapi import FastAPI
from transformers import AutoModelForSeq2SeqLM, AutoTokenizer

from app.engine import wire
from tests.conftest import core_of, held_forward, serve

pytestmark = pytest.mark.anyio


def reference_generate(path: Path, texts: list[str], **settings: object) -> list[str]:
    """What transformers itself produces for these inputs, one at a time."""
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForSeq2SeqLM.from_pretrained(path).eval()
    out = []
    for text in texts:
        batch = tok(text, return_tensors="pt", truncation=True, max_length=tok.model_max_length)
        batch.pop("token_type_ids", None)
        with torch.inference_mode():
            ids = model.generate(**batch, **settings)  # type: ignore[arg-type]
        out.append(tok.decode(ids[0], skip_special_tokens=True).strip())
    return out


async def test_translation_matches_generate_and_is_batched_in_order(
    client: httpx.AsyncClient, tiny_models: dict[str, Path]
) -> None:
    texts = ["hello world", "the small cat is on the big red mat today", "good morning"]
    r = await client.post("/translate", json={"inputs": texts, "model": "marian-en-de"})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["model"] == "marian-en-de"
    got = [res["translation_text"] for res in body["results"]]
    assert got == reference_generate(tiny_models["marian"], texts, max_new_tokens=8)
    assert [res["truncated"] for res in body["results"]] == [False, False, False]


async def test_language_pair_picks_the_catalog_model_and_applies_its_prefix(
    client: httpx.AsyncClient, tiny_models: dict[str, Path]
) -> None:
    r = await client.post("/translate", json={"inputs": "a green tree", "source_lang": "en", "target_lang": "fr"})
    assert r.status_code == 200, r.text
    assert r.json()["model"] == "t5-en-fr"
    expected = reference_generate(tiny_models["t5"], ["translate English to French: a green tree"], max_new_tokens=8)
    assert r.json()["results"][0]["translation_text"] == expected[0]


async def test_request_generation_settings_override_the_entry_defaults(
    client: httpx.AsyncClient, tiny_models: dict[str, Path]
) -> None:
    params = {"max_new_tokens": 3, "num_beams": 2}
    r = await client.post("/translate", json={"inputs": "hello there", "model": "marian-en-de", "parameters": params})
    assert r.status_code == 200, r.text
    assert (
        r.json()["results"][0]["translation_text"]
        == reference_generate(tiny_models["marian"], ["hello there"], **params)[0]
    )


@pytest.mark.parametrize(
    ("body", "status", "fragment"),
    [
        ({"inputs": "x", "source_lang": "en", "target_lang": "ja"}, 404, "available pairs: en->de, en->fr"),
        ({"inputs": "x", "source_lang": "de"}, 404, "no catalog model translates de->*"),
        (
            {"inputs": "x", "model": "marian-en-de", "source_lang": "en", "target_lang": "fr"},
            400,
            "translates en->de",
        ),
        ({"inputs": "x", "model": "marian-en-de", "target_lang": "fr"}, 400, "not *->fr"),
        ({"inputs": "x", "model": "bert-clf"}, 400, "not /translate"),
        ({"inputs": "x", "parameters": {"max_new_tokens": 100000}}, 422, "cap of 1024"),
        ({"inputs": "x", "parameters": {"num_beams": 64}}, 422, "num_beams 64"),
        ({"inputs": "x", "parameters": {"temperature": 0.7}}, 422, "do_sample"),
        ({"inputs": "x", "parameters": {"do_sample": True, "temperature": 1e-308}}, 422, "temperature"),
        ({"inputs": "x", "parameters": {"max_length": 1}}, 422, "max_length"),
        ({"inputs": "x", "parameters": {"num_beams": 2, "length_penalty": 1e308}}, 422, "length_penalty"),
        ({"inputs": "x", "parameters": {"beams": 2}}, 422, "beams"),
    ],
)
async def test_bad_translation_requests_get_a_clear_4xx(
    client: httpx.AsyncClient, body: dict[str, object], status: int, fragment: str
) -> None:
    r = await client.post("/translate", json=body)
    assert r.status_code == status, r.text
    assert fragment in r.json()["message"]


async def test_one_language_picks_the_pair_and_min_length_above_max_length_yields_to_it(
    client: httpx.AsyncClient, tiny_models: dict[str, Path]
) -> None:
    r = await client.post("/translate", json={"inputs": "hello there", "target_lang": "fr"})
    assert r.status_code == 200, r.text
    assert r.json()["model"] == "t5-en-fr"
    params = {"min_length": 9, "max_length": 3}
    r = await client.post("/translate", json={"inputs": "hello there", "model": "marian-en-de", "parameters": params})
    assert r.status_code == 200, r.text
    expected = reference_generate(tiny_models["marian"], ["hello there"], **params)[0]
    assert r.json()["results"][0]["translation_text"] == expected


async def test_an_output_longer_than_the_decoders_positions_is_cut_there_not_a_500(client: httpx.AsyncClient) -> None:
    # The tiny Marian's decoder has 512 learned positions (as opus-mt's), BART's 128; the cap is 1024.
    for route, model in (("/translate", "marian-en-de"), ("/summarize", "bart-sum")):
        params = {"max_new_tokens": 1024, "min_length": 1024}
        r = await client.post(route, json={"inputs": "hello there", "model": model, "parameters": params})
        assert r.status_code == 200, r.text
        r = await client.post(route, json={"inputs": "hi", "model": model, "parameters": {"max_length": 1024}})
        assert r.status_code == 200, r.text
    # T5's positions are relative: nothing to cut.
    r = await client.post(
        "/translate", json={"inputs": "hi", "model": "t5-en-fr", "parameters": {"max_new_tokens": 600}}
    )
    assert r.status_code == 200, r.text


async def test_long_translation_input_is_truncated_not_an_index_error(client: httpx.AsyncClient) -> None:
    r = await client.post("/translate", json={"inputs": "hello world " * 600, "model": "marian-en-de"})
    assert r.status_code == 200, r.text
    assert r.json()["results"][0]["truncated"] is True


async def test_summaries_truncate_by_default_and_chunk_on_request(client: httpx.AsyncClient) -> None:
    sentence = "The council met on Tuesday to discuss the new transit plan for the city. "
    document = sentence * 40  # far over bart-sum's 128-token maximum
    truncated = await client.post("/summarize", json={"inputs": document})
    assert truncated.status_code == 200, truncated.text
    assert truncated.json()["model"] == "bart-sum"
    assert truncated.json()["results"][0] | {"summary_text": ""} == {
        "summary_text": "",
        "truncated": True,
        "chunks": 1,
    }

    chunked = await client.post("/summarize", json={"inputs": document, "parameters": {"long_input": "chunk"}})
    assert chunked.status_code == 200, chunked.text
    result = chunked.json()["results"][0]
    assert result["chunks"] > 1
    assert isinstance(result["summary_text"], str)

    short = await client.post("/summarize", json={"inputs": sentence, "parameters": {"long_input": "chunk"}})
    assert short.json()["results"][0]["chunks"] == 1


async def test_t5_summaries_use_the_entry_prefix(client: httpx.AsyncClient, tiny_models: dict[str, Path]) -> None:
    text = "the big dog ran over the green hill"
    r = await client.post("/summarize", json={"inputs": text, "model": "t5-sum"})
    assert r.status_code == 200, r.text
    assert (
        r.json()["results"][0]["summary_text"]
        == reference_generate(tiny_models["t5"], ["summarize: " + text], max_new_tokens=8)[0]
    )


async def test_extractive_summary_keeps_the_central_sentences_in_document_order(
    client: httpx.AsyncClient,
) -> None:
    sentences = [
        "The city council approved the new transit plan on Tuesday.",
        "My neighbour's cat likes to sleep on warm cars.",
        "The transit plan funds two new bus lines and a tram extension.",
        "Construction of the new bus lines starts in spring, the council said.",
        "Bananas are rich in potassium.",
    ]
    r = await client.post(
        "/summarize",
        json={
            "inputs": " ".join(sentences),
            "model": "minilm-extractive",
            "parameters": {"max_sentences": 2},
        },
    )
    assert r.status_code == 200, r.text
    summary = r.json()["results"][0]["summary_text"]
    picked = [s for s in sentences if s in summary]
    assert len(picked) == 2
    assert summary == " ".join(picked)  # document order, nothing invented
    assert "Bananas" not in summary and "cat" not in summary


async def test_a_client_length_limit_replaces_the_entrys_own(
    client: httpx.AsyncClient, tiny_models: dict[str, Path]
) -> None:
    r = await client.post(
        "/translate", json={"inputs": "hello world", "model": "marian-en-de", "parameters": {"max_length": 3}}
    )
    assert r.status_code == 200, r.text
    expected = reference_generate(tiny_models["marian"], ["hello world"], max_length=3)
    assert r.json()["results"][0]["translation_text"] == expected[0]


@pytest.mark.parametrize("literal", [b"Infinity", b"NaN", b"-Infinity"])
async def test_non_finite_numbers_are_a_422(client: httpx.AsyncClient, literal: bytes) -> None:
    body = b'{"inputs": "hello", "parameters": {"do_sample": true, "temperature": ' + literal + b"}}"
    r = await client.post("/translate", content=body, headers={"content-type": "application/json"})
    assert r.status_code == 422, r.text
    assert "temperature" in r.json()["message"]


async def test_very_long_documents_are_reduced_until_they_fit_not_truncated(client: httpx.AsyncClient) -> None:
    document = "The council met on Tuesday to discuss the new transit plan for the city. " * 150
    r = await client.post("/summarize", json={"inputs": document, "parameters": {"long_input": "chunk"}})
    assert r.status_code == 200, r.text
    result = r.json()["results"][0]
    assert result["chunks"] > 10
    assert result["truncated"] is False


async def test_a_chunked_request_larger_than_the_queue_is_a_413_not_a_429(
    app_factory: Callable[..., FastAPI],
) -> None:
    document = "The council met on Tuesday to discuss the new transit plan for the city. " * 150
    async with serve(app_factory(max_queue_items=8, max_inputs_per_request=8)) as client:
        r = await client.post("/summarize", json={"inputs": document, "parameters": {"long_input": "chunk"}})
        assert r.status_code == 413, r.text
        assert "TESSERA_MAX_QUEUE_ITEMS" in r.json()["message"]


@pytest.mark.faults
async def test_unloading_a_model_mid_request_never_answers_500(client: httpx.AsyncClient) -> None:
    document = "The council met on Tuesday to discuss the new transit plan for the city. " * 150
    await client.post("/models/t5-sum/load")
    request = asyncio.create_task(
        client.post("/summarize", json={"inputs": document, "model": "t5-sum", "parameters": {"long_input": "chunk"}})
    )
    await asyncio.sleep(0.05)
    await client.post("/models/t5-sum/unload")
    r = await request
    assert r.status_code in (200, 503), r.text


def document_with_paragraphs(paragraphs: int = 8, lines: int = 3) -> str:
    """Paragraphs of lines, far over marian-en-de's 512 input tokens altogether (each line fits),
    one line indented, one line too long on its own, and a trailing newline."""
    blocks = [
        "\n".join(
            f"Paragraph {p} line {n}: the small cat sat on the big red mat near the old house." for n in range(lines)
        )
        for p in range(paragraphs)
    ]
    blocks[1] = "  " + blocks[1]  # an indent
    blocks[2] += "\n" + "The council met on Tuesday to discuss the new transit plan for the city. " * 30
    return "\n\n".join(blocks) + "\n"


def line_shape(text: str) -> list[bool]:
    """Per line: whether it holds text (blank lines are the paragraph breaks)."""
    return [bool(line.strip()) for line in text.split("\n")]


async def test_a_long_document_translated_in_chunks_keeps_its_paragraphs_and_lines(
    app_factory: Callable[..., FastAPI], tiny_models: dict[str, Path]
) -> None:
    document = document_with_paragraphs()
    params = {"max_new_tokens": 6, "min_length": 6}
    app = app_factory()
    async with serve(app) as client:
        r = await client.post(
            "/translate",
            json={"inputs": [document, "hello world"], "parameters": {**params, "long_input": "chunk"}},
        )
        assert r.status_code == 200, r.text
        long, short = r.json()["results"]
        runner = core_of(app).registry.slot("marian-en-de").runner
        pieces, separators = runner.split_keeping_lines(document)  # type: ignore[union-attr]
        # Each line its own piece, the too long line in several: more pieces than lines.
        assert long["chunks"] == len(pieces) > sum(line_shape(document))
        outputs = reference_generate(tiny_models["marian"], pieces, max_new_tokens=6, min_length=6)
        assert long["translation_text"] == separators[0] + "".join(
            out + after for out, after in zip(outputs, separators[1:], strict=True)
        )
        assert long["translation_text"].count("\n\n") == document.count("\n\n") == 7  # its paragraphs
        assert line_shape(long["translation_text"]) == line_shape(document)  # its lines, blank ones included
        assert long["truncated"] is False
        # A text that fits is one piece: the same translation as without chunking.
        plain = await client.post("/translate", json={"inputs": "hello world", "parameters": params})
        assert short == {**plain.json()["results"][0], "chunks": 1}


async def test_every_chunk_of_every_input_runs_in_one_engine_request_under_one_deadline(
    app_factory: Callable[..., FastAPI],
) -> None:
    document = document_with_paragraphs()
    app = app_factory(lanes_per_model=1)
    async with serve(app) as client:
        assert (await client.post("/models/marian-en-de/load")).status_code == 200
        core = core_of(app)
        infers: list[int] = []
        handle = core.handle

        def counting(origin: Any, op: Any) -> None:
            if isinstance(op, wire.Infer):
                infers.append(len(op.payloads))  # type: ignore[attr-defined]
            handle(origin, op)

        core.handle = counting  # type: ignore[method-assign]
        body = {"inputs": [document, document], "timeout_s": 1, "parameters": {"long_input": "chunk"}}
        with held_forward(core, "marian-en-de"):
            r = await client.post("/translate", json=body)
        assert r.status_code == 504, r.text  # one deadline for all its pieces: not one per piece
        runner = core.registry.slot("marian-en-de").runner
        pieces, _ = runner.split_keeping_lines(document)  # type: ignore[union-attr]
        assert infers == [2 * len(pieces)]


async def test_translation_long_input_is_checked_as_summarys(client: httpx.AsyncClient) -> None:
    r = await client.post("/translate", json={"inputs": "x", "parameters": {"long_input": "split"}})
    assert r.status_code == 422, r.text
    assert "long_input" in r.json()["message"]
