"""What fronts and the engine say to each other over ZeroMQ: msgspec structs, encoded as
MessagePack, many to a frame.

A frame is a list of operations. A front sends every request it has ready in one frame (a
single-text request is ~60 bytes) and the engine answers the requests that finished together
in one frame, so the per-frame costs (a syscall, a wake-up) are shared. Payloads and results
are the payload and result dataclasses (app/payloads.py) that the task table names, which
msgspec encodes and decodes natively; each kind of payload has its own tagged struct, so a
frame decodes in one pass. A streamed request's Delta and Result events share frames with
everything else the engine sends in that loop turn.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Union

import msgspec
import zmq

from app.tasks import TASKS

# Per kind of payload (named by its type): its type and the type of its results, from the
# task table (app/tasks.py), so a new task's payload travels without a line here.
KINDS: dict[str, tuple[type, type]] = {task.payload.__name__: (task.payload, task.result) for task in TASKS}
KIND_OF = {payload: kind for kind, (payload, _) in KINDS.items()}


class _InferHead(msgspec.Struct, array_like=True, tag=True):
    rid: int
    model: str
    timeout_s: float
    tenant: str | None
    group: tuple[tuple[str, Any], ...] | None


class Infer(_InferHead, kw_only=True, array_like=True, tag=True):
    """One request's inputs for a model (the field ``payloads`` is typed per kind below).
    ``timeout_s`` counts from when the model is loaded, as in-process; ``group`` is the
    generation settings that inputs must share to run together. ``stream``: send the
    request's Delta events, and each input's Result as it settles, before its Done.
    ``trace``: with tracing on (app/tracing.py), the W3C ``traceparent`` and ``tracestate``
    of the front's span, under which the engine's spans go; None (one byte) when off.
    (Keyword-only, so that they travel last and a frame without them decodes as off.)"""

    stream: bool = False
    trace: tuple[str, str] | None = None


def _infer_struct(kind: str, payload: type) -> type[Infer]:
    fields = [("payloads", list[payload])]  # type: ignore[valid-type]
    struct: type[Infer] = msgspec.defstruct(f"Infer_{kind}", fields, bases=(Infer,), tag=kind, array_like=True)  # type: ignore[assignment]
    return struct


INFER = {kind: _infer_struct(kind, payload) for kind, (payload, _) in KINDS.items()}


class Cancel(msgspec.Struct, array_like=True, tag=True):
    """The client left: drop the request's inputs that have not run."""

    rid: int


class Call(msgspec.Struct, array_like=True, tag=True):
    """A control operation (app/engine/core.py: EngineCore.CALLS), answered by Answer or Failed."""

    rid: int
    op: str
    args: list[Any]


class Hello(msgspec.Struct, array_like=True, tag=True):
    """A front announces itself; the engine answers with States, then sends them every second."""

    front: str


class Exposition(msgspec.Struct, array_like=True, tag=True):
    """A front's Prometheus text, asked for by Expose."""

    rid: int
    text: str


# The union a frame to the engine decodes as: Infer's subclasses, one per kind.
ToEngine = Union[(*INFER.values(), Cancel, Call, Hello, Exposition)]  # type: ignore[valid-type]


class Delta(msgspec.Struct, array_like=True, tag=True):
    """Input ``index`` of a streamed request generated ``text`` since its last Delta, and
    ``tokens`` so far (app/payloads.py: GenerationDelta)."""

    rid: int
    index: int
    text: str
    tokens: int


class Result(msgspec.Struct, array_like=True, tag="Result"):
    """Input ``index`` of a streamed request is done: its result, ahead of the request's Done."""

    rid: int
    index: int
    result: Any


class ResultRaw(msgspec.Struct, array_like=True, tag="Result"):
    """Result as a front decodes it: the result left encoded until its type is known."""

    rid: int
    index: int
    result: msgspec.Raw


class Done(msgspec.Struct, array_like=True, tag="Done"):
    """A request's results, in input order, the sizes of the batches they ran in, and its
    tokens (the request's span says them: app/tracing.py)."""

    rid: int
    results: list[Any]
    sizes: list[int]
    tokens: int = 0


class DoneRaw(msgspec.Struct, array_like=True, tag="Done"):
    """Done as a front decodes it: the results left encoded until their type is known."""

    rid: int
    results: msgspec.Raw
    sizes: list[int]
    tokens: int = 0


class Failed(msgspec.Struct, array_like=True, tag=True):
    """A request (or call) failed with ``error``, a ServiceError type's name (app/errors.py)."""

    rid: int
    error: str
    message: str
    retry_after: float | None


class Answer(msgspec.Struct, array_like=True, tag=True):
    rid: int
    value: Any


class SlotState(msgspec.Struct, array_like=True):
    """What fronts mirror of one catalog entry (app/registry/slots.py: ModelSlot)."""

    name: str
    state: str
    device: str | None
    error: str | None
    memory_bytes: int
    load_seconds: float | None
    queue_depth: int
    loads: int
    backend: str | None
    backend_note: str | None


class States(msgspec.Struct, array_like=True, tag=True):
    """Every catalog entry's state; sent on a change and every second (the heartbeat)."""

    hub_online: bool
    slots: list[SlotState]


class Expose(msgspec.Struct, array_like=True, tag=True):
    """The engine asks a front for its metrics (one front's /metrics answers for all), in the
    Prometheus text format or OpenMetrics."""

    rid: int
    openmetrics: bool = False


FromEngine = DoneRaw | Failed | Answer | States | Expose | Delta | ResultRaw


def open_socket(kind: int, identity: bytes | None = None) -> zmq.Socket[bytes]:
    """A ZeroMQ socket as both ends use it: unbounded queues (the batcher's queue limit is the
    bound), nothing kept after close."""
    sock: zmq.Socket[bytes] = zmq.Context.instance().socket(kind)
    if identity is not None:
        sock.setsockopt(zmq.IDENTITY, identity)
    sock.setsockopt(zmq.SNDHWM, 0)
    sock.setsockopt(zmq.RCVHWM, 0)
    sock.setsockopt(zmq.LINGER, 0)
    return sock


encode = msgspec.msgpack.Encoder().encode
decode_to_engine = msgspec.msgpack.Decoder(list[ToEngine]).decode  # type: ignore[valid-type]
decode_from_engine = msgspec.msgpack.Decoder(list[FromEngine]).decode
RESULTS: dict[str, Callable[[bytes], list[Any]]] = {
    kind: msgspec.msgpack.Decoder(list[result]).decode  # type: ignore[valid-type]
    for kind, (_, result) in KINDS.items()
}
RESULT: dict[str, Callable[[bytes], Any]] = {
    kind: msgspec.msgpack.Decoder(result).decode for kind, (_, result) in KINDS.items()
}
