"""The dynamic batcher on its own: batch formation, isolation, cancellation, backpressure."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import pytest

from app.batching import batcher as batcher_module
from app.batching.batcher import DynamicBatcher
from app.batching.threads import ThreadShare
from app.errors import DeadlineExceeded, InferenceFailed, ModelUnavailable, Overloaded

pytestmark = pytest.mark.anyio


@dataclass
class Enc:
    length: int
    rows: int = 1


class FakeRunner:
    """Upper-cases texts; records each batch; can be held, poisoned or run out of memory."""

    def __init__(self) -> None:
        self.batches: list[list[str]] = []
        self.encoded: list[str] = []
        self.gate = threading.Event()
        self.gate.set()
        self.entered = threading.Event()
        self.oom_above: int | None = None

    def encode(self, payloads: Sequence[str]) -> list[Enc]:
        self.encoded.extend(payloads)
        return [Enc(len(p.split())) for p in payloads]

    def infer(self, payloads: Sequence[str], encoded: Sequence[Any]) -> list[str]:
        self.entered.set()
        self.gate.wait(10)
        if self.oom_above is not None and len(payloads) > self.oom_above:
            raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")
        if any("poison" in p for p in payloads):
            raise ValueError("poisoned input")
        self.batches.append(list(payloads))
        return [p.upper() for p in payloads]


def make(runner: FakeRunner, **limits: int) -> DynamicBatcher:
    options = {"max_batch_size": 8, "max_batch_tokens": 10_000, "max_queue_items": 100, "lanes": 1}
    options |= {"padding_slack": 4} | limits
    return DynamicBatcher(runner, name="fake", **options)


async def submit(
    batcher: DynamicBatcher, payloads: Sequence[Any], *, deadline: float, group: Any = None, tenant: Any = None
) -> list[Any]:
    """One request through ``enqueue``, as the engine makes it (app/engine/core.py), with a
    future per input: its results, DeadlineExceeded at the deadline; cancelling it cancels the
    request in the batcher."""
    loop = asyncio.get_running_loop()
    futures = [loop.create_future() for _ in payloads]
    ticket = batcher.enqueue(payloads, futures, loop=loop, group=group, deadline=deadline, tenant=tenant)
    try:
        async with asyncio.timeout(max(0.0, deadline - time.monotonic())):
            return list(await asyncio.gather(*futures))
    except TimeoutError:
        raise DeadlineExceeded("past the deadline") from None
    finally:
        for future in futures:
            future.cancel()
        batcher.cancel(ticket)


def soon(seconds: float = 10) -> float:
    return time.monotonic() + seconds


async def wait_until(condition: Any, timeout: float = 5) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not reached"
        await asyncio.sleep(0.005)


async def test_an_idle_batcher_runs_a_request_at_once_and_batches_what_arrives_meanwhile() -> None:
    runner = FakeRunner()
    runner.gate.clear()
    batcher = make(runner)
    first = asyncio.create_task(submit(batcher, ["a"], deadline=soon()))
    await asyncio.to_thread(runner.entered.wait, 5)  # ran alone: no waiting for a batch to fill
    later = [asyncio.create_task(submit(batcher, [f"b{i}"], deadline=soon())) for i in range(5)]
    await wait_until(lambda: batcher.queue_depth == 6)
    runner.gate.set()
    assert await first == ["A"]
    assert [await t for t in later] == [[f"B{i}"] for i in range(5)]
    assert runner.batches == [["a"], ["b0", "b1", "b2", "b3", "b4"]]
    batcher.close()


async def test_a_large_request_is_split_across_batches_and_reassembled_in_order() -> None:
    runner = FakeRunner()
    batcher = make(runner, max_batch_size=4)
    texts = [" ".join(["w"] * (1 + (i * 7) % 13)) + f" {i}" for i in range(30)]
    assert await submit(batcher, texts, deadline=soon()) == [t.upper() for t in texts]
    assert max(len(b) for b in runner.batches) <= 4
    assert sum(len(b) for b in runner.batches) == 30
    batcher.close()


async def test_batches_group_similar_lengths_within_the_token_budget() -> None:
    runner = FakeRunner()
    runner.gate.clear()
    batcher = make(runner, max_batch_size=8, max_batch_tokens=39)
    blocker = asyncio.create_task(submit(batcher, ["hold"], deadline=soon()))
    await asyncio.to_thread(runner.entered.wait, 5)
    texts = ["x " * 2, "x " * 20, "x " * 3, "x " * 19, "x " * 2, "x " * 18]
    task = asyncio.create_task(submit(batcher, [t.strip() for t in texts], deadline=soon()))
    await wait_until(lambda: batcher.queue_depth == 7)
    runner.gate.set()
    await blocker
    await task
    lengths = [sorted(len(p.split()) for p in b) for b in runner.batches[1:]]
    assert sorted(lengths) == [[2, 2, 3], [18, 19], [20]]  # short ones together; long ones within 39 tokens
    batcher.close()


async def test_a_ragged_pool_becomes_two_tight_batches_rather_than_one_padded_one() -> None:
    runner = FakeRunner()
    runner.gate.clear()
    batcher = make(runner, max_batch_size=32)
    blocker = asyncio.create_task(submit(batcher, ["hold"], deadline=soon()))
    await asyncio.to_thread(runner.entered.wait, 5)
    texts = [" ".join(["w"] * n) for n in (60, 5, 62, 6, 5, 61)]
    task = asyncio.create_task(submit(batcher, texts, deadline=soon()))
    await wait_until(lambda: batcher.queue_depth == 7)
    runner.gate.set()
    await blocker
    assert await task == [t.upper() for t in texts]
    lengths = sorted(sorted(len(p.split()) for p in b) for b in runner.batches[1:])
    assert lengths == [[5, 5, 6], [60, 61, 62]]
    batcher.close()


@pytest.mark.parametrize(("slack", "expected"), [(4, [[5, 6], [14, 16]]), (12, [[5, 6, 14, 16]])])
async def test_the_padding_slack_lets_short_inputs_stretch_a_batch(slack: int, expected: list[list[int]]) -> None:
    # A model that packs its batches pays for padding only in attention: it gets a wider slack.
    runner = FakeRunner()
    runner.gate.clear()
    batcher = make(runner, max_batch_size=32, padding_slack=slack)
    blocker = asyncio.create_task(submit(batcher, ["hold"], deadline=soon()))
    await asyncio.to_thread(runner.entered.wait, 5)
    texts = [" ".join(["w"] * n) for n in (5, 14, 6, 16)]
    task = asyncio.create_task(submit(batcher, texts, deadline=soon()))
    await wait_until(lambda: batcher.queue_depth == 5)
    runner.gate.set()
    await blocker
    assert await task == [t.upper() for t in texts]
    assert sorted(sorted(len(p.split()) for p in b) for b in runner.batches[1:]) == expected
    batcher.close()


async def test_inputs_with_different_generation_settings_are_never_batched_together() -> None:
    runner = FakeRunner()
    runner.gate.clear()
    batcher = make(runner)
    blocker = asyncio.create_task(submit(batcher, ["hold"], group="g0", deadline=soon()))
    await asyncio.to_thread(runner.entered.wait, 5)
    a = asyncio.create_task(submit(batcher, ["a1", "a2"], group=("num_beams", 1), deadline=soon()))
    b = asyncio.create_task(submit(batcher, ["b1", "b2"], group=("num_beams", 4), deadline=soon()))
    await wait_until(lambda: batcher.queue_depth == 5)
    runner.gate.set()
    await asyncio.gather(blocker, a, b)
    assert sorted(runner.batches[1:]) == [["a1", "a2"], ["b1", "b2"]]
    batcher.close()


async def test_a_poisoned_input_fails_alone_and_its_batch_neighbours_succeed() -> None:
    runner = FakeRunner()
    runner.gate.clear()
    batcher = make(runner)
    blocker = asyncio.create_task(submit(batcher, ["hold"], deadline=soon()))
    await asyncio.to_thread(runner.entered.wait, 5)
    good = [asyncio.create_task(submit(batcher, [f"ok{i}"], deadline=soon())) for i in range(5)]
    bad = asyncio.create_task(submit(batcher, ["poison"], deadline=soon()))
    await wait_until(lambda: batcher.queue_depth == 7)
    runner.gate.set()
    await blocker
    assert [await t for t in good] == [[f"OK{i}"] for i in range(5)]
    with pytest.raises(InferenceFailed, match="poisoned input"):
        await bad
    assert await submit(batcher, ["after"], deadline=soon()) == ["AFTER"]  # the worker carries on
    batcher.close()


async def test_out_of_memory_halves_the_batch_down_to_one_item() -> None:
    runner = FakeRunner()
    runner.oom_above = 2
    batcher = make(runner, max_batch_size=16)
    texts = [f"t{i}" for i in range(11)]
    assert await submit(batcher, texts, deadline=soon()) == [t.upper() for t in texts]
    assert max(len(b) for b in runner.batches) <= 2

    runner.oom_above = 0  # even one item is too much
    with pytest.raises(ModelUnavailable, match="out of memory on this input alone"):
        await submit(batcher, ["huge"], deadline=soon())
    batcher.close()


async def test_a_full_queue_answers_overloaded_without_queueing_anything() -> None:
    runner = FakeRunner()
    runner.gate.clear()
    batcher = make(runner, max_queue_items=3)
    held = asyncio.create_task(submit(batcher, ["a", "b", "c"], deadline=soon()))
    await asyncio.to_thread(runner.entered.wait, 5)
    with pytest.raises(Overloaded) as err:
        await submit(batcher, ["d"], deadline=soon())
    assert err.value.retry_after is not None and err.value.retry_after >= 1
    runner.gate.set()
    assert await held == ["A", "B", "C"]
    assert "d" not in runner.encoded
    batcher.close()


async def test_a_cancelled_request_is_dropped_and_a_late_one_misses_its_deadline() -> None:
    runner = FakeRunner()
    runner.gate.clear()
    batcher = make(runner)
    blocker = asyncio.create_task(submit(batcher, ["hold"], deadline=soon()))
    await asyncio.to_thread(runner.entered.wait, 5)
    gone = asyncio.create_task(submit(batcher, ["gone"], deadline=soon()))
    stays = asyncio.create_task(submit(batcher, ["stays"], deadline=soon()))
    await wait_until(lambda: batcher.queue_depth == 3)
    gone.cancel()
    await wait_until(lambda: batcher.queue_depth == 2)  # dropped at once, not when a lane reaches it
    with pytest.raises(DeadlineExceeded):
        await submit(batcher, ["late"], deadline=time.monotonic() + 0.05)
    runner.gate.set()
    assert await stays == ["STAYS"]
    await blocker
    ran = [p for b in runner.batches for p in b]
    assert "gone" not in ran and "late" not in ran
    await wait_until(lambda: batcher.queue_depth == 0)
    batcher.close()


async def test_closing_fails_queued_requests_instead_of_hanging() -> None:
    runner = FakeRunner()
    runner.gate.clear()
    batcher = make(runner)
    blocker = asyncio.create_task(submit(batcher, ["hold"], deadline=soon()))
    await asyncio.to_thread(runner.entered.wait, 5)
    queued = asyncio.create_task(submit(batcher, ["queued"], deadline=soon()))
    await wait_until(lambda: batcher.queue_depth == 2)
    closing = asyncio.create_task(asyncio.to_thread(batcher.close))
    await wait_until(lambda: batcher.closed)
    runner.gate.set()
    await closing
    assert await blocker == ["HOLD"]
    with pytest.raises(ModelUnavailable, match="unloaded"):
        await queued
    with pytest.raises(ModelUnavailable):
        await submit(batcher, ["new"], deadline=soon())


# -- lanes -------------------------------------------------------------------------------


class LaneRunner(FakeRunner):
    """A FakeRunner that notes which lane ran each batch and how many ran at once."""

    def __init__(self) -> None:
        super().__init__()
        self.lanes: list[str] = []
        self.running = 0
        self.most_at_once = 0
        self.release_held = threading.Event()
        self._count = threading.Lock()

    def infer(self, payloads: Sequence[str], encoded: Sequence[Any]) -> list[str]:
        with self._count:
            self.running += 1
            self.most_at_once = max(self.most_at_once, self.running)
            self.lanes.append(threading.current_thread().name)
        try:
            time.sleep(0.002)
            if "held" in payloads:
                self.release_held.wait(5)
            return super().infer(payloads, encoded)
        finally:
            with self._count:
                self.running -= 1


async def test_a_second_lane_runs_while_the_first_is_busy() -> None:
    runner = LaneRunner()
    batcher = make(runner, lanes=2)
    first = asyncio.create_task(submit(batcher, ["held"], deadline=soon()))
    await wait_until(lambda: runner.running == 1)
    # The first lane is inside a forward pass that runs long (past SPREAD_ABOVE_S); the
    # next input does not wait for it.
    assert await submit(batcher, ["next"], deadline=soon()) == ["NEXT"]
    assert not first.done()
    runner.release_held.set()
    assert await first == ["HELD"]
    assert sorted(runner.lanes) == ["batcher-fake-0", "batcher-fake-1"]
    batcher.close()


@pytest.fixture
def short_batches(monkeypatch: pytest.MonkeyPatch) -> None:
    """A running batch counts as short for 30 s: only the other reasons bring a second lane."""
    monkeypatch.setattr(batcher_module, "SPREAD_ABOVE_S", 30.0)


async def test_inputs_arriving_during_a_short_batch_wait_for_its_lane_and_run_as_one_batch(
    short_batches: None,
) -> None:
    runner = LaneRunner()
    batcher = make(runner, lanes=2)
    first = asyncio.create_task(submit(batcher, ["held"], deadline=soon()))
    await wait_until(lambda: runner.running == 1)
    rest = [asyncio.create_task(submit(batcher, [f"x{i}"], deadline=soon())) for i in range(3)]
    await wait_until(lambda: batcher.queue_depth == 4)
    await asyncio.sleep(0.05)  # time enough for an idle lane to take them, were it to
    assert runner.running == 1
    runner.release_held.set()
    assert await first == ["HELD"]
    assert [await r for r in rest] == [["X0"], ["X1"], ["X2"]]
    assert runner.batches == [["held"], ["x0", "x1", "x2"]]
    assert runner.lanes == ["batcher-fake-0", "batcher-fake-0"]
    batcher.close()


async def test_a_full_batch_waiting_gets_a_second_lane_at_once(short_batches: None) -> None:
    runner = LaneRunner()
    batcher = make(runner, lanes=2, max_batch_size=2)
    first = asyncio.create_task(submit(batcher, ["held"], deadline=soon()))
    await wait_until(lambda: runner.running == 1)
    assert await submit(batcher, ["x0", "x1"], deadline=soon()) == ["X0", "X1"]
    assert not first.done()
    runner.release_held.set()
    assert await first == ["HELD"]
    batcher.close()


async def test_a_tenant_with_nothing_running_never_waits_behind_another_tenants_batch(
    short_batches: None,
) -> None:
    runner = LaneRunner()
    batcher = make(runner, lanes=2)
    first = asyncio.create_task(submit(batcher, ["held"], deadline=soon(), tenant="flood"))
    await wait_until(lambda: runner.running == 1)
    assert await submit(batcher, ["light"], deadline=soon(), tenant="light") == ["LIGHT"]
    assert not first.done()
    runner.release_held.set()
    assert await first == ["HELD"]
    batcher.close()


async def test_at_low_load_the_first_lane_does_all_the_work() -> None:
    runner = LaneRunner()
    batcher = make(runner, lanes=3)
    for i in range(30):
        assert await submit(batcher, [f"t{i}"], deadline=soon()) == [f"T{i}"]
    assert set(runner.lanes) == {"batcher-fake-0"}  # its torch threads stay warm; no other pool is made
    batcher.close()


async def test_many_lanes_answer_a_crowd_of_split_requests_in_order() -> None:
    runner = LaneRunner()
    batcher = make(runner, lanes=3, max_batch_size=4, max_queue_items=2000)
    requests = [[f"r{r} " + "w " * ((r * 5 + i) % 9) + f"i{i}" for i in range(1 + r % 5)] for r in range(200)]
    answers = await asyncio.gather(*(submit(batcher, texts, deadline=soon()) for texts in requests))
    assert answers == [[t.upper() for t in texts] for texts in requests]
    assert runner.most_at_once >= 2
    assert len(set(runner.lanes)) >= 2
    batcher.close()


def test_only_the_lead_lane_runs_multithreaded_and_only_when_it_runs_alone() -> None:
    counts: list[int] = []  # what each thread set for itself as it started
    share = ThreadShare(4, counts.append)
    share.QUIET_S = 0.1
    go = [threading.Event() for _ in range(4)]
    seen: dict[str, int] = {}

    def lead() -> None:
        with share.running():
            seen["lead alone"] = counts[-1]
            go[0].set()
            go[1].wait(5)
        with share.running():
            seen["lead, right after sharing"] = counts[-1]
        time.sleep(0.15)
        with share.running():
            seen["lead, after the quiet period"] = counts[-1]
        with share.running(backlog=True):
            seen["lead with inputs waiting"] = counts[-1]
        share.retire()

    def other(label: str, may_lead: bool) -> None:
        with share.running(may_lead):
            seen[label] = counts[-1]

    def run(label: str, may_lead: bool = True) -> None:
        thread = threading.Thread(target=other, args=(label, may_lead))
        thread.start()
        thread.join()

    leader = threading.Thread(target=lead)
    leader.start()
    go[0].wait(5)  # the first thread to run leads, alone on the whole budget
    run("another lane beside the lead")
    run("a load beside the lead", may_lead=False)
    go[1].set()
    leader.join()
    time.sleep(0.15)
    run("a load alone", may_lead=False)  # never leads
    time.sleep(0.15)
    run("the next lane, after the lead retired")
    assert seen == {
        "lead alone": 4,
        "another lane beside the lead": 1,
        "a load beside the lead": 1,
        "lead, right after sharing": 1,
        "lead, after the quiet period": 4,
        "lead with inputs waiting": 1,
        "a load alone": 1,
        "the next lane, after the lead retired": 4,
    }


async def holding(batcher: DynamicBatcher, runner: FakeRunner, texts: list[str], tenant: str) -> asyncio.Task[Any]:
    """A request of ``tenant`` inside its (held) forward pass when this returns."""
    task = asyncio.create_task(submit(batcher, texts, deadline=soon(), tenant=tenant))
    assert await asyncio.to_thread(runner.entered.wait, 5)
    return task


async def test_a_light_tenant_is_served_ahead_of_a_flooders_backlog() -> None:
    runner = FakeRunner()
    runner.gate.clear()
    batcher = make(runner, max_batch_size=4, express_lane=False)  # the order of the regular lanes alone
    blocker = await holding(batcher, runner, ["hold"], "flood")
    flood = [asyncio.create_task(submit(batcher, [f"f{i}"], deadline=soon(), tenant="flood")) for i in range(12)]
    await wait_until(lambda: batcher.queue_depth == 13)
    light = asyncio.create_task(submit(batcher, ["light"], deadline=soon(), tenant="light"))
    await wait_until(lambda: batcher.queue_depth == 14)
    runner.gate.set()
    await asyncio.gather(blocker, light, *flood)
    # Arrival order would run it fourth, after three batches of the flooder's backlog.
    assert "light" in runner.batches[1]
    flooded = [p for b in runner.batches for p in b if p.startswith("f")]
    assert flooded == [f"f{i}" for i in range(12)]  # equal lengths: the first in fair order go first
    batcher.close()


async def test_a_full_queue_still_admits_a_tenant_below_an_equal_share_of_it() -> None:
    runner = FakeRunner()
    runner.gate.clear()
    batcher = make(runner, max_queue_items=8)
    blocker = await holding(batcher, runner, ["hold"], "a")
    filling = asyncio.create_task(submit(batcher, ["a"] * 7, deadline=soon(), tenant="a"))
    await wait_until(lambda: batcher.queue_depth == 8)
    with pytest.raises(Overloaded, match="8 of them yours"):
        await submit(batcher, ["a again"], deadline=soon(), tenant="a")
    admitted = asyncio.create_task(submit(batcher, ["b"] * 3, deadline=soon(), tenant="b"))  # 3 <= 8 / 2
    await wait_until(lambda: batcher.queue_depth == 11)
    with pytest.raises(Overloaded, match="3 of them yours"):
        await submit(batcher, ["b"] * 2, deadline=soon(), tenant="b")  # 5 > 8 / 2
    runner.gate.set()
    assert await admitted == ["B"] * 3
    await asyncio.gather(blocker, filling)
    assert batcher.queue_depth == 0
    batcher.close()


class HoldingRunner(FakeRunner):
    """Holds only the batches holding "hold"; every other batch runs at once."""

    def infer(self, payloads: Sequence[str], encoded: Sequence[Any]) -> list[str]:
        if "hold" in payloads:
            return super().infer(payloads, encoded)
        self.batches.append(list(payloads))
        return [p.upper() for p in payloads]


async def test_a_light_tenant_runs_on_the_express_lane_while_a_flood_holds_every_lane() -> None:
    runner = HoldingRunner()
    runner.gate.clear()
    batcher = make(runner, lanes=1)
    hold = await holding(batcher, runner, ["hold", "f0"], "flood")
    backlog = asyncio.create_task(submit(batcher, ["f1", "f2", "f3"], deadline=soon(), tenant="flood"))
    await wait_until(lambda: batcher.queue_depth == 5)
    # The flood's batch is still running: the light request does not wait for it, nor run inside one.
    assert await asyncio.wait_for(submit(batcher, ["light"], deadline=soon(), tenant="light"), 5) == ["LIGHT"]
    assert runner.batches == [["light"]]
    assert not hold.done() and not backlog.done()
    runner.gate.set()
    assert await hold == ["HOLD", "F0"] and await backlog == ["F1", "F2", "F3"]
    batcher.close()


async def test_a_lone_tenant_never_uses_the_express_lane() -> None:
    runner = HoldingRunner()
    runner.gate.clear()
    batcher = make(runner, lanes=1)
    hold = await holding(batcher, runner, ["hold"], "only")
    more = asyncio.create_task(submit(batcher, ["more"], deadline=soon(), tenant="only"))
    await wait_until(lambda: batcher.queue_depth == 2)
    await asyncio.sleep(0.1)
    assert runner.batches == [] and not more.done()  # it waits for the lane, as it always did
    runner.gate.set()
    assert await hold == ["HOLD"] and await more == ["MORE"]
    batcher.close()
