"""Decoder positions per row of a running batch (app/runners/decoding.py): rows that joined
at different steps sit in one left-padded cache, so the step each one is at is its own, not
the cache's length. ``row_positions`` wraps a decoder's positional embedding to embed each
row at its own position. The modules it reads are guarded by
tests/test_framework_internals.py.
"""

from __future__ import annotations

import inspect
from typing import Any

import torch

# Model types whose decoder positions are relative (no position of a row's own is needed).
RELATIVE_POSITIONS = frozenset({"t5", "mt5", "umt5", "longt5", "switch_transformers"})


class RowPositions(torch.nn.Module):
    """Wraps a decoder's positional embedding so that each row of the running batch is
    embedded at its own position (``rows``, shape [rows, 1]); with ``rows`` unset it is the
    wrapped module, unchanged. Two kinds: a table looked up by position (BART, Marian, mBART,
    Pegasus; BART's and mBART's shifted by ``offset``), and M2M100's and NLLB's sinusoids,
    which count positions from past the padding index."""

    def __init__(self, inner: Any) -> None:
        super().__init__()
        self.inner = inner
        self.rows: torch.Tensor | None = None

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        if self.rows is None:
            return self.inner(*args, **kwargs)
        inner: Any = self.inner
        if isinstance(inner, torch.nn.Embedding):
            return torch.nn.functional.embedding(self.rows + int(getattr(inner, "offset", 0)), inner.weight)
        positions = self.rows + inner.padding_idx + 1
        fed = args[0] if args else kwargs.get("input_ids")
        if fed is not None:  # a padding token fed back (generated) sits at the padding index, as there
            positions = torch.where(fed.ne(inner.padding_idx), positions, inner.padding_idx)
        needed = int(positions.max()) + 1
        if needed > inner.weights.shape[0]:  # as its own forward grows the table
            inner.make_weights(needed + inner.offset, inner.embedding_dim, inner.padding_idx)
        return inner.weights.index_select(0, positions.reshape(-1)).reshape(*positions.shape, -1).detach()

    @staticmethod
    def fits(embed: Any) -> bool:
        """Whether ``embed`` is a kind this wraps."""
        if isinstance(embed, torch.nn.Embedding):
            return "position_ids" in inspect.signature(embed.forward).parameters
        return all(hasattr(embed, name) for name in ("weights", "padding_idx", "make_weights", "offset")) and hasattr(
            embed, "create_position_ids_from_input_ids"
        )


def row_positions(model: Any) -> RowPositions | bool | None:
    """Installs RowPositions on the model's decoder where its positions are absolute and of
    a kind it knows; None where they are relative (T5), False where neither holds (rows then
    join only an empty batch)."""
    if model.config.model_type in RELATIVE_POSITIONS:
        return None
    decoder = model.get_decoder()
    embed = getattr(decoder, "embed_positions", None)
    if isinstance(embed, RowPositions):
        return embed
    if not RowPositions.fits(embed):
        return False
    wrapped = RowPositions(embed)
    decoder.embed_positions = wrapped
    return wrapped
