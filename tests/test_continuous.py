"""Continuous batching for translation and summarization, as clients see it and in both
process layouts: a request joins a running generation at the next decoder step and answers
as soon as its own output ends; finished sequences and beams leave the batch; deadlines,
429s, fairness, token budgets and refused settings keep the batcher's guarantees. The tests
count decoder steps and rows, never time."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path
from typing import Any

import pytest
import torch
from fastapi import FastAPI

from app.batching.continuous import ContinuousBatcher
from app.catalog import TranslationEntry
from app.errors import DeadlineExceeded, InvalidInput
from app.payloads import Seq2SeqInput
from app.runners.seq2seq import Seq2SeqRunner
from tests.conftest import core_of, serve

pytestmark = pytest.mark.anyio

MODEL = "marian-en-de"
LONG = {"max_new_tokens": 300, "min_length": 300}  # decoder tokens: runs ~300 steps


async def until(condition: Callable[[], bool], what: str, seconds: float = 30) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, f"never: {what}"
        await asyncio.sleep(0.002)


@contextmanager
def decoder_rows(runner: Any, pause_s: float = 0.0) -> Iterator[list[int]]:
    """The rows of every decoder pass of ``runner``'s model, in order (a joining input's
    first step is a pass of its own); ``pause_s`` slows each pass (deadline tests)."""
    rows: list[int] = []

    def hook(module: Any, args: Any, output: Any) -> None:
        rows.append(int(output.last_hidden_state.shape[0]))
        if pause_s:
            time.sleep(pause_s)

    handle = runner.model.get_decoder().register_forward_hook(hook)
    try:
        yield rows
    finally:
        handle.remove()


def translate(text: str, **parameters: Any) -> dict[str, Any]:
    return {"inputs": text, "model": MODEL, "parameters": parameters}


async def loaded(client: Any, app: FastAPI) -> Any:
    assert (await client.post(f"/models/{MODEL}/load")).status_code == 200
    return core_of(app).registry.slot(MODEL)


@asynccontextmanager
async def beside_a_long_generation(
    app_factory: Callable[..., FastAPI],
    steps: int,
) -> AsyncIterator[tuple[Any, Any, list[int], asyncio.Task[Any]]]:
    """A served app whose model runs a long generation (``steps`` steps in already): its
    client, the model's slot, the decoder's rows per pass, and the long request."""
    app = app_factory()
    async with serve(app) as client:
        slot = await loaded(client, app)
        with decoder_rows(slot.runner) as rows:
            long = asyncio.create_task(client.post("/translate", json=translate("a long one", **LONG)))
            await until(lambda: len(rows) >= steps, "the long generation runs")
            yield client, slot, rows, long


async def test_a_request_joins_a_running_generation_and_answers_before_it_ends(
    app_factory: Callable[..., FastAPI],
) -> None:
    async with beside_a_long_generation(app_factory, steps=5) as (client, slot, rows, long):
        short = await client.post("/translate", json=translate("a short one", max_new_tokens=3))
        assert short.status_code == 200, short.text
        assert not long.done()  # the short request did not wait for the long one's end
        steps_at_short = len(rows)
        answer = await long
        assert slot.batcher.queue_depth == 0
    assert answer.status_code == 200, answer.text
    assert steps_at_short < 100
    # The short one ran beside the long one (2 rows), then left: the long one ran on alone.
    assert 2 in rows
    assert rows[-1] == 1 and rows[steps_at_short:].count(2) == 0


async def test_a_beam_search_holds_a_row_per_beam_and_its_rows_leave_together(
    app_factory: Callable[..., FastAPI],
) -> None:
    async with beside_a_long_generation(app_factory, steps=3) as (client, _, rows, long):
        beams = await client.post("/translate", json=translate("four beams", num_beams=4, max_new_tokens=5))
        assert beams.status_code == 200, beams.text
        after = len(rows)
        assert (await long).status_code == 200
    assert 1 + 4 in rows  # the greedy row and the four beams, in one pass
    assert set(rows[after:]) == {1}


async def test_a_deadline_passed_mid_generation_answers_504_and_its_rows_stop(
    app_factory: Callable[..., FastAPI],
) -> None:
    app = app_factory()
    async with serve(app) as client:
        slot = await loaded(client, app)
        with decoder_rows(slot.runner, pause_s=0.01) as rows:
            body = {**translate("too slow", **LONG), "timeout_s": 1}
            answer = await client.post("/translate", json=body)
            assert answer.status_code == 504, answer.text
            at_answer = len(rows)
            await until(lambda: slot.in_flight == 0 and slot.batcher.queue_depth == 0, "the engine let it go")
            await asyncio.sleep(0.2)
            assert len(rows) <= at_answer + 1  # at most the step that was running
        assert at_answer < 300


async def test_a_full_queue_answers_429_with_retry_after_while_generations_run(
    app_factory: Callable[..., FastAPI],
) -> None:
    app = app_factory(max_queue_items=2, max_inputs_per_request=2, max_batch_size=1)
    async with serve(app) as client:
        slot = await loaded(client, app)
        with decoder_rows(slot.runner) as rows:
            running = asyncio.create_task(client.post("/translate", json=translate("one", **LONG)))
            await until(lambda: len(rows) >= 2, "the first runs")
            queued = asyncio.create_task(client.post("/translate", json=translate("two", max_new_tokens=2)))
            await until(lambda: slot.batcher.queue_depth == 2, "the second waits")
            refused = await client.post("/translate", json=translate("three", max_new_tokens=2))
            assert refused.status_code == 429, refused.text
            assert int(refused.headers["retry-after"]) >= 1
            assert (await running).status_code == 200 and (await queued).status_code == 200


# -- the batcher, below the routes ---------------------------------------------------------


class Outcome:
    """An input's outcome as the engine's is: set on the loop, deltas kept."""

    def __init__(self, loop: asyncio.AbstractEventLoop, streams: bool = False) -> None:
        self.future: asyncio.Future[Any] = loop.create_future()
        self.streams = streams
        self.deltas: list[Any] = []

    def done(self) -> bool:
        return self.future.done()

    def set_result(self, result: Any) -> None:
        self.future.set_result(result)

    def set_exception(self, exception: BaseException) -> None:
        self.future.set_exception(exception)

    def delta(self, piece: Any) -> None:
        self.deltas.append(piece)


@pytest.fixture(scope="module")
def marian(tiny_models: dict[str, Path]) -> Seq2SeqRunner:
    """The tiny Marian's runner, outside any app (no route: one layout is enough)."""
    entry = TranslationEntry(
        name=MODEL, task="translation", source_lang="en", target_lang="de", source={"path": "unused"}
    )
    return Seq2SeqRunner(entry, tiny_models["marian"], torch.device("cpu"), torch.float32)


def batcher_of(runner: Any, **options: Any) -> ContinuousBatcher:
    defaults: dict[str, Any] = {
        "name": MODEL,
        "max_batch_size": 8,
        "max_batch_tokens": 4096,
        "max_queue_items": 64,
        "padding_slack": 0,
    }
    return ContinuousBatcher(runner, **{**defaults, **options})


def enqueue(batcher: ContinuousBatcher, text: str, tenant: str, outcome: Outcome, **settings: Any) -> None:
    timeout = settings.pop("timeout", 60)
    generation = tuple(sorted(settings.items()))
    batcher.enqueue(
        [Seq2SeqInput(text, generation)],
        [outcome],
        loop=asyncio.get_running_loop(),
        deadline=time.monotonic() + timeout,
        tenant=tenant,
    )


@contextmanager
def joins(runner: Any) -> Iterator[list[str]]:
    """The texts in the order they join the running batch."""
    order: list[str] = []
    real = runner.start

    def start(batch: Any, payload: Any, encoded: Any, streaming: bool) -> Any:
        order.append(payload.text)
        return real(batch, payload, encoded, streaming)

    runner.start = start
    try:
        yield order
    finally:
        runner.start = real


async def test_a_light_tenant_joins_ahead_of_a_flooders_backlog(marian: Any) -> None:
    batcher = batcher_of(marian, max_batch_size=1)
    loop = asyncio.get_running_loop()
    try:
        with joins(marian) as order, decoder_rows(marian) as rows:
            rows.clear()
            flood = [Outcome(loop) for _ in range(4)]
            enqueue(batcher, "flood 0", "flooder", flood[0], max_new_tokens=40, min_length=40)
            await until(lambda: len(rows) >= 2, "the flood runs")
            for i, outcome in enumerate(flood[1:], start=1):
                enqueue(batcher, f"flood {i}", "flooder", outcome, max_new_tokens=4)
            light = Outcome(loop)
            enqueue(batcher, "light", "light", light, max_new_tokens=4)
            await asyncio.gather(*(o.future for o in flood), light.future)
        assert order[:2] == ["flood 0", "light"], order
    finally:
        batcher.close()


async def test_joining_inputs_stay_within_the_batch_token_budget(marian: Any) -> None:
    texts = [f"a sentence of some length that fills the budget {i}" for i in range(5)]
    costs = [len(encoded.rows_ids[0]) for encoded in marian.encode([Seq2SeqInput(t) for t in texts])]
    assert 2 * max(costs) < 3 * min(costs)
    batcher = batcher_of(marian, max_batch_tokens=2 * max(costs))  # two such inputs at a time
    loop = asyncio.get_running_loop()
    try:
        with decoder_rows(marian) as rows:
            outcomes = [Outcome(loop) for _ in texts]
            for text, outcome in zip(texts, outcomes, strict=True):
                enqueue(batcher, text, "t", outcome, max_new_tokens=6)
            await asyncio.gather(*(o.future for o in outcomes))
        assert max(rows) == 2, rows
    finally:
        batcher.close()


async def test_settings_the_model_refuses_fail_that_input_alone(marian: Any) -> None:
    batcher = batcher_of(marian)
    loop = asyncio.get_running_loop()
    try:
        fine, refused = Outcome(loop), Outcome(loop)
        enqueue(batcher, "fine", "t", fine, max_new_tokens=30, min_length=30)
        enqueue(batcher, "refused", "t", refused, num_beams=2, do_sample=False, num_beam_groups=3)
        with pytest.raises(InvalidInput):
            await refused.future
        assert (await fine.future).text is not None
    finally:
        batcher.close()


async def test_streaming_inputs_get_their_text_in_deltas_that_add_up_to_the_result(marian: Any) -> None:
    batcher = batcher_of(marian)
    loop = asyncio.get_running_loop()
    try:
        greedy, beams, quiet = Outcome(loop, streams=True), Outcome(loop, streams=True), Outcome(loop)
        enqueue(batcher, "stream this", "t", greedy, max_new_tokens=20, min_length=20)
        enqueue(batcher, "and this", "t", beams, num_beams=3, max_new_tokens=20, min_length=20)
        enqueue(batcher, "not this", "t", quiet, max_new_tokens=20, min_length=20)
        results = await asyncio.gather(greedy.future, beams.future, quiet.future)
        for outcome, result in zip((greedy, beams), results[:2], strict=True):
            assert outcome.deltas, "no delta before the result"
            streamed = "".join(d.text for d in outcome.deltas)
            assert result.text.startswith(streamed)
            assert [d.tokens for d in outcome.deltas] == sorted({d.tokens for d in outcome.deltas})
        assert len(greedy.deltas) > 1
        assert quiet.deltas == []
    finally:
        batcher.close()


async def test_a_queued_input_past_its_deadline_fails_without_running(marian: Any) -> None:
    batcher = batcher_of(marian, max_batch_size=1)
    loop = asyncio.get_running_loop()
    try:
        with joins(marian) as order:
            first, late = Outcome(loop), Outcome(loop)
            enqueue(batcher, "first", "t", first, max_new_tokens=60, min_length=60)
            enqueue(batcher, "late", "t", late, max_new_tokens=4, timeout=0.01)
            with pytest.raises(DeadlineExceeded):
                await late.future
            await first.future
        assert order == ["first"]
    finally:
        batcher.close()


async def test_sampling_with_top_k_1_gives_the_greedy_text(marian: Any) -> None:
    """Sampling runs its own token choice (softmax, then a draw) per request: with one
    candidate left (top_k 1) each draw must be greedy's pick, beside greedy requests."""
    batcher = batcher_of(marian)
    loop = asyncio.get_running_loop()
    try:
        texts = ["a sampled text", "another one, longer than the first"]
        sampled = [Outcome(loop) for _ in texts]
        greedy = [Outcome(loop) for _ in texts]
        for text, one, other in zip(texts, sampled, greedy, strict=True):
            enqueue(batcher, text, "t", one, do_sample=True, top_k=1, temperature=0.7, max_new_tokens=12)
            enqueue(batcher, text, "t", other, max_new_tokens=12)
        got = await asyncio.gather(*(o.future for o in sampled))
        want = await asyncio.gather(*(o.future for o in greedy))
        assert [g.text for g in got] == [w.text for w in want]
    finally:
        batcher.close()
