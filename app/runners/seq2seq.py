"""Translation and abstractive summarization: AutoTokenizer + AutoModelForSeq2SeqLM + generate.

transformers v5 has no translation or summarization pipelines, so this module does
their job: entry prefixes (T5), source-language and forced-BOS tokens (mBART, NLLB),
batched ``generate`` with per-request settings, and inputs longer than the model's
maximum either truncated (and reported) or split into sentence-aligned chunks (for a
translation, at its line breaks first, so that its outputs rejoin in the text's shape).
"""

from __future__ import annotations

import re
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import pysbd
import torch
from transformers import AutoModelForSeq2SeqLM, AutoTokenizer, StoppingCriteria, StoppingCriteriaList

from app.catalog import SummarizationEntry, TranslationEntry
from app.errors import InvalidInput
from app.payloads import Generation, Seq2SeqInput
from app.runners.base import Encoded, Runner, Wanted, weights_kwargs
from app.runners.tokens import TextEncoder, pad_rows

# Room left for special tokens when packing chunks.
_CHUNK_MARGIN = 4
# A line break, with the blanks around it: what separates the lines of a text cut at its lines.
_LINE_BREAKS = re.compile(r"(\s*\n\s*)")


class ClientsGone(StoppingCriteria):
    """Ends the rows whose clients left (``wanted`` says which still wait) at the next step:
    a batch whose clients all left stops, and a request that left costs at most one more
    step. The rows of one input (its beams, and beam search's candidates) lie together."""

    def __init__(self, wanted: Callable[[], Sequence[bool]]) -> None:
        self.wanted = wanted

    def __call__(self, input_ids: torch.LongTensor, scores: Any, **kwargs: Any) -> torch.BoolTensor:
        waiting = self.wanted()
        rows = input_ids.shape[0]
        if all(waiting):
            return torch.zeros(rows, dtype=torch.bool, device=input_ids.device)  # type: ignore[return-value]
        gone = torch.tensor([not w for w in waiting], device=input_ids.device)
        return gone.repeat_interleave(rows // len(waiting))  # type: ignore[return-value]


class Seq2SeqRunner(Runner):
    pads_cheaply = True
    # generate() spends much of each step in Python, so two lanes contend for the GIL: measured
    # at concurrency 16, 0.79x offline batched generate with two lanes, 0.92x with one.
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

    def tokenize(self, payloads: Sequence[Seq2SeqInput]) -> list[Encoded]:
        texts = [self.prefix + p.text for p in payloads]
        # generate() rejects token_type_ids (BERT-style tokenizers return them), so drop them.
        return [Encoded([ids], truncated) for ids, _, truncated in self.text.encode(texts)]

    def infer(
        self, payloads: Sequence[Seq2SeqInput], encoded: Sequence[Encoded], wanted: Wanted = None
    ) -> list[Generation]:
        # The batcher only batches inputs of one group, i.e. one set of generation settings.
        requested = dict(payloads[0].generation)
        defaults = dict(self.defaults)
        if {"max_new_tokens", "max_length"} & requested.keys():
            # A client's length limit replaces the entry's, whichever of the two it was given as.
            defaults.pop("max_new_tokens", None)
            defaults.pop("max_length", None)
        settings = {**defaults, **requested}
        if "max_new_tokens" in settings and "max_length" in settings:
            settings.pop("max_length")  # max_new_tokens is the more precise of the two
        self._within_positions(settings)
        batch = pad_rows([e.rows_ids[0] for e in encoded], self.text.pad_id, None, self.device)
        if wanted is not None:
            settings["stopping_criteria"] = StoppingCriteriaList([ClientsGone(wanted)])
        try:
            with torch.inference_mode():
                output = self.model.generate(**batch, **settings)
        except ValueError as exc:
            # transformers checks the settings it is given; a combination it refuses is the client's.
            raise InvalidInput(f"model refused these generation settings: {exc}") from exc
        with self.tokenizer_lock:
            texts = self.tokenizer.batch_decode(output, skip_special_tokens=True)
        return [Generation(t.strip(), e.truncated) for t, e in zip(texts, encoded, strict=True)]

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
