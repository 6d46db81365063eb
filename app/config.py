"""Server settings, read from the environment (prefix ``TESSERA_``) or a ``.env`` file and
validated once at start-up: a bad value stops the server with a message naming it. The
model catalog has its own schema (app/catalog.py).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import AliasChoices, Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

DEFAULT_CATALOG = Path(__file__).with_name("catalog.yaml")
CGROUP_CPU_MAX = Path("/sys/fs/cgroup/cpu.max")  # "<quota> <period>" or "max <period>"


class Settings(BaseSettings):
    """Everything an operator can tune, read from ``TESSERA_*`` environment variables."""

    model_config = SettingsConfigDict(env_prefix="TESSERA_", env_file=".env", extra="ignore")

    catalog: Path = Field(DEFAULT_CATALOG, description="Path of the model catalog (YAML or TOML).")
    models: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="Models to serve instead of the catalog (comma-separated hub ids or local directories; "
        "`python -m app serve --model`), each task read from the model's config (app/registry/inferred.py).",
    )
    task: str | None = Field(None, description="The task of every model in `models`, where its config cannot tell.")
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=1, le=65535)
    hub: Literal["auto", "online", "offline"] = Field(
        "auto",
        description="Whether hub models are reachable. 'auto' probes the hub once at start-up; "
        "HF_HUB_OFFLINE=1 always means offline.",
    )
    hub_probe_timeout_s: float = Field(3.0, gt=0)
    download_timeout_s: float = Field(30.0, gt=0, description="Per-connection timeout for hub downloads.")
    load_retry_after_s: float = Field(
        30.0, ge=0, description="After a failed load, requests answer 503 for this long before a retry."
    )

    workers: int | None = Field(
        None,
        ge=0,
        le=64,
        description="Front processes (HTTP, validation, answers) in front of one engine process that "
        "holds the models (docs/front-engine.md); 0: one process does everything. Default: one per 4 "
        "cores, at least 1 (0 on a single core).",
    )

    # Batching and backpressure (per loaded model).
    max_batch_size: int = Field(32, ge=1, le=4096)
    max_batch_tokens: int = Field(16384, ge=64, description="Padded tokens in one forward pass.")
    batch_padding_ratio: float = Field(
        1.2,
        ge=1.0,
        description="A batch stretches to inputs at most this much longer than its shortest (or 4 tokens "
        "longer); the rest waits for the next batch. Raise it on GPUs, where padding is cheap.",
    )
    lanes_per_model: int | None = Field(
        None,
        ge=1,
        le=64,
        description="Threads per loaded model that each run a batch; on a CPU, busy lanes share torch's "
        "threads (app/batching/threads.py). Default: on a CPU, 2 for encoders and 1 for seq2seq "
        "models (generate() holds the GIL between steps); 1 on a GPU.",
    )
    max_queue_items: int = Field(4096, ge=1, description="Queued inputs per model before 429.")
    request_timeout_s: float = Field(60.0, gt=0, description="Default deadline of a request.")
    max_request_timeout_s: float = Field(600.0, gt=0, description="Cap on a request's own timeout_s.")

    # Per-request limits.
    max_inputs_per_request: int = Field(256, ge=1)
    max_chars_per_input: int = Field(100_000, ge=1)
    max_new_tokens_cap: int = Field(1024, ge=1)
    max_num_beams: int = Field(8, ge=1)

    memory_budget_gib: dict[str, float] = Field(
        default_factory=dict,
        description="Per device ('cpu', 'cuda:0', 'mps'), the GiB of weights kept loaded; least "
        "recently used idle models are unloaded to stay within it. JSON, e.g. '{\"cuda:0\": 40}'.",
    )

    # Security and limits.
    api_keys: Annotated[list[SecretStr], NoDecode] = Field(
        default_factory=list,
        description="Accepted API keys (comma-separated in TESSERA_API_KEYS). Empty: no authentication.",
    )
    admin_keys: Annotated[list[SecretStr], NoDecode] = Field(
        default_factory=list,
        description="Keys that may also load and unload models (comma-separated in TESSERA_ADMIN_KEYS). "
        "With API keys and no admin keys, model management over HTTP is off.",
    )
    rate_limit_inputs_per_s: float | None = Field(
        None,
        gt=0,
        description="Per tenant (API key, or client address without keys), inputs per second on average; "
        "past it: 429 with Retry-After. Unset: no rate limit.",
    )
    rate_limit_burst: int | None = Field(
        None,
        ge=1,
        description="Inputs a tenant may send at once above the rate (default: one second's worth, "
        "and at least max_inputs_per_request).",
    )
    docs_public: bool = Field(True, description="Serve /docs, /redoc and /openapi.json without a key.")
    cors_origins: Annotated[list[str], NoDecode] = Field(
        default_factory=list, description="Origins allowed by CORS (comma-separated); '*' for any."
    )
    max_body_bytes: int = Field(8 * 1024 * 1024, ge=1024, description="Largest request body; past it: 413.")
    max_tokens_per_request: int = Field(
        262_144, ge=1, description="Tokens over all inputs of one request, after truncation; past it: 413."
    )
    opentelemetry: bool = Field(
        False,
        validation_alias=AliasChoices("opentelemetry", "TESSERA_OPENTELEMETRY", "TESSERA_TRACING"),
        description="Distributed tracing (docs/tracing.md): spans for each request from the HTTP route to "
        "the forward pass, exported over OTLP/HTTP as the OTEL_* variables say (`tessera[otel]`); also on "
        "when OTEL_EXPORTER_OTLP_ENDPOINT or OTEL_EXPORTER_OTLP_TRACES_ENDPOINT is set. Alias: "
        "TESSERA_TRACING. Off, it costs nothing per request.",
    )
    drain_timeout_s: float = Field(
        25.0,
        ge=0,
        description="On SIGTERM, how long requests in flight may take to finish while new ones are refused "
        "(503, Retry-After) before the server stops anyway; keep it under the orchestrator's grace "
        "period (Kubernetes: 30 s).",
    )
    log_format: Literal["text", "json"] = "text"
    log_level: str = "INFO"

    torch_threads: int | None = Field(None, ge=1, description="torch intra-op threads (default: torch's).")
    onnx_cache: Path | None = Field(
        None,
        description="Where ONNX exports of backend-onnx models are kept (default: onnx/ in the Hugging Face "
        "cache directory, HF_HOME).",
    )

    @property
    def front_processes(self) -> int:
        """``workers``, or the default for this machine's cores (see the field)."""
        if self.workers is not None:
            return self.workers
        cores = available_cores()
        return 0 if cores < 2 else max(1, cores // 4)

    @field_validator("api_keys", "admin_keys", "cors_origins", "models", mode="before")
    @classmethod
    def _comma_separated(cls, value: Any) -> Any:
        if isinstance(value, str):
            return [part.strip() for part in value.split(",") if part.strip()]
        return value

    @model_validator(mode="after")
    def _consistent(self) -> Settings:
        """Settings that contradict each other stop the server, each pair named."""
        contradictions = contradictions_of(self)
        if contradictions:
            raise ValueError("; ".join(contradictions))
        return self


# The smallest JSON body of one input of n characters, and of n one-character inputs:
# {"inputs":"…"} and {"inputs":["a","a",…]}.
def _one_text_bytes(chars: int) -> int:
    return len('{"inputs":""}') + chars


def _many_texts_bytes(inputs: int) -> int:
    return len('{"inputs":[]}') + 4 * inputs - 1


def contradictions_of(s: Settings) -> list[str]:
    """Pairs of settings under which a request the OpenAPI document allows could never be served,
    in words naming both and what to change. (Inputs x characters past the body limit is not
    one: such a body answers 413, while fewer or shorter inputs fit.)"""
    found = []
    if s.request_timeout_s > s.max_request_timeout_s:
        found.append(
            f"TESSERA_REQUEST_TIMEOUT_S ({s.request_timeout_s:g}) exceeds TESSERA_MAX_REQUEST_TIMEOUT_S "
            f"({s.max_request_timeout_s:g}): the default deadline must be within the cap; lower it or raise the cap"
        )
    inputs = f"TESSERA_MAX_INPUTS_PER_REQUEST ({s.max_inputs_per_request})"
    if s.max_queue_items < s.max_inputs_per_request:
        found.append(
            f"TESSERA_MAX_QUEUE_ITEMS ({s.max_queue_items}) is below {inputs}: a request of the largest allowed "
            "size could never be queued; raise the queue or lower the input limit"
        )
    burst = s.rate_limit_burst if s.rate_limit_inputs_per_s is not None else None  # without a rate, no limit
    if burst is not None and burst < s.max_inputs_per_request:
        found.append(
            f"TESSERA_RATE_LIMIT_BURST ({burst}) is below {inputs}: a request of the largest allowed size "
            "could never pass the rate limit; raise the burst or lower the input limit"
        )
    if s.max_tokens_per_request < s.max_inputs_per_request:
        found.append(
            f"TESSERA_MAX_TOKENS_PER_REQUEST ({s.max_tokens_per_request}) is below {inputs}: every input is a "
            "token at least, so a request of the largest allowed size could never be served; raise the tokens "
            "or lower the input limit"
        )
    if s.max_body_bytes < _one_text_bytes(s.max_chars_per_input):
        found.append(
            f"TESSERA_MAX_BODY_BYTES ({s.max_body_bytes}) cannot hold one input of TESSERA_MAX_CHARS_PER_INPUT "
            f"({s.max_chars_per_input}) characters ({_one_text_bytes(s.max_chars_per_input)} bytes at least); "
            "raise the body limit or lower the characters"
        )
    if s.max_body_bytes < _many_texts_bytes(s.max_inputs_per_request):
        found.append(
            f"TESSERA_MAX_BODY_BYTES ({s.max_body_bytes}) cannot hold {inputs} inputs "
            f"({_many_texts_bytes(s.max_inputs_per_request)} bytes at least); raise the body limit or lower "
            "the input limit"
        )
    return found


def available_cores() -> int:
    """The cores this process may use: its CPU affinity, capped by a cgroup v2 CPU quota (a
    container's CPU limit, which leaves the affinity at the node's every core)."""
    cores = len(os.sched_getaffinity(0))
    try:
        quota, period = CGROUP_CPU_MAX.read_text().split()[:2]
    except (OSError, ValueError):
        return cores
    if quota == "max":
        return cores
    return max(1, min(cores, int(int(quota) // int(period))))
