"""BERT-family tokenization of plain ASCII text in Python, with the Rust tokenizer's ids.

For a text of printable ASCII (and tab, newline, carriage return), what a ``BertNormalizer``
and a ``BertPreTokenizer`` do comes down to: lowercase (where the normalizer does), split on
whitespace, every punctuation character a word of its own. WordPiece is then one dict lookup
per word, and a greedy longest-first split for the few words the vocabulary lacks. The Rust
tokenizer keeps alignment tables and builds an encoding per call: on MiniLM's tokenizer and
texts of 5-60 words, 9 texts took 930-1000 us through ``encode_batch_fast`` and 95-115 us
here (one thread; bench/ceiling.py measures what that is worth per request). Any other text
(accents, CJK, emoji, control characters, an added token's text such as ``[MASK]``) goes to
the Rust tokenizer; TextEncoder keeps this path only where it gives the tokenizer's own ids
on probe texts.
"""

from __future__ import annotations

import json
import re
from typing import Any

# What gates a text onto this path: ASCII without control characters other than \t \n \r.
_NOT_PLAIN = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")


class PlainWordPiece:
    """The tokenizer ``backend`` (a ``tokenizers.Tokenizer``) on plain ASCII texts; ``None``
    from ``encode`` where a text is not plain."""

    def __init__(self, spec: dict[str, Any], backend: Any) -> None:
        model = spec["model"]
        self.vocab: dict[str, int] = model["vocab"]
        self.unk = [self.vocab[model["unk_token"]]]
        self.prefix = model["continuing_subword_prefix"]
        self.longest = model["max_input_chars_per_word"]
        self.lowercase = bool(spec["normalizer"]["lowercase"])
        self._words = re.compile(r"[a-z0-9]+|[^a-z0-9\s]" if self.lowercase else r"[A-Za-z0-9]+|[^A-Za-z0-9\s]")
        added = sorted({token["content"].lower() for token in spec.get("added_tokens", [])}, key=len, reverse=True)
        self._added = re.compile("|".join(map(re.escape, added))) if added else None
        self._template(backend)

    @classmethod
    def of(cls, backend: Any) -> PlainWordPiece | None:
        """The path for ``backend``, or None where it is not a BERT WordPiece tokenizer (a
        layout this code cannot read raises: TextEncoder then leaves every text to Rust)."""
        spec = json.loads(backend.to_str())
        kinds = [(spec.get(part) or {}).get("type") for part in ("model", "normalizer", "pre_tokenizer")]
        if kinds != ["WordPiece", "BertNormalizer", "BertPreTokenizer"]:
            return None
        return cls(spec, backend)

    def _template(self, backend: Any) -> None:
        """Where the special tokens and token types go, read off the backend's own encoding of
        one word (and of a pair of it)."""
        word = next(
            (w for w, _ in sorted(self.vocab.items(), key=lambda kv: kv[1]) if re.fullmatch("[a-z]{2,}", w)), None
        )
        if word is None:
            raise ValueError("the vocabulary has no plain word to read the template with")
        wid = self.vocab[word]
        one, two = backend.encode(word), backend.encode(word, word)
        if one.ids.count(wid) != 1 or two.ids.count(wid) != 2:
            raise ValueError("the post-processor's template could not be read")
        at = one.ids.index(wid)
        self.head, self.tail = one.ids[:at], one.ids[at + 1 :]
        self.head_types, self.type_a, self.tail_types = one.type_ids[:at], one.type_ids[at], one.type_ids[at + 1 :]
        first = two.ids.index(wid)
        second = two.ids.index(wid, first + 1)
        self.pair_head, self.pair_mid, self.pair_tail = (
            two.ids[:first],
            two.ids[first + 1 : second],
            two.ids[second + 1 :],
        )
        types = two.type_ids
        self.pair_types = (types[:first], types[first], types[first + 1 : second], types[second], types[second + 1 :])

    def encode(self, text: str, pair: str | None = None) -> tuple[list[int], list[int]] | None:
        """(ids, token type ids) with the special tokens, or None where either text is not plain."""
        a = self.pieces(text)
        if a is None:
            return None
        if pair is None:
            return self.head + a + self.tail, self.head_types + [self.type_a] * len(a) + self.tail_types
        b = self.pieces(pair)
        if b is None:
            return None
        head, type_a, mid, type_b, tail = self.pair_types
        ids = self.pair_head + a + self.pair_mid + b + self.pair_tail
        return ids, head + [type_a] * len(a) + mid + [type_b] * len(b) + tail

    def pieces(self, text: str) -> list[int] | None:
        """The ids of ``text``'s word pieces, without special tokens; None where not plain."""
        if not text.isascii() or _NOT_PLAIN.search(text):
            return None
        lowered = text.lower()
        if self._added is not None and self._added.search(lowered):
            return None  # the Rust tokenizer matches added tokens before anything else
        out: list[int] = []
        vocab, longest = self.vocab, self.longest
        for word in self._words.findall(lowered if self.lowercase else text):
            i = vocab.get(word)
            if i is None or len(word) > longest:
                out += self._split(word)
            else:
                out.append(i)
        return out

    def _split(self, word: str) -> list[int]:
        """WordPiece's greedy longest-first pieces of a word the vocabulary lacks (or [UNK])."""
        if len(word) > self.longest:
            return self.unk
        out, start = [], 0
        while start < len(word):
            for end in range(len(word), start, -1):
                i = self.vocab.get(word[start:end] if start == 0 else self.prefix + word[start:end])
                if i is not None:
                    out.append(i)
                    start = end
                    break
            else:
                return self.unk
        return out
