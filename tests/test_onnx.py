"""backend: onnx: an encoder exported to ONNX Runtime at first load answers as its torch
twin, the export is cached (and made again when the model changes), and a session that
differs from torch, a missing runtime or an int8 request this CPU or model cannot keep
falls back with the reason in /models."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import yaml
from pydantic import ValidationError

from app.catalog import EmbeddingEntry, RerankEntry, SummarizationEntry, TextClassificationEntry, TranslationEntry
from app.config import Settings
from app.main import create_app
from app.payloads import ClassifyInput, EmbedInput, RerankInput
from app.runners import onnx_runtime
from app.runners.classification import ClassificationRunner
from app.runners.embedding import EmbeddingRunner
from app.runners.rerank import CrossEncoderRunner
from tests.conftest import serve

pytestmark = pytest.mark.anyio

TEXTS = ["a fine film", "the worst evening in years, truly awful", "ok", "rain again and again and again"]


@pytest.fixture
def onnx_cache(tmp_path: Path) -> Iterator[Path]:
    cache = tmp_path / "onnx"
    onnx_runtime.configure(cache, 1)
    yield cache
    onnx_runtime.configure(None, 0)


def classifier(models: dict[str, Path], backend: str, **options: Any) -> ClassificationRunner:
    entry = TextClassificationEntry(
        name=f"clf-{backend}", task="text-classification", source={"path": "unused"}, backend=backend, **options
    )
    return ClassificationRunner(entry, models["bert-clf"], torch.device("cpu"), torch.float32)


def embedder(models: dict[str, Path], backend: str, **options: Any) -> EmbeddingRunner:
    entry = EmbeddingEntry(
        name=f"emb-{backend}", task="embedding", source={"path": "unused"}, backend=backend, **options
    )
    return EmbeddingRunner(entry, models["bert-embed"], torch.device("cpu"), torch.float32)


def reranker(models: dict[str, Path], backend: str, **options: Any) -> CrossEncoderRunner:
    entry = RerankEntry(name=f"rr-{backend}", task="rerank", source={"path": "unused"}, backend=backend, **options)
    return CrossEncoderRunner(entry, models["bert-rerank"], torch.device("cpu"), torch.float32)


def test_an_onnx_classifier_embedder_and_reranker_answer_as_their_torch_twins(
    tiny_models: dict[str, Path], onnx_cache: Path
) -> None:
    for build, payloads in (
        (classifier, [ClassifyInput(t, None, None) for t in TEXTS]),
        (embedder, [EmbedInput(t) for t in TEXTS]),
        (reranker, [RerankInput(TEXTS[0], t) for t in TEXTS]),
    ):
        torch_runner, onnx_runner = build(tiny_models, "torch"), build(tiny_models, "onnx")
        assert (torch_runner.backend, onnx_runner.backend, onnx_runner.backend_note) == ("torch", "onnx", None)
        # ONNX Runtime's copy of the weights counts against the memory budget.
        assert onnx_runner.memory_bytes() > torch_runner.memory_bytes()
        want = torch_runner.infer(payloads, torch_runner.encode(payloads))
        got = onnx_runner.infer(payloads, onnx_runner.encode(payloads))
        for w, g in zip(want, got, strict=True):
            if hasattr(w, "labels"):
                assert [x["label"] for x in g.labels] == [x["label"] for x in w.labels]
                assert np.allclose([x["score"] for x in g.labels], [x["score"] for x in w.labels], atol=1e-4)
            elif hasattr(w, "vector"):
                assert np.allclose(g.vector, w.vector, atol=1e-4)
            else:
                assert g.score == pytest.approx(w.score, abs=1e-4)


def test_the_export_is_cached_and_a_changed_model_is_exported_again(
    tiny_models: dict[str, Path], onnx_cache: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    exports: list[Path] = []
    real_export = onnx_runtime._export
    monkeypatch.setattr(onnx_runtime, "_export", lambda *a: (exports.append(a[-1]), real_export(*a))[1])
    model = tmp_path / "model"
    shutil.copytree(tiny_models["bert-clf"], model)
    models = {"bert-clf": model}
    assert classifier(models, "onnx").backend == "onnx"
    assert classifier(models, "onnx").backend == "onnx"
    assert len(exports) == 1  # the second load read the cache
    config = model / "config.json"
    config.write_text(config.read_text() + " ")  # a new revision of the model's files
    assert classifier(models, "onnx").backend == "onnx"
    assert len(exports) == 2 and exports[0].parent != exports[1].parent
    assert sorted(p.name for p in onnx_cache.iterdir()) == sorted(p.parent.name for p in exports)


def test_a_session_that_differs_from_torch_leaves_the_model_on_torch_saying_why(
    tiny_models: dict[str, Path], onnx_cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_call = onnx_runtime.OnnxForward.__call__

    def off_by_a_little(self: onnx_runtime.OnnxForward, **batch: torch.Tensor) -> dict[str, torch.Tensor]:
        return {name: value + 0.01 for name, value in real_call(self, **batch).items()}

    monkeypatch.setattr(onnx_runtime.OnnxForward, "__call__", off_by_a_little)
    runner = classifier(tiny_models, "onnx")
    assert runner.backend == "torch"
    assert runner.backend_note is not None and "differ from torch" in runner.backend_note
    payloads = [ClassifyInput(t, None, None) for t in TEXTS]
    assert len(runner.infer(payloads, runner.encode(payloads))) == len(TEXTS)


def test_without_onnx_runtime_the_model_runs_on_torch_saying_what_to_install(
    tiny_models: dict[str, Path], onnx_cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(onnx_runtime, "available", lambda: False)
    runner = embedder(tiny_models, "onnx")
    assert runner.backend == "torch" and "onnxruntime" in (runner.backend_note or "")


def test_int8_is_refused_on_a_cpu_without_vnni_and_runs_where_it_keeps_the_answers(
    tiny_models: dict[str, Path], onnx_cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(onnx_runtime, "cpu_has_int8_dot_product", lambda: False)
    refused = classifier(tiny_models, "onnx", quantize="int8")
    assert refused.backend == "onnx" and "VNNI" in (refused.backend_note or "")
    monkeypatch.setattr(onnx_runtime, "cpu_has_int8_dot_product", lambda: True)
    monkeypatch.setattr(onnx_runtime, "int8_keeps_quality", lambda *args: None)
    kept = classifier(tiny_models, "onnx", quantize="int8")
    assert (kept.backend, kept.backend_note) == ("onnx-int8", None)
    assert (onnx_cache / next(p.name for p in onnx_cache.iterdir()) / "model.int8.onnx").is_file()
    monkeypatch.setattr(onnx_runtime, "int8_keeps_quality", lambda *args: "int8 changed the best label")
    lost = classifier(tiny_models, "onnx", quantize="int8")
    assert lost.backend == "onnx" and "changed the best label" in (lost.backend_note or "")


def test_the_int8_quality_guard_compares_labels_pooled_vectors_and_one_score_heads() -> None:
    batch = {"attention_mask": torch.tensor([[1, 1, 0], [1, 1, 1]])}

    class Fixed:
        def __init__(self, value: torch.Tensor) -> None:
            self.value = value

        def __call__(self, **batch: torch.Tensor) -> dict[str, torch.Tensor]:
            return {"logits": self.value, "last_hidden_state": self.value}

    logits = torch.tensor([[0.1, 0.9], [0.8, 0.2]])
    assert onnx_runtime.int8_keeps_quality("logits", [(batch, logits)], Fixed(logits + 0.05)) is None  # type: ignore[arg-type]
    swapped = logits.flip(-1)
    assert "best label" in (onnx_runtime.int8_keeps_quality("logits", [(batch, logits)], Fixed(swapped)) or "")  # type: ignore[arg-type]
    hidden = torch.randn(2, 3, 8, generator=torch.Generator().manual_seed(0))
    assert onnx_runtime.int8_keeps_quality("last_hidden_state", [(batch, hidden)], Fixed(hidden * 1.01)) is None  # type: ignore[arg-type]
    assert "cosine" in (
        onnx_runtime.int8_keeps_quality("last_hidden_state", [(batch, hidden)], Fixed(-hidden)) or ""  # type: ignore[arg-type]
    )
    scores = torch.tensor([[2.0], [-1.0]])  # a cross-encoder's: one logit per pair, no label to keep
    assert onnx_runtime.int8_keeps_quality("logits", [(batch, scores)], Fixed(scores + 0.1)) is None  # type: ignore[arg-type]
    assert "moved a score" in (onnx_runtime.int8_keeps_quality("logits", [(batch, scores)], Fixed(-scores)) or "")  # type: ignore[arg-type]


def test_settings_the_backend_cannot_honour_are_refused_at_start_up() -> None:
    with pytest.raises(ValidationError, match="quantize: int8 needs backend: onnx"):
        TextClassificationEntry(name="x", task="text-classification", source={"path": "unused"}, quantize="int8")
    with pytest.raises(ValidationError, match="encoder entries only"):
        TranslationEntry(
            name="x", task="translation", source={"path": "unused"}, source_lang="en", target_lang="de", backend="onnx"
        )
    with pytest.raises(ValidationError, match="encoder entries only"):
        SummarizationEntry(name="x", task="summarization", source={"path": "unused"}, backend="onnx")
    extractive = SummarizationEntry(
        name="x", task="summarization", engine="extractive", source={"path": "unused"}, backend="onnx"
    )
    assert extractive.backend == "onnx"


async def test_models_shows_the_backend_that_runs_and_why_it_is_not_the_one_asked_for(
    tiny_models: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(onnx_runtime, "cpu_has_int8_dot_product", lambda: False)
    catalog = tmp_path / "catalog.yaml"
    entries = [
        {"name": "on-onnx", "task": "text-classification", "source": {"path": str(tiny_models["bert-clf"])}},
        {"name": "on-torch", "task": "text-classification", "source": {"path": str(tiny_models["bert-clf"])}},
    ]
    entries[0] |= {"backend": "onnx", "quantize": "int8"}
    catalog.write_text(yaml.safe_dump({"models": entries}))
    settings = Settings(catalog=catalog, hub="offline", onnx_cache=tmp_path / "onnx")
    async with serve(create_app(settings)) as client:
        for name in ("on-onnx", "on-torch"):
            answer = await client.post("/classify", json={"inputs": "a fine film", "model": name})
            assert answer.status_code == 200, answer.text
        listed = {m["name"]: m for m in (await client.get("/models")).json()["models"]}
    assert (listed["on-onnx"]["backend"], listed["on-torch"]["backend"]) == ("onnx", "torch")
    assert "int8 refused" in listed["on-onnx"]["backend_note"] and listed["on-torch"]["backend_note"] is None
    onnx_runtime.configure(None, 0)
