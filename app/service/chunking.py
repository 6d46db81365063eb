"""Chunked translation: each text cut (by the model's runner) into pieces the model reads
whole, at its line breaks first; every piece of every text run as one engine request; the
outputs put back together with the text's own separators (blank lines, newlines, indents),
so a translated document keeps its paragraphs and lines.

Streamed, a text's deltas keep document order: a piece's deltas wait until every piece
before it in its text is complete, then go out in the order they came (docs/streaming.md).
"""

from __future__ import annotations

from collections.abc import Sequence
from itertools import accumulate

from app.payloads import Generation, GenerationDelta
from app.service.requests import Progress, Translation

Split = tuple[list[str], list[str]]  # a text's pieces, and the separators around them (one more)


class Pieces:
    """The pieces of a request's texts, in one list, and how each text is put back together:
    ``separators[0]`` leads, ``separators[k + 1]`` follows piece k."""

    def __init__(self, splits: Sequence[Split]) -> None:
        self.splits = list(splits)
        self.texts = [piece for pieces, _ in self.splits for piece in pieces]
        self.owners = [(i, k) for i, (pieces, _) in enumerate(self.splits) for k in range(len(pieces))]
        self.starts = [0, *accumulate(len(pieces) for pieces, _ in self.splits)]

    def joined(self, results: Sequence[Generation]) -> list[Translation]:
        """Each text's translation, from its pieces' (``results`` in the order of ``texts``)."""
        return [self.join(i, results[self.starts[i] : self.starts[i + 1]]) for i in range(len(self.splits))]

    def join(self, index: int, results: Sequence[Generation]) -> Translation:
        separators = self.splits[index][1]
        text = separators[0] + "".join(r.text + after for r, after in zip(results, separators[1:], strict=True))
        return Translation(text, any(r.truncated for r in results), chunks=len(results))

    def in_order(self, progress: Progress) -> InOrder:
        return InOrder(self, progress)


class InOrder:
    """A chunked request's engine events (per piece) reported to ``progress`` per text, in
    document order: ``delta`` and ``result`` are the engine client's listeners. A delta
    carries the text's separators that come before it; its tokens count the text's."""

    def __init__(self, pieces: Pieces, progress: Progress) -> None:
        self.pieces, self.progress = pieces, progress
        n = len(pieces.splits)
        self.current = [0] * n  # per text: its piece whose deltas go out as they come
        self.done_tokens = [0] * n  # per text: the tokens of its complete pieces
        self.separated = [0] * n  # per text: how many of its separators went out
        self.held: dict[int, list[GenerationDelta]] = {}  # per piece not yet current: its deltas
        self.tokens: dict[int, int] = {}  # per piece: its tokens so far
        self.results: dict[int, Generation] = {}  # per piece: its result, once complete

    def delta(self, at: int, piece: GenerationDelta) -> None:
        text, k = self.pieces.owners[at]
        self.tokens[at] = piece.tokens
        if k == self.current[text]:
            self._send(text, k + 1, piece.text, self.done_tokens[text] + piece.tokens)
        else:
            self.held.setdefault(at, []).append(piece)

    def result(self, at: int, result: Generation) -> None:
        text, _ = self.pieces.owners[at]
        self.results[at] = result
        start, end = self.pieces.starts[text], self.pieces.starts[text + 1]
        n = end - start
        while self.current[text] < n and start + self.current[text] in self.results:  # on to the next piece
            self.done_tokens[text] += self.tokens.get(start + self.current[text], 0)
            self.current[text] += 1
            k = self.current[text]
            for held in self.held.pop(start + k, []) if k < n else []:
                self._send(text, k + 1, held.text, self.done_tokens[text] + held.tokens)
        if self.current[text] == n:
            separators = self.pieces.splits[text][1]
            if self.separated[text]:  # it spoke: the separators after its last delta, the trailing one included
                self._send(text, len(separators), "", self.done_tokens[text])
            self.progress.final(text, self.pieces.join(text, [self.results[p] for p in range(start, end)]))

    def _send(self, text: int, separators_before: int, new: str, tokens: int) -> None:
        """``new`` text of ``text``, after its separators not yet sent up to ``separators_before``."""
        separators = self.pieces.splits[text][1]
        lead = "".join(separators[self.separated[text] : separators_before])
        self.separated[text] = max(self.separated[text], separators_before)
        if lead or new:
            self.progress.delta(text, GenerationDelta(lead + new, tokens))
