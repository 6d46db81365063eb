"""Batch formation (app/batching/forming.py): which waiting inputs run together next."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from app.batching.forming import PendingInput, Ticket, form_batch


@dataclass
class Tokens:
    length: int
    rows: int = 1


def pool(*inputs: tuple[int, Any]) -> list[PendingInput]:
    """Inputs of the given (token length, group), oldest first."""
    return [
        PendingInput(Ticket(), f"input {seq}", group, None, None, 0.0, seq, encoded=Tokens(length))  # type: ignore[arg-type]
        for seq, (length, group) in enumerate(inputs)
    ]


def lengths(batch: list[PendingInput]) -> list[int]:
    return [item.encoded.length for item in batch]


def form(waiting: list[PendingInput], **limits: Any) -> list[PendingInput]:
    return form_batch(
        waiting, **{"max_items": 32, "max_tokens": 10_000, "padding_ratio": 1.2, "padding_slack": 4, **limits}
    )


def test_the_oldest_input_runs_with_its_nearest_neighbours_by_length() -> None:
    waiting = pool((20, None), (40, None), (18, None), (22, None), (25, None), (10, None))
    # 18..22 is within 4 tokens of 18 (and 1.2x); 25 or 10 would stretch it past both.
    assert lengths(form(waiting)) == [18, 20, 22]
    assert lengths(form(waiting, padding_slack=12)) == [18, 20, 22, 25]
    assert lengths(form(waiting, max_items=2)) == [18, 20]


def test_a_batch_keeps_to_its_group_and_its_token_budget() -> None:
    waiting = pool((20, "greedy"), (20, "beam"), (21, "greedy"), (22, "greedy"))
    assert [item.group for item in form(waiting)] == ["greedy"] * 3
    assert lengths(form(waiting, max_tokens=42)) == [20, 21]  # a third input needs 3 x 22 tokens
    assert form([], max_tokens=1) == []
