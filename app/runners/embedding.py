"""Sentence embeddings, and the two tasks built on them: similarity zero-shot and extractive summaries.

``SentenceEncoder`` is AutoModel plus the pooling a sentence-transformers model declares
in ``1_Pooling/config.json`` (mean, CLS or max), so all-MiniLM-L6-v2 gives the vectors
sentence-transformers gives. The runners compose it rather than inherit from it.
"""

from __future__ import annotations

import json
import threading
from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pysbd
import torch
import torch.nn.functional as F
from transformers import AutoModel, AutoTokenizer

from app.catalog import EmbeddingEntry, SummarizationEntry, ZeroShotEntry
from app.payloads import Classification, Embedding, EmbedInput, ExtractInput, Generation, ZeroShotInput
from app.runners.base import Encoded, Runner, weights_kwargs
from app.runners.forward import entry_forward
from app.runners.tokens import TextEncoder, pad_rows

_POOLING_KEYS = {
    "mean": "pooling_mode_mean_tokens",
    "cls": "pooling_mode_cls_token",
    "max": "pooling_mode_max_tokens",
}


def declared_pooling(path: Path) -> str:
    """The pooling a sentence-transformers directory declares; mean where it declares none."""
    config = path / "1_Pooling" / "config.json"
    if config.is_file():
        declared = json.loads(config.read_text())
        for mode, key in _POOLING_KEYS.items():
            if declared.get(key):
                return mode
    return "mean"


class SentenceEncoder:
    """Tokenizer + encoder + pooling; its owner runs ``encode`` under its tokenizer lock."""

    def __init__(self, entry: Any, path: Path, device: torch.device, dtype: torch.dtype) -> None:
        self.tokenizer = AutoTokenizer.from_pretrained(str(path), trust_remote_code=False)
        self.model = AutoModel.from_pretrained(str(path), dtype=dtype, **weights_kwargs(entry.allow_pickle))
        self.model.to(device).eval()
        pooling = getattr(entry, "pooling", "auto")
        self.pooling = declared_pooling(path) if pooling == "auto" else pooling
        self.text = TextEncoder.for_model(self.tokenizer, self.model.config, entry.max_input_tokens)
        self.device = device
        self.forward = entry_forward(self.model, "last_hidden_state", self.tokenizer, entry, path)

    def encode(self, texts: Sequence[str]) -> list[Encoded]:
        return [
            Encoded([ids], truncated, [types] if types else None) for ids, types, truncated in self.text.encode(texts)
        ]

    def embed(self, encoded: Sequence[Encoded], normalize: bool = True) -> torch.Tensor:
        """One pooled vector per row of ``encoded``, float32 on the CPU."""
        rows = [ids for enc in encoded for ids in enc.rows_ids]
        types = [t for enc in encoded for t in (enc.rows_type_ids or [])]
        batch = pad_rows(rows, self.text.pad_id, types if len(types) == len(rows) else None, self.device)
        with torch.inference_mode():
            hidden = self.forward(batch).float()
        mask = batch["attention_mask"].unsqueeze(-1).float()
        if self.pooling == "cls":
            pooled = hidden[:, 0]
        elif self.pooling == "max":
            pooled = hidden.masked_fill(mask == 0, -1e9).max(dim=1).values
        else:
            pooled = (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1e-9)
        if normalize:
            pooled = F.normalize(pooled, p=2, dim=1)
        return pooled.cpu()


class EmbeddingRunner(Runner):
    def __init__(self, entry: EmbeddingEntry, path: Path, device: torch.device, dtype: torch.dtype) -> None:
        super().__init__()
        self.encoder = SentenceEncoder(entry, path, device, dtype)
        self.model = self.encoder.model
        self.forward = self.encoder.forward

    def tokenize(self, payloads: Sequence[EmbedInput]) -> list[Encoded]:
        return self.encoder.encode([p.text for p in payloads])

    def infer(self, payloads: Sequence[EmbedInput], encoded: Sequence[Encoded]) -> list[Embedding]:
        raw = self.encoder.embed(encoded, normalize=False)
        normalize = torch.tensor([p.normalize for p in payloads]).unsqueeze(1)
        vectors = torch.where(normalize, F.normalize(raw, p=2, dim=1), raw).tolist()  # one conversion per batch
        return [Embedding(vector, enc.length, enc.truncated) for vector, enc in zip(vectors, encoded, strict=True)]


class SimilarityZeroShotRunner(Runner):
    """Zero-shot by cosine similarity between the text and each label's description."""

    _CACHE_SIZE = 4096

    def __init__(self, entry: ZeroShotEntry, path: Path, device: torch.device, dtype: torch.dtype) -> None:
        super().__init__()
        self.encoder = SentenceEncoder(entry, path, device, dtype)
        self.model = self.encoder.model
        self.forward = self.encoder.forward
        self.temperature = entry.temperature
        self._label_vectors: OrderedDict[str, torch.Tensor] = OrderedDict()
        self._labels_lock = threading.Lock()

    def tokenize(self, payloads: Sequence[ZeroShotInput]) -> list[Encoded]:
        return self.encoder.encode([p.text for p in payloads])

    def infer(self, payloads: Sequence[ZeroShotInput], encoded: Sequence[Encoded]) -> list[Classification]:
        texts = self.encoder.embed(encoded)
        vectors = self._label_vectors_for({h for p in payloads for h in p.hypotheses})
        results = []
        for i, p in enumerate(payloads):
            labels = torch.stack([vectors[h] for h in p.hypotheses])
            similarity = labels @ texts[i]
            if p.multi_label:
                scores = similarity.clamp(min=0.0)  # each label judged alone: its cosine similarity
            else:
                scores = torch.softmax(similarity / self.temperature, dim=0)
            order = torch.argsort(scores, descending=True).tolist()
            ranked = [{"label": p.labels[j], "score": float(scores[j])} for j in order]
            results.append(Classification(ranked, encoded[i].truncated))
        return results

    def _label_vectors_for(self, hypotheses: set[str]) -> dict[str, torch.Tensor]:
        """Each hypothesis's vector, from the cache or embedded now (lanes share the cache)."""
        with self._labels_lock:
            missing = sorted(h for h in hypotheses if h not in self._label_vectors)
            if missing:
                with self.tokenizer_lock:
                    encoded = self.encoder.encode(missing)
                for text, vector in zip(missing, self.encoder.embed(encoded), strict=True):
                    self._label_vectors[text] = vector
            for h in hypotheses:
                self._label_vectors.move_to_end(h)
            vectors = {h: self._label_vectors[h] for h in hypotheses}
            while len(self._label_vectors) > self._CACHE_SIZE:
                self._label_vectors.popitem(last=False)
        return vectors


class ExtractiveSummaryRunner(Runner):
    """Picks the sentences that best cover a document (centroid + redundancy penalty), in order."""

    def __init__(self, entry: SummarizationEntry, path: Path, device: torch.device, dtype: torch.dtype) -> None:
        super().__init__()
        self.encoder = SentenceEncoder(entry, path, device, dtype)
        self.model = self.encoder.model
        self.forward = self.encoder.forward
        self.segmenter = pysbd.Segmenter(language="en", clean=False)

    def tokenize(self, payloads: Sequence[ExtractInput]) -> list[Encoded]:
        out = []
        for p in payloads:
            sentences = [s.strip() for s in self.segmenter.segment(p.text) if s.strip()] or [p.text.strip()]
            rows = self.encoder.encode(sentences)
            out.append(
                Encoded(
                    [r.rows_ids[0] for r in rows],
                    any(r.truncated for r in rows),
                    extra={"sentences": sentences},
                )
            )
        return out

    def infer(self, payloads: Sequence[ExtractInput], encoded: Sequence[Encoded]) -> list[Generation]:
        vectors = self.encoder.embed(encoded)
        results, row = [], 0
        for p, enc in zip(payloads, encoded, strict=True):
            sentences = enc.extra["sentences"]
            picked = select_sentences(vectors[row : row + enc.rows], p.max_sentences)
            row += enc.rows
            results.append(Generation(" ".join(sentences[i] for i in picked), truncated=False))
        return results


def select_sentences(vectors: torch.Tensor, count: int, redundancy: float = 0.5) -> list[int]:
    """Maximal marginal relevance against the document centroid; indices in document order."""
    if len(vectors) <= count:
        return list(range(len(vectors)))
    centroid = F.normalize(vectors.mean(dim=0), dim=0)
    relevance = vectors @ centroid
    chosen: list[int] = []
    while len(chosen) < count:
        if chosen:
            overlap = (vectors @ vectors[chosen].T).max(dim=1).values
            score = relevance - redundancy * overlap
            score[chosen] = float("-inf")
        else:
            score = relevance.clone()
        chosen.append(int(torch.argmax(score)))
    return sorted(chosen)
