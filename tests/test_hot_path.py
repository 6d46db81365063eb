"""The batch-wide steps of the engine's hot path answer exactly what the per-item code did:
tokenizing, padding rows into tensors, and classification scores ranked per input."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers import AutoTokenizer, BertConfig

from app.catalog import TextClassificationEntry
from app.payloads import ClassifyInput
from app.runners.classification import ClassificationRunner, default_function
from app.runners.tokens import TextEncoder, pad_rows
from app.runners.wordpiece import PlainWordPiece


def test_pad_rows_right_pads_every_row_and_masks_only_the_padding() -> None:
    rows = [[5, 6, 7], [8], [9, 10, 11, 12, 13], [14, 15]]
    types = [[0, 0, 1], [1], [0, 1, 1, 1, 1], [1, 1]]
    batch = pad_rows(rows, 99, types, torch.device("cpu"))
    assert batch["input_ids"].dtype == batch["attention_mask"].dtype == torch.long
    for i, row in enumerate(rows):
        width = batch["input_ids"].shape[1]
        assert batch["input_ids"][i].tolist() == row + [99] * (width - len(row))
        assert batch["attention_mask"][i].tolist() == [1] * len(row) + [0] * (width - len(row))
        assert batch["token_type_ids"][i].tolist() == types[i] + [0] * (width - len(row))
    assert batch["input_ids"].shape == (4, 5)
    assert "token_type_ids" not in pad_rows(rows, 0, None, torch.device("cpu"))


TEXTS = [
    "A fine film, truly.",
    "  Ünïcödé naïve café  ",
    "东京 🙂 tabs\tand\nlines",
    "",
    "[MASK] <mask> </s> 1,234.56",
    "long " * 80,
]


@pytest.mark.parametrize("model", ["bert-clf", "distilbert-clf", "bart", "t5", "marian"])
def test_text_encoder_gives_the_tokenizers_own_ids_truncating_only_long_texts(
    tiny_models: dict[str, Path], model: str
) -> None:
    tokenizer = AutoTokenizer.from_pretrained(str(tiny_models[model]))
    encoder = TextEncoder(tokenizer, 32)
    for (ids, types, truncated), text in zip(encoder.encode(TEXTS), TEXTS, strict=True):
        whole = tokenizer(text)
        if len(whole["input_ids"]) <= 32:
            want = whole
            assert not truncated
        else:
            want = tokenizer(text, truncation=True, max_length=32)
            assert truncated and len(ids) == 32
        assert ids == want["input_ids"]
        assert types == want.get("token_type_ids")
    pairs = TextEncoder(tokenizer, 128).encode(TEXTS[:2], ["a hypothesis", "another one"])
    for (ids, types, _), text, pair in zip(pairs, TEXTS[:2], ["a hypothesis", "another one"], strict=True):
        assert ids == tokenizer(text, pair)["input_ids"]
        assert types == tokenizer(text, pair).get("token_type_ids")


def test_text_encoder_reads_fast_tokenizers_directly_and_others_through_their_call(
    tiny_models: dict[str, Path],
) -> None:
    assert TextEncoder(AutoTokenizer.from_pretrained(str(tiny_models["bert-clf"])), 32).direct is not None
    # Marian's is a sentencepiece tokenizer without a Rust backend.
    assert TextEncoder(AutoTokenizer.from_pretrained(str(tiny_models["marian"])), 32).direct is None


def test_text_encoder_keeps_call_where_the_backend_alone_tokenizes_differently(tiny_models: dict[str, Path]) -> None:
    tokenizer = AutoTokenizer.from_pretrained(str(tiny_models["bert-clf"]))

    class Prefixing(type(tokenizer)):  # type: ignore[misc]
        """A tokenizer whose __call__ does more than its backend: what the probes catch."""

        def __call__(self, text, *args, **kwargs):  # type: ignore[no-untyped-def]
            texts = ["film " + t for t in text] if isinstance(text, list) else "film " + text
            return super().__call__(texts, *args, **kwargs)

    prefixing = Prefixing.from_pretrained(str(tiny_models["bert-clf"]))
    encoder = TextEncoder(prefixing, 32)
    assert encoder.direct is None and encoder.plain is None
    assert [ids for ids, _, _ in encoder.encode(["a fine film"])] == [prefixing("a fine film")["input_ids"]]


# Plain ASCII as clients send it: words (in the test vocabulary or not, any case), digits,
# every punctuation character, runs of spaces, tabs and line ends; and raw characters.
_WORDS = st.sampled_from(["film", "Fine", "RIVER", "flooded", "unbelievable", "zzyzx", "x" * 101, "42", "3.14"])
_PLAIN_CHARS = st.sampled_from([*"abcXYZ019 \t\n\r", *"!\"#$%&'()*+,-./:;<=>?@[\\]^_`{|}~"])
PLAIN_TEXTS = st.lists(st.one_of(_WORDS, _PLAIN_CHARS), max_size=40).map("".join)


@pytest.fixture(scope="module")
def encoders(tiny_models: dict[str, Path]) -> dict[str, TextEncoder]:
    return {
        m: TextEncoder(AutoTokenizer.from_pretrained(str(tiny_models[m])), 512) for m in ("bert-clf", "distilbert-clf")
    }


@settings(max_examples=300, deadline=None)
@given(texts=st.lists(PLAIN_TEXTS, min_size=1, max_size=4), pairs=st.lists(PLAIN_TEXTS, min_size=4, max_size=4))
def test_plain_ascii_texts_get_the_tokenizers_own_ids_from_the_python_path(
    encoders: dict[str, TextEncoder], texts: list[str], pairs: list[str]
) -> None:
    for encoder in encoders.values():
        tokenizer, plain = encoder.tokenizer, encoder.plain
        assert plain is not None
        for text in texts:
            got = plain.encode(text)
            if "[" not in text:  # "[" may start an added token ([MASK]): those go to Rust
                assert got is not None
        want = tokenizer(texts)
        assert [ids for ids, _, _ in encoder.encode(texts)] == want["input_ids"]
        pair = tokenizer(texts, pairs[: len(texts)])
        got_pairs = encoder.encode(texts, pairs[: len(texts)])
        assert [ids for ids, _, _ in got_pairs] == pair["input_ids"]
        assert [types for _, types, _ in got_pairs] == pair.get("token_type_ids", [None] * len(texts))


def test_texts_that_are_not_plain_ascii_go_to_the_rust_tokenizer(encoders: dict[str, TextEncoder]) -> None:
    encoder = encoders["bert-clf"]
    assert encoder.plain is not None
    others = [
        "a [MASK] film",
        "[cls] lower case",
        "café",
        "东京",
        "🙂 fine",
        "nul\x00byte",
        "tab\x0bvertical",
        "del\x7f",
    ]
    for text in others:
        assert encoder.plain.encode(text) is None
        assert encoder.plain.encode("a fine film", text) is None
    mixed = ["a fine film", *others]
    assert [ids for ids, _, _ in encoder.encode(mixed)] == encoder.tokenizer(mixed)["input_ids"]


def test_the_python_path_is_kept_only_where_it_gives_the_tokenizers_ids(
    tiny_models: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    tokenizer = AutoTokenizer.from_pretrained(str(tiny_models["bert-clf"]))
    monkeypatch.setattr(PlainWordPiece, "_split", lambda self, word: self.unk)  # words it lacks: [UNK]
    encoder = TextEncoder(tokenizer, 32)
    assert encoder.plain is None and encoder.direct is not None  # the probes' unknown words caught it
    assert [ids for ids, _, _ in encoder.encode(["zzyzx film"])] == [tokenizer("zzyzx film")["input_ids"]]


@pytest.mark.parametrize("model", ["bart", "t5", "marian"])
def test_the_python_path_serves_only_bert_wordpiece_tokenizers(tiny_models: dict[str, Path], model: str) -> None:
    tokenizer = AutoTokenizer.from_pretrained(str(tiny_models[model]))
    assert TextEncoder(tokenizer, 32).plain is None
    backend = getattr(tokenizer, "backend_tokenizer", None)
    assert backend is None or PlainWordPiece.of(backend) is None


@pytest.fixture(scope="module")
def runner(tiny_models: dict[str, Path]) -> ClassificationRunner:
    entry = TextClassificationEntry(name="hot-path-clf", task="text-classification", source={"path": "unused"})
    return ClassificationRunner(entry, tiny_models["bert-clf"], torch.device("cpu"), torch.float32)


def test_one_batch_of_mixed_functions_and_top_k_answers_as_the_pipeline_per_input(
    runner: ClassificationRunner,
) -> None:
    payloads = [
        ClassifyInput("a fine film", 1, None),
        ClassifyInput("the worst evening in years", None, "sigmoid"),
        ClassifyInput("rain again", 2, "none"),
        ClassifyInput("ok", None, "softmax"),
        ClassifyInput("a very long and winding story about nothing in particular", 1, "sigmoid"),
    ]
    got = runner.infer(payloads, runner.encode(payloads))
    for payload, result in zip(payloads, got, strict=True):
        [alone] = runner.encode([payload])
        with torch.inference_mode():
            batch = pad_rows(alone.rows_ids, 0, alone.rows_type_ids, torch.device("cpu"))
            logits = runner.model(**batch).logits
        want = runner.pipe.postprocess(
            {"logits": logits},
            function_to_apply=payload.function_to_apply,
            top_k=payload.top_k,
            _legacy=False,
        )
        assert [x["label"] for x in result.labels] == [y["label"] for y in want]
        assert [x["score"] for x in result.labels] == pytest.approx([y["score"] for y in want], abs=1e-5)


def test_equal_scores_keep_the_label_order(runner: ClassificationRunner, monkeypatch: pytest.MonkeyPatch) -> None:
    import app.runners.classification as classification

    monkeypatch.setattr(classification, "_forward", lambda runner, encoded: torch.zeros((len(encoded), 2)))
    payloads = [ClassifyInput("x", None, None)]
    [result] = runner.infer(payloads, runner.encode(payloads))
    assert [x["label"] for x in result.labels] == [runner.labels[0], runner.labels[1]]
    assert [x["score"] for x in result.labels] == [0.5, 0.5]


@pytest.mark.parametrize(
    ("problem_type", "labels", "function"),
    [
        ("regression", 1, "none"),
        ("multi_label_classification", 3, "sigmoid"),
        (None, 1, "sigmoid"),
        ("single_label_classification", 2, "softmax"),
        (None, 3, "softmax"),
    ],
)
def test_the_default_function_is_the_pipelines(problem_type: str | None, labels: int, function: str) -> None:
    config = BertConfig(num_labels=labels, problem_type=problem_type)
    assert default_function(config) == function


def test_softmax_rows_sum_to_one_even_for_huge_logits() -> None:
    from app.runners.classification import SCORE

    scores = SCORE["softmax"](np.array([[1000.0, 1000.0], [-1e4, 0.0]], dtype=np.float32))
    assert np.allclose(scores.sum(axis=-1), 1.0) and np.isfinite(scores).all()


def test_a_batch_mixing_normalized_and_raw_vectors_answers_each_as_alone(tiny_models: dict[str, Path]) -> None:
    from app.catalog import EmbeddingEntry
    from app.payloads import EmbedInput
    from app.runners.embedding import EmbeddingRunner

    entry = EmbeddingEntry(name="hot-path-embed", task="embedding", source={"path": "unused"})
    runner = EmbeddingRunner(entry, tiny_models["bert-embed"], torch.device("cpu"), torch.float32)
    payloads = [EmbedInput("a red house", True), EmbedInput("a red house", False), EmbedInput("green tea", False)]
    together = runner.infer(payloads, runner.encode(payloads))
    for payload, got in zip(payloads, together, strict=True):
        [alone] = runner.infer([payload], runner.encode([payload]))
        assert got.vector == pytest.approx(alone.vector, abs=1e-5)
    assert np.linalg.norm(together[0].vector) == pytest.approx(1.0, abs=1e-5)
    assert np.linalg.norm(together[1].vector) != pytest.approx(1.0, abs=1e-3)  # raw: not unit length
