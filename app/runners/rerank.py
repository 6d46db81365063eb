"""Rerank: how relevant each document is to a query, one (query, document) pair per input.

Two engines. A cross-encoder (a one-label sequence classifier, as sentence-transformers'
``CrossEncoder`` runs it) reads each pair as one sequence; its logit becomes a score by
sigmoid unless its config declares another activation. A similarity engine embeds query
and document with a sentence embedder and scores their cosine, so the packaged MiniLM
reranks offline; a query repeated over a batch's pairs is embedded once.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from app.catalog import RerankEntry
from app.payloads import Relevance, RerankInput
from app.runners.base import Encoded, Runner, load_pipeline
from app.runners.embedding import SentenceEncoder
from app.runners.forward import entry_forward
from app.runners.tokens import TextEncoder, pad_rows

# sentence-transformers' CrossEncoder writes its activation into the model's config.
_IDENTITY = "torch.nn.modules.linear.Identity"
_SIGMOID = "torch.nn.modules.activation.Sigmoid"


def declared_function(config: Any) -> str:
    """sigmoid, or none where the config declares sentence-transformers' Identity activation."""
    declared = getattr(config, "sentence_transformers", None) or {}
    activation = declared.get("activation_fn") if isinstance(declared, dict) else None
    activation = activation or getattr(config, "sbert_ce_default_activation_function", None)
    return "none" if activation == _IDENTITY else "sigmoid"


class CrossEncoderRunner(Runner):
    """(query, document) pairs through a one-label sequence classifier."""

    def __init__(self, entry: RerankEntry, path: Path, device: torch.device, dtype: torch.dtype) -> None:
        super().__init__()
        self.pipe = load_pipeline("text-classification", entry, path, device, dtype)
        self.model = self.pipe.model.eval()
        self.tokenizer = self.pipe.tokenizer
        if self.model.config.num_labels != 1:
            raise RuntimeError(
                f"a cross-encoder reranker has one output label; this model has {self.model.config.num_labels} "
                "(serve it as text-classification, or use engine: similarity with an embedding model)"
            )
        self.function = entry.function_to_apply or declared_function(self.model.config)
        self.forward = entry_forward(self.model, "logits", self.tokenizer, entry, path)
        self.text = TextEncoder.for_model(self.tokenizer, self.model.config, entry.max_input_tokens)

    def tokenize(self, payloads: Sequence[RerankInput]) -> list[Encoded]:
        # Cut a long pair as CrossEncoder does (longest_first): the longer text loses tokens first.
        rows = self.text.encode([p.query for p in payloads], [p.document for p in payloads], "longest_first")
        return [Encoded([ids], truncated, [types] if types else None) for ids, types, truncated in rows]

    def infer(self, payloads: Sequence[RerankInput], encoded: Sequence[Encoded]) -> list[Relevance]:
        rows = [enc.rows_ids[0] for enc in encoded]
        types = [t for enc in encoded for t in (enc.rows_type_ids or [])]
        batch = pad_rows(rows, self.text.pad_id, types if len(types) == len(rows) else None, self.device)
        forward = self.forward
        assert forward is not None
        with torch.inference_mode():
            logits = forward(batch).float().cpu()[:, 0]
        scores = logits if self.function == "none" else torch.sigmoid(logits)
        chosen = torch.where(torch.tensor([p.raw for p in payloads]), logits, scores).tolist()
        return [Relevance(score, enc.truncated) for score, enc in zip(chosen, encoded, strict=True)]


class SimilarityRerankRunner(Runner):
    """Cosine similarity of query and document embeddings (unit vectors: a dot product)."""

    def __init__(self, entry: RerankEntry, path: Path, device: torch.device, dtype: torch.dtype) -> None:
        super().__init__()
        self.encoder = SentenceEncoder(entry, path, device, dtype)
        self.model = self.encoder.model
        self.forward = self.encoder.forward

    def tokenize(self, payloads: Sequence[RerankInput]) -> list[Encoded]:
        queries = sorted({p.query for p in payloads})
        by_query = dict(zip(queries, self.encoder.encode(queries), strict=True))
        documents = self.encoder.encode([p.document for p in payloads])
        return [
            Encoded([by_query[p.query].rows_ids[0], doc.rows_ids[0]], by_query[p.query].truncated or doc.truncated)
            for p, doc in zip(payloads, documents, strict=True)
        ]

    def infer(self, payloads: Sequence[RerankInput], encoded: Sequence[Encoded]) -> list[Relevance]:
        # Each distinct row once: a request's query heads every one of its pairs.
        distinct: dict[tuple[int, ...], int] = {}
        for enc in encoded:
            for ids in enc.rows_ids:
                distinct.setdefault(tuple(ids), len(distinct))
        vectors = self.encoder.embed([Encoded([list(ids)]) for ids in distinct])
        queries = torch.tensor([distinct[tuple(enc.rows_ids[0])] for enc in encoded])
        documents = torch.tensor([distinct[tuple(enc.rows_ids[1])] for enc in encoded])
        scores = (vectors[queries] * vectors[documents]).sum(dim=1).tolist()
        return [Relevance(score, enc.truncated) for score, enc in zip(scores, encoded, strict=True)]
