"""The cluster coordination (app/cluster.py) without Ray: a coordinator and two replica agents
in one event loop, over fake registries; and the merged metrics exposition."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any

import pytest

from app.cluster import Coordinator, ReplicaAgent
from app.metrics import merge_expositions


@dataclass
class _Entry:
    name: str


@dataclass
class _Slot:
    entry: _Entry
    state: Any
    error: str | None = None


class _State:
    def __init__(self, value: str) -> None:
        self.value = value


class FakeRegistry:
    def __init__(self) -> None:
        self.slots_ = {n: _Slot(_Entry(n), _State("not_loaded")) for n in ("a", "b")}
        self.calls: list[str] = []

    def slots(self) -> list[_Slot]:
        return list(self.slots_.values())

    async def get_or_load(self, name: str) -> None:
        self.calls.append(f"load {name}")
        self.slots_[name].state = _State("loaded")

    async def unload(self, name: str) -> None:
        self.calls.append(f"unload {name}")
        self.slots_[name].state = _State("not_loaded")


def agent(coordinator: Coordinator, name: str) -> ReplicaAgent:
    async def call(method: str, *args: Any) -> Any:
        return await getattr(coordinator, method)(*args)

    return ReplicaAgent(call, name)


@pytest.mark.anyio
async def test_a_command_is_applied_by_every_replica_and_by_one_that_starts_later() -> None:
    coordinator = Coordinator()
    one, two = agent(coordinator, "r1"), agent(coordinator, "r2")
    reg1, reg2 = FakeRegistry(), FakeRegistry()
    await one.start(reg1, lambda: b"")
    await two.start(reg2, lambda: b"")
    states = await one.set_loaded("a", True, timeout_s=10)
    assert states == {"r1": {"state": "loaded", "error": None}, "r2": {"state": "loaded", "error": None}}
    await two.set_loaded("b", False, timeout_s=10)
    # A later command does not repeat earlier ones: "a" was loaded once on each replica.
    assert reg1.calls == ["load a", "unload b"] and reg2.calls == ["load a", "unload b"]
    late_registry = FakeRegistry()
    late = agent(coordinator, "r3")
    await late.start(late_registry, lambda: b"")  # before it takes traffic
    assert late_registry.slots_["a"].state.value == "loaded"
    for a in (one, two, late):
        await a.stop()
    assert await coordinator.members() == []


@pytest.mark.anyio
async def test_metrics_are_collected_from_every_replica_and_labelled() -> None:
    coordinator = Coordinator()
    text = '# HELP x_total X.\n# TYPE x_total counter\nx_total{route="/a"} 2.0\ny 1.0\n'
    agents = [agent(coordinator, f"r{i}") for i in (1, 2)]
    for a in agents:
        await a.start(FakeRegistry(), lambda: text.encode())
    merged = (await asyncio.wait_for(agents[0].metrics(), 10)).decode()
    assert merged.count("# HELP x_total") == 1
    assert 'x_total{replica="r1",route="/a"} 2.0' in merged and 'x_total{replica="r2",route="/a"} 2.0' in merged
    for a in agents:
        await a.stop()


def test_merge_keeps_each_family_together() -> None:
    one = "# TYPE a counter\na 1\n# TYPE b gauge\nb{} 2\n"
    merged = merge_expositions({"x": one, "y": one}).splitlines()
    assert merged == [
        "# TYPE a counter",
        'a{replica="x"} 1',
        'a{replica="y"} 1',
        "# TYPE b gauge",
        'b{replica="x"} 2',
        'b{replica="y"} 2',
    ]
