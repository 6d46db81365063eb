"""From texts to the tensors a model reads: token limits, tokenizing (truncating only what
is too long), padding rows into a batch. Shared by the runners and the forward checks."""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from app.runners.wordpiece import PlainWordPiece

# A tokenizer whose model_max_length is unset reports this huge sentinel.
_UNSET_MAX = 1_000_000


def max_input_tokens(tokenizer: Any, config: Any, override: int | None) -> int:
    """The longest input the model accepts: the entry's override, else what tokenizer and config say."""
    limits = [override] if override else []
    if 0 < tokenizer.model_max_length < _UNSET_MAX:
        limits.append(tokenizer.model_max_length)
    positions = getattr(config, "max_position_embeddings", None)
    if positions:
        # RoBERTa-style models offset positions by the padding index.
        offset = (config.pad_token_id + 1) if config.model_type in {"roberta", "xlm-roberta"} else 0
        limits.append(positions - offset)
    return min(limits) if limits else 512


class TextEncoder:
    """Texts to token ids the way the tokenizer's ``__call__`` makes them, truncating only
    inputs over ``max_tokens``; ``pad_id`` is what a batch pads with.

    With a Rust ("fast") tokenizer, ids come from a private copy of its backend, called
    directly (``encode_batch_fast``: no offsets, no per-call settings, no Python encoding
    objects): MiniLM's tokenizer on texts of 5-60 words, 56 us per text where ``__call__``
    took 132 for one text, 53 against 71 for 16; with the cached lengths and pad id, the
    engine's CPU per request on bench/ceiling.py 0.91x (single texts and 32-text requests,
    side by side in one run). A BERT WordPiece tokenizer's plain ASCII texts skip Rust too
    (``plain``, app/runners/wordpiece.py): engine CPU per request 0.79x again, 32-text
    requests 0.74x (bench/ceiling.py against 8ab6112). Each path is kept only where it gives
    exactly ``__call__``'s ids and token types on probe texts (pairs included); any other
    tokenizer, and one without a Rust backend, is tokenized by ``__call__``. Not
    thread-safe: its owner holds its tokenizer lock.
    """

    def __init__(self, tokenizer: Any, max_tokens: int) -> None:
        self.tokenizer = tokenizer
        self.max_tokens = max_tokens
        self.pad_id = pad_id_of(tokenizer)
        self.types = "token_type_ids" in getattr(tokenizer, "model_input_names", ())
        self.direct = self._direct_backend()
        self.plain = self._plain_path()

    @classmethod
    def for_model(cls, tokenizer: Any, config: Any, override: int | None) -> TextEncoder:
        """The encoder for a model: its longest input from ``max_input_tokens``."""
        return cls(tokenizer, max_input_tokens(tokenizer, config, override))

    def encode(
        self, texts: Sequence[str], pairs: Sequence[str] | None = None, truncation: str = "only_first"
    ) -> list[tuple[list[int], list[int] | None, bool]]:
        """(ids, token_type_ids or None, truncated) per text (per text/pair with ``pairs``, a
        pair too long cut as ``truncation`` says: the tokenizer's strategies)."""
        full = (
            self._direct(self.direct, self.plain, texts, pairs) if self.direct is not None else self._call(texts, pairs)
        )
        out: list[tuple[list[int], list[int] | None, bool]] = []
        for i, (ids, type_ids) in enumerate(full):
            if len(ids) <= self.max_tokens:
                out.append((ids, type_ids, False))
                continue
            short = self.tokenizer(
                texts[i],
                pairs[i] if pairs is not None else None,
                truncation=truncation if pairs is not None else True,
                max_length=self.max_tokens,
            )
            out.append((short["input_ids"], short.get("token_type_ids"), True))
        return out

    def _call(self, texts: Sequence[str], pairs: Sequence[str] | None) -> list[tuple[list[int], list[int] | None]]:
        full = self.tokenizer(list(texts), list(pairs) if pairs is not None else None, verbose=False)
        types = full["token_type_ids"] if "token_type_ids" in full else itertools.repeat(None)
        return list(zip(full["input_ids"], types, strict=False))  # types may repeat None

    def _direct(
        self, direct: Any, plain: PlainWordPiece | None, texts: Sequence[str], pairs: Sequence[str] | None
    ) -> list[tuple[list[int], list[int] | None]]:
        if plain is None:
            return self._rust(direct, texts, pairs)
        answers = [plain.encode(text, pairs[i] if pairs is not None else None) for i, text in enumerate(texts)]
        rest = [i for i, got in enumerate(answers) if got is None]  # not plain: to Rust, in one call
        rust = iter(
            self._rust(direct, [texts[i] for i in rest], [pairs[i] for i in rest] if pairs is not None else None)
            if rest
            else ()
        )
        out: list[tuple[list[int], list[int] | None]] = []
        for got in answers:
            ids, types = got if got is not None else next(rust)
            out.append((ids, types if self.types else None))
        return out

    def _rust(
        self, direct: Any, texts: Sequence[str], pairs: Sequence[str] | None
    ) -> list[tuple[list[int], list[int] | None]]:
        inputs = list(texts) if pairs is None else list(zip(texts, pairs, strict=True))
        encodings = direct.encode_batch_fast(inputs, add_special_tokens=True)
        return [(e.ids, e.type_ids if self.types else None) for e in encodings]

    def _direct_backend(self) -> Any:
        backend = getattr(self.tokenizer, "backend_tokenizer", None)
        if backend is None or not hasattr(backend, "encode_batch_fast"):
            return None
        try:
            direct = type(backend).from_str(backend.to_str())
            direct.no_truncation()
            direct.no_padding()
            if any(self._direct(direct, None, texts, pairs) != self._call(texts, pairs) for texts, pairs in _PROBES):
                return None
        except Exception:  # a backend this version cannot copy or call: __call__ serves
            return None
        return direct

    def _plain_path(self) -> PlainWordPiece | None:
        """The Python path for plain ASCII texts, kept where it gives ``__call__``'s ids."""
        if self.direct is None:
            return None
        try:
            plain = PlainWordPiece.of(self.direct)
            if plain is None or any(
                self._direct(self.direct, plain, texts, pairs) != self._call(texts, pairs) for texts, pairs in _PROBES
            ):
                return None
        except Exception:  # a tokenizer this path cannot read: Rust serves
            return None
        return plain


# Texts on which the direct paths must give __call__'s ids: case, accents, CJK, emoji,
# punctuation, runs of spaces, an empty text, special-token look-alikes, and pairs; for the
# plain ASCII path, words the vocabulary lacks, a word past WordPiece's longest, digits,
# tabs and line ends.
_PROBES: list[tuple[list[str], list[str] | None]] = [
    (
        [
            "Hello, World! It's a test.",
            "  Ünïcödé   naïve café — déjà vu…  ",
            "東京は日本の首都です。 emoji 🙂👍 and tabs\tnew\nlines",
            "",
            "[CLS] <s> </s> <pad> [MASK] <mask> 1,234.56 e-mail@example.com",
            "The QUICK fox's e-mail: fox@example.com; costs $1,234.56 (approx.)\tto-day\r\nOK?!~`^_|",
            "Supercalifragilistic antidisestablishmentarianism zzyzx " + "x" * 120,
        ],
        None,
    ),
    (["The cat sat on the mat.", "Ça va?"], ["This text is about animals.", "C'est une question."]),
]


def pad_rows(
    rows: Sequence[list[int]], pad_id: int, type_rows: Sequence[list[int]] | None, device: torch.device
) -> dict[str, torch.Tensor]:
    """Right-pad token rows into input_ids / attention_mask (/ token_type_ids) tensors.

    One numpy pass over all the tokens (a mask of the real positions, filled from the
    concatenated rows), not a tensor per row: 37 us for 16 rows where the per-row copy took
    355 us (bench/ceiling.py measures what that is worth per request)."""
    lengths = np.fromiter(map(len, rows), dtype=np.int64, count=len(rows))
    width, total = int(lengths.max()), int(lengths.sum())
    real = np.arange(width) < lengths[:, None]
    ids = np.full((len(rows), width), pad_id, dtype=np.int64)
    ids[real] = np.fromiter(itertools.chain.from_iterable(rows), dtype=np.int64, count=total)
    batch = {"input_ids": torch.from_numpy(ids), "attention_mask": torch.from_numpy(real.astype(np.int64))}
    if type_rows is not None:
        types = np.zeros((len(rows), width), dtype=np.int64)
        types[real] = np.fromiter(itertools.chain.from_iterable(type_rows), dtype=np.int64, count=total)
        batch["token_type_ids"] = torch.from_numpy(types)
    return {k: v.to(device) for k, v in batch.items()}


def pad_id_of(tokenizer: Any) -> int:
    pad = tokenizer.pad_token_id
    return int(pad if pad is not None else (tokenizer.eos_token_id or 0))
