"""The service layer: every rule of every task, once, whatever route a request came through.

The native routes, the Hugging Face Inference API and the OpenAI-compatible route parse
their bodies into the requests of app/service/requests.py, call one method here, and shape
its Answer; none has a rule of its own. Here: the limits (app/service/checks.py), the
tenant's rate, model choice (named, default, or by language pair), zero-shot hypotheses,
``top_k``, refusing truncation when a client asks, ``dimensions``, chunked summarization
and translation (app/service/chunking.py), and what a streamed request hears as it goes
(``Progress``). Below: the engine's client (app/engine/client.py), whichever layout.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Iterable, Sequence
from typing import Any, TypeVar

from app.catalog import SummarizationEntry, TokenClassificationEntry, TranslationEntry, ZeroShotEntry
from app.config import Settings
from app.errors import InputTooLarge, InvalidInput, WrongTask
from app.payloads import (
    Classification,
    ClassifyInput,
    Embedding,
    EmbedInput,
    Entities,
    ExtractInput,
    FillMaskInput,
    Generation,
    GenerationSettings,
    MaskFills,
    RerankInput,
    Seq2SeqInput,
    TokenClassifyInput,
    ZeroShotInput,
)
from app.registry.slots import Models, OnDelta, OnResult
from app.service.checks import check_generation, check_inputs, timeout_of
from app.service.choice import ModelChoice, translates
from app.service.chunking import Pieces
from app.service.requests import (
    Answer,
    Classify,
    Embed,
    FillMask,
    Progress,
    Ranked,
    Rerank,
    Summarize,
    Summary,
    TokenClassify,
    Translate,
    Translation,
    listeners,
)
from app.tasks import Endpoint

T = TypeVar("T")
G = TypeVar("G", Translation, Summary)  # what a generated text becomes in an answer

# Rounds of summarizing summaries before the last one may truncate: each round shrinks the
# text several-fold, so documents past a few hundred model windows are the only ones cut.
MAX_REDUCE_ROUNDS = 3


class InferenceService:
    def __init__(self, settings: Settings, registry: Models) -> None:
        self.settings = settings
        self.registry = registry
        self.choice = ModelChoice(registry)

    async def admit(self, texts: list[str], tenant: str) -> None:
        """A request's inputs within the server's limits, and within its tenant's rate (the
        engine's, app/engine/rate.py)."""
        check_inputs(self.settings, texts)
        if self.settings.rate_limit_inputs_per_s is not None:
            await self.registry.take(tenant, len(texts))

    # -- the tasks ----------------------------------------------------------------------

    async def classify(self, asked: Classify, tenant: str) -> Answer[Classification]:
        """Labels per input, best first: a classifier's, or a zero-shot model's over the
        client's candidate labels (or its own labels); ``top_k`` of them (None: all)."""
        await self.admit(asked.texts, tenant)
        labels = asked.candidate_labels
        entry = self.choice.resolve(asked.model, Endpoint.zero_shot if labels else Endpoint.classify)
        payloads: list[Any]
        if isinstance(entry, ZeroShotEntry):
            if asked.function_to_apply is not None:
                raise WrongTask(f"function_to_apply does not apply to the zero-shot model '{entry.name}'; drop it")
            payloads = zero_shot_payloads(entry, asked.texts, labels, asked.hypothesis_template, asked.multi_label)
        else:
            payloads = [ClassifyInput(t, asked.top_k, asked.function_to_apply) for t in asked.texts]
        sizes: list[int] = []  # the batches its inputs ran in, for the access log
        results = await self._run(entry.name, payloads, tenant, asked.timeout_s, sizes)
        top_k = asked.top_k
        ranked = [Classification(r.labels[:top_k] if top_k else r.labels, r.truncated) for r in results]
        return Answer(entry.name, ranked, max(sizes, default=0))

    async def translate(self, asked: Translate, tenant: str, progress: Progress | None = None) -> Answer[Translation]:
        """Each input translated by the named model, or the one for the language pair (either
        side may be left open), or the endpoint's default; with ``long_input: chunk``, an
        input longer than the model's maximum in pieces cut at its lines, then rejoined.
        ``progress`` hears each input's text as it is generated."""
        await self.admit(asked.texts, tenant)
        check_generation(self.settings, asked.generation)
        languages = asked.source_lang, asked.target_lang
        entry: TranslationEntry
        if asked.model is None and languages != (None, None):
            entry = self.choice.find_translation(*languages)
        else:
            named = self.choice.resolve(asked.model, Endpoint.translate)
            assert isinstance(named, TranslationEntry)  # what /translate's models are
            entry = named
            if not translates(entry, *languages):
                wanted = f"{asked.source_lang or '*'}->{asked.target_lang or '*'}"
                raise WrongTask(
                    f"model '{entry.name}' translates {entry.source_lang}->{entry.target_lang}, "
                    f"not {wanted}; drop model or the languages"
                )
        sizes: list[int] = []  # the batches its inputs ran in, for the access log
        translations: list[Translation]
        if asked.long_input == "chunk":
            translations = await self._translate_chunked(entry.name, asked, tenant, sizes, progress)
        else:
            translations = await self._generate(
                entry.name, asked, tenant, sizes, progress, lambda r: Translation(r.text, r.truncated)
            )
        if asked.must_fit:
            refuse_truncated(entry.name, translations)
        return Answer(entry.name, translations, max(sizes, default=0))

    async def summarize(self, asked: Summarize, tenant: str, progress: Progress | None = None) -> Answer[Summary]:
        """Abstractive (seq2seq; a long document truncated, or summarized in chunks then
        summarized again) or extractive (the sentences that best cover the document).
        ``progress`` hears each abstractive summary's text as it is generated (of a chunked
        one, its last round's)."""
        await self.admit(asked.texts, tenant)
        check_generation(self.settings, asked.generation)
        entry = self.choice.resolve(asked.model, Endpoint.summarize)
        assert isinstance(entry, SummarizationEntry)  # what /summarize's models are
        sizes: list[int] = []  # the batches its inputs ran in, for the access log
        summaries: list[Summary]
        if entry.engine == "extractive":
            sentences = asked.max_sentences or entry.max_sentences
            extracts = [ExtractInput(t, sentences) for t in asked.texts]
            results = await self._run(entry.name, extracts, tenant, asked.timeout_s, sizes)
            summaries = [Summary(r.text, r.truncated) for r in results]
        elif asked.long_input == "chunk":
            # One deadline for every stage of every document.
            deadline = time.monotonic() + timeout_of(self.settings, asked.timeout_s)
            summaries = await all_or_nothing(
                self._summarize_chunked(entry.name, i, text, asked, deadline, tenant, sizes, progress)
                for i, text in enumerate(asked.texts)
            )
        else:
            summaries = await self._generate(
                entry.name, asked, tenant, sizes, progress, lambda r: Summary(r.text, r.truncated)
            )
        if asked.must_fit:
            refuse_truncated(entry.name, summaries)
        return Answer(entry.name, summaries, max(sizes, default=0))

    async def _generate(
        self,
        name: str,
        asked: Translate | Summarize,
        tenant: str,
        sizes: list[int],
        progress: Progress | None,
        shape: Callable[[Generation], G],
    ) -> list[G]:
        """Each text generated whole by model ``name``, as ``shape`` makes its answer;
        ``progress`` hears each one's text as it goes."""
        payloads = [Seq2SeqInput(t, asked.generation) for t in asked.texts]
        listening = listeners(progress, asked.must_fit, shape)
        results = await self._run(name, payloads, tenant, asked.timeout_s, sizes, group=asked.generation, **listening)
        return [shape(r) for r in results]

    async def embed(self, asked: Embed, tenant: str) -> Answer[Embedding]:
        """One vector per input, pooled as the model declares, unit length unless
        ``normalize`` is false; ``dimensions``, if given, must be the model's size."""
        await self.admit(asked.texts, tenant)
        entry = self.choice.resolve(asked.model, Endpoint.embed)
        sizes: list[int] = []  # the batches its inputs ran in, for the access log
        payloads = [EmbedInput(t, asked.normalize) for t in asked.texts]
        results = await self._run(entry.name, payloads, tenant, asked.timeout_s, sizes)
        if asked.must_fit:
            refuse_truncated(entry.name, results)
        size = len(results[0].vector)
        if asked.dimensions is not None and asked.dimensions != size:
            raise WrongTask(
                f"model '{entry.name}' gives {size}-dimensional vectors, not {asked.dimensions}; drop dimensions"
            )
        return Answer(entry.name, results, max(sizes, default=0))

    async def fill_mask(self, asked: FillMask, tenant: str) -> Answer[MaskFills]:
        """Per input, per mask token in it, the ``top_k`` likeliest tokens (among ``targets``
        when given), best first."""
        await self.admit(asked.texts, tenant)
        entry = self.choice.resolve(asked.model, Endpoint.fill_mask)
        targets = tuple(asked.targets) if asked.targets else None
        payloads = [FillMaskInput(t, asked.top_k, targets) for t in asked.texts]
        sizes: list[int] = []
        results = await self._run(entry.name, payloads, tenant, asked.timeout_s, sizes)
        if asked.must_fit:
            refuse_truncated(entry.name, results)
        return Answer(entry.name, results, max(sizes, default=0))

    async def rerank(self, asked: Rerank, tenant: str) -> Answer[Ranked]:
        """The documents ordered by relevance to the query, best first (equal scores keep the
        request's order), the first ``top_n`` of them. Each (query, document) pair is an input:
        the documents count against the inputs per request, the query against the characters."""
        check_inputs(self.settings, [asked.query])
        await self.admit(asked.documents, tenant)
        entry = self.choice.resolve(asked.model, Endpoint.rerank)
        payloads = [RerankInput(asked.query, document, asked.raw_scores) for document in asked.documents]
        sizes: list[int] = []
        results = await self._run(entry.name, payloads, tenant, asked.timeout_s, sizes)
        if asked.must_fit:
            refuse_truncated(entry.name, results)
        order = sorted(range(len(results)), key=lambda i: -results[i].score)
        ranked = [Ranked(i, results[i].score, results[i].truncated) for i in order[: asked.top_n]]
        return Answer(entry.name, ranked, max(sizes, default=0))

    async def token_classify(self, asked: TokenClassify, tenant: str) -> Answer[Entities]:
        """Per input, its entities (or tokens, with aggregation ``none``) whose label is not
        ignored, with character offsets into it; a long input is truncated, or with ``stride``
        read in windows that share that many tokens."""
        await self.admit(asked.texts, tenant)
        entry = self.choice.resolve(asked.model, Endpoint.token_classification)
        assert isinstance(entry, TokenClassificationEntry)  # what /token-classification's models are
        strategy = asked.aggregation_strategy or entry.aggregation_strategy
        if asked.stride is not None and strategy == "none":
            raise InvalidInput("stride joins windows into entities: it needs an aggregation_strategy other than none")
        ignored = tuple(entry.ignore_labels if asked.ignore_labels is None else asked.ignore_labels)
        payloads = [TokenClassifyInput(t, strategy, ignored, asked.stride) for t in asked.texts]
        sizes: list[int] = []
        results = await self._run(entry.name, payloads, tenant, asked.timeout_s, sizes)
        if asked.must_fit:
            refuse_truncated(entry.name, results)
        return Answer(entry.name, results, max(sizes, default=0))

    # -- below the tasks ------------------------------------------------------------------

    async def _run(
        self,
        name: str,
        payloads: Sequence[Any],
        tenant: str,
        timeout_s: float | None,
        sizes: list[int],
        group: GenerationSettings | None = None,
        on_delta: OnDelta | None = None,
        on_result: OnResult | None = None,
    ) -> list[Any]:
        timeout = timeout_of(self.settings, timeout_s)
        return await self.registry.infer(
            name,
            payloads,
            timeout_s=timeout,
            group=group,
            tenant=tenant,
            sizes=sizes,
            on_delta=on_delta,
            on_result=on_result,
        )

    async def _split(self, name: str, index: int, text: str, keep_lines: bool = False) -> Any:
        """``text`` in pieces model ``name`` reads whole (app/runners/seq2seq.py)."""
        try:
            if keep_lines:
                return await self.registry.split_keeping_lines(name, text)
            return await self.registry.split_into_chunks(name, text)
        except InvalidInput as exc:
            raise InvalidInput(f"input {index} {exc.message}; send plain UTF-8 text") from exc

    async def _translate_chunked(
        self, name: str, asked: Translate, tenant: str, sizes: list[int], progress: Progress | None
    ) -> list[Translation]:
        """Every input cut at its lines (then sentences) into pieces the model reads whole; all
        pieces of all inputs translated as one request, under one deadline; each input's
        outputs joined with its own separators. Streamed, each input's deltas in order."""
        deadline = time.monotonic() + timeout_of(self.settings, asked.timeout_s)
        splits = await all_or_nothing(self._split(name, i, t, keep_lines=True) for i, t in enumerate(asked.texts))
        pieces = Pieces(splits)
        payloads = [Seq2SeqInput(t, asked.generation) for t in pieces.texts]
        heard: dict[str, Any] = {}
        if progress is not None:
            order = pieces.in_order(progress)
            heard = {"on_delta": order.delta, "on_result": None if asked.must_fit else order.result}
        left = max(0.001, deadline - time.monotonic())
        results = await self._run(name, payloads, tenant, left, sizes, group=asked.generation, **heard)
        return pieces.joined(results)

    async def _summarize_chunked(
        self,
        name: str,
        index: int,
        text: str,
        asked: Summarize,
        deadline: float,
        tenant: str,
        sizes: list[int],
        progress: Progress | None,
    ) -> Summary:
        """Map-reduce: summarize model-sized chunks together (one batch), then their joined
        summaries, again while they are still too long for the model."""
        generation = asked.generation

        async def summarize_all(texts: list[str], **heard: Any) -> list[Generation]:
            left = max(0.001, deadline - time.monotonic())
            payloads = [Seq2SeqInput(t, generation) for t in texts]
            return await self._run(name, payloads, tenant, left, sizes, group=generation, **heard)

        chunks: list[str] = await self._split(name, index, text)
        pieces, joined = len(chunks), text
        for _ in range(MAX_REDUCE_ROUNDS):
            if len(chunks) <= 1:
                break
            joined = " ".join(r.text for r in await summarize_all(chunks))
            chunks = await self._split(name, index, joined)
        heard = listeners(progress, asked.must_fit, lambda r: Summary(r.text, r.truncated, chunks=pieces), index)
        [final] = await summarize_all([joined], **heard)
        return Summary(final.text, final.truncated, chunks=pieces)


def zero_shot_payloads(
    entry: ZeroShotEntry, texts: list[str], labels: list[str] | None, template: str | None, multi_label: bool = False
) -> list[ZeroShotInput]:
    """A client's labels become hypotheses through the template; without them, the entry's own
    labels do too (NLI), or are embedded through their descriptions (similarity engine)."""
    template = template or entry.template
    own = entry.labels or {}
    names = tuple(labels or own)
    if labels or entry.engine == "nli":
        # replace, not format: other braces in a client's template are text, not fields.
        hypotheses = tuple(template.replace("{}", name, 1) for name in names)
    else:
        hypotheses = tuple(own[name] for name in names)
    return [ZeroShotInput(text, names, hypotheses, multi_label) for text in texts]


def refuse_truncated(model: str, results: Sequence[Any]) -> None:
    """With truncation refused (HF's do_not_truncate, truncate: false): 413 for an input that
    was cut."""
    for i, result in enumerate(results):
        if result.truncated:
            raise InputTooLarge(
                f"input {i} is longer than model '{model}' accepts, and truncation was refused; "
                "shorten it, or allow truncation"
            )


async def all_or_nothing(works: Iterable[Awaitable[T]]) -> list[T]:
    """Like gather, but the first failure cancels the rest instead of leaving them running."""
    tasks = [asyncio.ensure_future(w) for w in works]
    try:
        return list(await asyncio.gather(*tasks))
    finally:
        for task in tasks:
            task.cancel()
