"""Translation and abstractive summarization: AutoTokenizer + AutoModelForSeq2SeqLM, decoded
step by step in one running batch (app/runners/decoding.py) that the continuous batcher
drives (app/batching/continuous.py).

transformers v5 has no translation or summarization pipelines, so this module does
their job: entry prefixes (T5), source-language and forced-BOS tokens (mBART, NLLB),
each input's generation settings over the entry's, and inputs longer than the model's
maximum either truncated (and reported) or split into sentence-aligned chunks (for a
translation, at its line breaks first, so that its outputs rejoin in the text's shape).
"""

from __future__ import annotations

import re
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pysbd
import torch
from transformers import AutoModelForSeq2SeqLM, AutoTokenizer

from app.catalog import SummarizationEntry, TranslationEntry
from app.payloads import Seq2SeqInput
from app.runners.base import Encoded, Runner, weights_kwargs
from app.runners.decoding import Generating, RunningBatch
from app.runners.search import PER_INPUT_SETTINGS, Plan, plan
from app.runners.tokens import TextEncoder

# Room left for special tokens when packing chunks.
_CHUNK_MARGIN = 4
# Sets of generation settings whose preparation is kept (the oldest goes first).
_PLANS_KEPT = 64
# A line break, with the blanks around it: what separates the lines of a text cut at its lines.
_LINE_BREAKS = re.compile(r"(\s*\n\s*)")


class Seq2SeqRunner(Runner):
    steps = True  # served by the continuous batcher, one running batch
    cpu_lanes = 1

    def __init__(
        self,
        entry: TranslationEntry | SummarizationEntry,
        path: Path,
        device: torch.device,
        dtype: torch.dtype,
    ) -> None:
        super().__init__()
        self.tokenizer = AutoTokenizer.from_pretrained(str(path), trust_remote_code=False)
        self.model = AutoModelForSeq2SeqLM.from_pretrained(str(path), dtype=dtype, **weights_kwargs(entry.allow_pickle))
        self.model.to(device).eval()
        self.prefix = entry.prefix
        self.defaults = entry.generation.model_dump(exclude_none=True)
        if isinstance(entry, TranslationEntry):
            if entry.tokenizer_src_lang:
                self.tokenizer.src_lang = entry.tokenizer_src_lang
            if entry.forced_bos_token:
                token_id = self.tokenizer.convert_tokens_to_ids(entry.forced_bos_token)
                if token_id is None or token_id == self.tokenizer.unk_token_id:
                    raise RuntimeError(f"forced_bos_token '{entry.forced_bos_token}' is not in the vocabulary")
                self.defaults["forced_bos_token_id"] = token_id
        self.text = TextEncoder.for_model(self.tokenizer, self.model.config, entry.max_input_tokens)
        # The decoder's positions (its start token included); None where they are relative (T5).
        self.max_output_tokens: int | None = getattr(self.model.config, "max_position_embeddings", None)
        # Chunking runs on request threads, so it gets its own tokenizer and lock: the
        # lanes' tokenizer is never used by them.
        self._chunk_tokenizer = AutoTokenizer.from_pretrained(str(path), trust_remote_code=False)
        self._chunk_lock = threading.Lock()
        self._segmenter = pysbd.Segmenter(language="en", clean=False)
        self._plans: dict[tuple[tuple[str, Any], ...], Plan] = {}  # per set of settings, prepared once

    def tokenize(self, payloads: Sequence[Seq2SeqInput]) -> list[Encoded]:
        texts = [self.prefix + p.text for p in payloads]
        # generate() rejects token_type_ids (BERT-style tokenizers return them), so drop them.
        return [Encoded([ids], truncated) for ids, _, truncated in self.text.encode(texts)]

    def running_batch(self) -> RunningBatch:
        return RunningBatch(self.model, self.text.pad_id, self._decode)

    def start(self, batch: RunningBatch, payload: Seq2SeqInput, encoded: Encoded, streaming: bool) -> Generating:
        settings = self._settings(payload)
        key = tuple(sorted(settings.items()))
        input_ids = encoded.rows_ids[0]
        shared = not any(name in settings for name in PER_INPUT_SETTINGS)
        prepared = self._plans.get(key) if shared else None
        if prepared is None:
            prepared = plan(self.model, settings, torch.tensor([input_ids], device=self.device))
            if shared:
                if len(self._plans) >= _PLANS_KEPT:
                    self._plans.pop(next(iter(self._plans)))
                self._plans[key] = prepared
        return batch.start(prepared, input_ids, encoded.truncated, streaming)

    def rows_of(self, payload: Seq2SeqInput) -> int:
        beams = dict(payload.generation).get("num_beams", self.defaults.get("num_beams"))
        return int(beams or self.model.generation_config.num_beams or 1)

    def _settings(self, payload: Seq2SeqInput) -> dict[str, Any]:
        """The input's generation settings over the entry's defaults."""
        requested = dict(payload.generation)
        defaults = dict(self.defaults)
        if {"max_new_tokens", "max_length"} & requested.keys():
            # A client's length limit replaces the entry's, whichever of the two it was given as.
            defaults.pop("max_new_tokens", None)
            defaults.pop("max_length", None)
        settings = {**defaults, **requested}
        if "max_new_tokens" in settings and "max_length" in settings:
            settings.pop("max_length")  # max_new_tokens is the more precise of the two
        self._within_positions(settings)
        return settings

    def _decode(self, ids: Sequence[int]) -> str:
        with self.tokenizer_lock:
            return str(self.tokenizer.decode(list(ids), skip_special_tokens=True))

    def _within_positions(self, settings: dict[str, Any]) -> None:
        """A decoder with learned positions (Marian 512, BART 1024) cannot go past its last one:
        a longer output fails inside generate. The lengths asked for are upper bounds, so the
        model's own limit stands in for a larger one (and a min_length yields to it)."""
        limit = self.max_output_tokens
        if limit is None:
            return
        for key, most in (("max_length", limit), ("min_length", limit), ("max_new_tokens", limit - 1)):
            if key in settings:
                settings[key] = min(settings[key], most)

    def split_into_chunks(self, text: str) -> list[str]:
        """Sentence-aligned pieces that each fit the model's input; long sentences are cut by tokens."""
        with self._chunk_lock:
            return self._pack(text, self._chunk_budget())

    def split_keeping_lines(self, text: str) -> tuple[list[str], list[str]]:
        """``text`` as pieces that each fit the model's input, and the separators that join
        their outputs back into its shape: ``separators[0]`` leads, ``separators[k + 1]``
        follows piece k. A text that fits is one piece, itself. A longer one is cut at its
        line breaks first (a model's tokenizer drops them, so each line is its own piece and
        the breaks, blank lines and indents are kept as separators), then a line still too
        long between its sentences, as ``split_into_chunks`` does (a space rejoins those)."""
        with self._chunk_lock:
            budget = self._chunk_budget()
            if self._tokens(text) <= budget:
                return [text], ["", ""]
            pieces: list[str] = []
            separators = [""]
            # Lines at even places, the line breaks between them (and the spaces around those) at odd.
            for place, part in enumerate(_LINE_BREAKS.split(text)):
                line = part.strip()
                if place % 2 or not line:
                    separators[-1] += part
                    continue
                separators[-1] += part[: len(part) - len(part.lstrip())]
                chunks = [line] if self._tokens(line) <= budget else self._pack(line, budget)
                for k, chunk in enumerate(chunks):
                    if k:
                        separators[-1] += " "
                    pieces.append(chunk)
                    separators.append("")
                separators[-1] += part[len(part.rstrip()) :]
        return pieces, separators

    def _chunk_budget(self) -> int:
        prefix_tokens = self._tokens(self.prefix)
        return max(self.text.max_tokens - _CHUNK_MARGIN - prefix_tokens, 8)

    def _tokens(self, text: str) -> int:
        # verbose=False: a text over the model's maximum is what this counts, not a mistake to warn of.
        return len(self._chunk_tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"])

    def _pack(self, text: str, budget: int) -> list[str]:
        """Sentences of ``text`` packed into pieces of at most ``budget`` tokens (under the lock)."""
        chunks: list[str] = []
        current: list[str] = []
        used = 0
        for sentence in self._segmenter.segment(text):
            ids = self._chunk_tokenizer(sentence, add_special_tokens=False)["input_ids"]
            pieces = [ids[i : i + budget] for i in range(0, len(ids), budget)] or [[]]
            for piece in pieces:
                piece_text = sentence if len(pieces) == 1 else str(self._chunk_tokenizer.decode(piece))
                if current and used + len(piece) > budget:
                    chunks.append(" ".join(current).strip())
                    current, used = [], 0
                current.append(piece_text.strip())
                used += len(piece)
        if current:
            chunks.append(" ".join(current).strip())
        return [c for c in chunks if c]
