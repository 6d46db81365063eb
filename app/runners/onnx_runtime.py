"""An encoder's forward pass on ONNX Runtime (CPU): exported from the same weights at first
load, cached on disk, kept only where it matches eager torch.

The graph is exported with ``torch.onnx.export`` (the dynamo exporter: batch and token
dimensions stay dynamic; the TorchScript exporter baked sequence-dependent values into
transformers v5's graphs and answered wrong), through a wrapper that passes the inputs by
keyword. It is written under the cache root (``TESSERA_ONNX_CACHE``, else ``onnx/`` in
Hugging Face's cache directory) in a folder keyed by the model's files (name, size, time),
the output, the export settings and the torch, onnxscript and onnxruntime versions: a
changed key exports again, an unchanged one skips the export (MiniLM on 2 cores: 1.7 s to
load against 10.6 s with it; bench/backends.py).

At load, the session's outputs are compared with eager torch on the same check batches as
a trace (app/runners/traced.py); past the tolerance the model runs on torch and the reason
is logged and shown in ``/models``. ``quantize: int8`` quantizes the weights dynamically
(``onnxruntime.quantization``), only on a CPU with 8-bit dot-product instructions (VNNI;
without them int8 measured no faster than fp32) and only where its outputs keep the
float model's on ``QUALITY_TEXTS``: pooled vectors at cosine >= ``INT8_MIN_COSINE``,
classifiers' best label on every sentence, a one-score head's (a cross-encoder's) sigmoid
within ``INT8_MAX_SCORE_SHIFT``.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import threading
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

# What the export writes; a change here exports every model again.
EXPORT_FORMAT = 2
INT8_MIN_COSINE = 0.99
INT8_MAX_SCORE_SHIFT = 0.05


@dataclass
class _Settings:
    cache: Path | None = None
    threads: int = 0  # 0: ONNX Runtime's own choice


_settings = _Settings()
_export_lock = threading.Lock()  # one export at a time: each takes every core for seconds


def configure(cache: Path | None, threads: int) -> None:
    """Where exports are cached (None: Hugging Face's cache directory) and the intra-op
    threads of each session (the process's torch budget); set once by the registry."""
    _settings.cache, _settings.threads = cache, threads


def available() -> bool:
    try:
        import onnxruntime  # noqa: F401
        import onnxscript  # noqa: F401
    except ImportError:
        return False
    return True


def cache_root() -> Path:
    if _settings.cache is not None:
        return _settings.cache
    from huggingface_hub import constants

    return Path(constants.HF_HOME) / "onnx"


def cpu_has_int8_dot_product() -> bool:
    """VNNI (AVX-512 or AVX): what makes ONNX Runtime's int8 matrix products pay on a CPU."""
    with contextlib.suppress(OSError):
        flags = Path("/proc/cpuinfo").read_text()
        return any(flag in flags for flag in ("avx512_vnni", "avx_vnni", "amx_int8"))
    return False


class OnnxForward:
    """ONNX Runtime sessions that take the padded batch the model takes and return
    ``{output: tensor}``, as the model and its traces do.

    A session's intra-op thread count is fixed when it is made, while a lane's share of the
    cores changes (app/batching/threads.py sets torch's count per batch: every core for a
    lane running alone, one while lanes share them). So there is one session per count a
    lane asks for, made on first use, read from torch's count on the calling thread: a lone
    request runs on every core, two lanes on one core each, as on torch. Each session holds
    its own copy of the weights (two for a model on a 2-core CPU).
    """

    def __init__(self, graph: Path, output: str, inputs: list[str], kind: str) -> None:
        self.graph = graph
        self.output = output
        self.inputs = inputs
        self.kind = kind  # "onnx" or "onnx-int8"
        self._sessions: dict[int, Any] = {}
        self._lock = threading.Lock()

    def memory_bytes(self) -> int:
        """What its sessions hold: the graph's weights once per thread count a lane may ask for."""
        counts = {1, _settings.threads or 1}
        return self.graph.stat().st_size * len(counts)

    def session(self, threads: int) -> Any:
        with self._lock:
            if threads not in self._sessions:
                self._sessions[threads] = _session(self.graph, threads)
            return self._sessions[threads]

    def __call__(self, **batch: torch.Tensor) -> dict[str, torch.Tensor]:
        feeds = {name: batch[name].numpy() for name in self.inputs}
        session = self.session(torch.get_num_threads())  # the lane's share (ThreadShare sets it)
        # run() returns arrays of its own: nothing of torch's is freed under them.
        return {self.output: torch.from_numpy(session.run(None, feeds)[0])}


class _Keywords(nn.Module):
    """The model with its inputs by keyword (transformers v5 moved the positional ones)."""

    def __init__(self, model: Any, output: str, inputs: list[str]) -> None:
        super().__init__()
        self.model, self.output, self.inputs = model, output, inputs

    def forward(self, *tensors: torch.Tensor) -> torch.Tensor:
        return getattr(self.model(**dict(zip(self.inputs, tensors, strict=True))), self.output)


def build(model: Any, path: Path, output: str, inputs: list[str], example: dict[str, torch.Tensor]) -> OnnxForward:
    """The sessions for ``model`` (loaded from ``path``), exported or taken from the cache."""
    graph = cache_root() / _key(model, path, output, inputs) / "model.onnx"
    with _export_lock:
        if not graph.is_file():
            _export(model, output, inputs, example, graph)
    return OnnxForward(graph, output, inputs, "onnx")


def quantized(float_forward: OnnxForward) -> OnnxForward:
    """Its int8 twin, quantized beside the float graph or taken from there."""
    graph = float_forward.graph.with_name("model.int8.onnx")
    with _export_lock:
        if not graph.is_file():
            _quantize(float_forward.graph, graph)
    return OnnxForward(graph, float_forward.output, float_forward.inputs, "onnx-int8")


def _session(graph: Path, threads: int) -> Any:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    # Lanes run sessions side by side: threads that spin between operations would take
    # the cores from the other lane.
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.log_severity_level = 3
    return ort.InferenceSession(str(graph), options, providers=["CPUExecutionProvider"])


def _key(model: Any, path: Path, output: str, inputs: list[str]) -> str:
    import onnxruntime
    import onnxscript

    files = sorted((f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in Path(path).iterdir() if f.is_file())
    described = {
        "model": str(Path(path).resolve()),
        "files": files,
        "dtype": str(next(model.parameters()).dtype),
        "output": output,
        "inputs": inputs,
        "format": EXPORT_FORMAT,
        "versions": [torch.__version__, onnxscript.__version__, onnxruntime.__version__],
    }
    digest = hashlib.sha256(json.dumps(described, sort_keys=True).encode()).hexdigest()[:16]
    return f"{Path(path).name}-{digest}"


def _export(model: Any, output: str, inputs: list[str], example: dict[str, torch.Tensor], graph: Path) -> None:
    graph.parent.mkdir(parents=True, exist_ok=True)
    partial = graph.with_suffix(f".{os.getpid()}.partial")
    batch, tokens = torch.export.Dim("batch"), torch.export.Dim("tokens")
    args = tuple(example[name] for name in inputs)
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()), torch.inference_mode(False):
        warnings.simplefilter("ignore")
        torch.onnx.export(
            _Keywords(model, output, inputs).eval(),
            args,
            str(partial),
            dynamo=True,
            input_names=inputs,
            output_names=["output"],
            dynamic_shapes=(tuple({0: batch, 1: tokens} for _ in inputs),),  # forward(*tensors)
            external_data=False,
            verbose=False,
        )
    partial.replace(graph)  # whole or not at all: a half-written graph is never loaded


def _quantize(graph: Path, quantized: Path) -> None:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    partial = quantized.with_suffix(f".{os.getpid()}.partial")
    # Per output channel, matrix products only: MiniLM's pooled vectors kept cosine 0.990 of
    # the float model's on QUALITY_TEXTS this way, 0.956 with one scale per tensor.
    quantize_dynamic(
        str(graph), str(partial), weight_type=QuantType.QInt8, per_channel=True, op_types_to_quantize=["MatMul"]
    )
    partial.replace(quantized)


# Real sentences for the int8 guard: random token ids (the float check's batches) are far
# from any text the model was trained on, and quantization errors grow there.
QUALITY_TEXTS = [
    "The movie was a delight from start to finish.",
    "I would not recommend this hotel to anyone.",
    "Stocks fell sharply after the central bank raised interest rates.",
    "The recipe calls for two cups of flour and a pinch of salt.",
    "Our flight was delayed for three hours because of the storm.",
    "A new species of frog was discovered in the rainforest.",
    "Please reset your password using the link in this email.",
    "The team won the championship in overtime.",
    "How do I renew my passport?",
    "It is raining again.",
]


def quality_batches(
    model: Any, tokenizer: Any, output: str, inputs: list[str]
) -> list[tuple[dict[str, torch.Tensor], torch.Tensor]]:
    """``QUALITY_TEXTS`` as one padded batch, and the eager model's output on it."""
    encoded = tokenizer(QUALITY_TEXTS, padding=True, truncation=True, max_length=128, return_tensors="pt")
    batch = {name: encoded[name] for name in inputs}
    with torch.inference_mode():
        return [(batch, getattr(model(**batch), output).float())]


def int8_keeps_quality(
    output: str, expected: list[tuple[dict[str, torch.Tensor], torch.Tensor]], candidate: OnnxForward
) -> str | None:
    """None where the int8 session keeps the float model's answers on the check batches;
    else what it lost."""
    for batch, want in expected:
        got = candidate(**batch)[output].float()
        if output == "last_hidden_state":
            mask = batch["attention_mask"].unsqueeze(-1).float()
            pooled_want = (want * mask).sum(1) / mask.sum(1)
            pooled_got = (got * mask).sum(1) / mask.sum(1)
            cosine = float(torch.nn.functional.cosine_similarity(pooled_want, pooled_got).min())
            if cosine < INT8_MIN_COSINE:
                return f"int8 vectors at cosine {cosine:.3f} of the float model's (needs {INT8_MIN_COSINE})"
        elif want.shape[-1] == 1:  # one score per input (a cross-encoder): no best label to keep
            moved = float((torch.sigmoid(got) - torch.sigmoid(want)).abs().max())
            if moved > INT8_MAX_SCORE_SHIFT:
                return f"int8 moved a score by {moved:.3f} (allowed {INT8_MAX_SCORE_SHIFT})"
        elif not np.array_equal(want.argmax(-1).numpy(), got.argmax(-1).numpy()):
            return "int8 changed the best label of a check input"
    return None
