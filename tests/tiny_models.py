"""Tiny random-weight models of real architectures, built offline for the tests.

No machine running the tests can reach the Hugging Face hub, so each builder writes
a complete model directory (config.json, model.safetensors, tokenizer files) whose
tokenizer is trained locally on a small built-in English corpus. The server then
loads these directories through exactly the same AutoTokenizer / AutoModel code
path it uses for real checkpoints; only the sizes and the weights are fake.
"""

from __future__ import annotations

import io
import itertools
import json
import string
from collections.abc import Sequence
from pathlib import Path

import sentencepiece as spm
import torch
from tokenizers import ByteLevelBPETokenizer, normalizers, pre_tokenizers
from transformers import (
    BartConfig,
    BartForConditionalGeneration,
    BartTokenizer,
    BertConfig,
    BertForMaskedLM,
    BertForSequenceClassification,
    BertForTokenClassification,
    BertModel,
    BertTokenizer,
    DistilBertConfig,
    DistilBertForSequenceClassification,
    DistilBertTokenizer,
    MarianConfig,
    MarianMTModel,
    MarianTokenizer,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    T5Config,
    T5ForConditionalGeneration,
    T5Tokenizer,
)

SEED = 0
NLI_LABELS = ("contradiction", "neutral", "entailment")

_NOUNS = ("movie", "film", "service", "hotel", "book", "phone", "weather", "team", "garden", "kitchen")
_VERBS = ("was", "is", "seemed", "felt", "looked", "became")
_ADJECTIVES = ("great", "terrible", "wonderful", "boring", "fine", "awful", "excellent", "slow", "quiet")
_MORE_ADJECTIVES = ("bright", "expensive", "friendly", "delicious", "strange")
_DETERMINERS = ("the", "this", "our", "my", "your", "that", "their", "every")
_ENDINGS = (".", " today.", " again!", " to me.", " yesterday?", ", honestly.", " in winter.", " last night.")
# Pangrams and a line of every printable character keep the alphabet complete, so
# arbitrary test input maps to real pieces instead of collapsing into <unk>.
_EXTRA = (
    "hello world",
    "The quick brown fox jumps over the lazy dog.",
    "Pack my box with five dozen liquor jugs!",
    "Translate this sentence into another language, please.",
    "Summarize the following long article in a few words.",
    "Scientists reported on Monday that the river had flooded three northern villages.",
    "She asked whether the train to Paris would leave before noon or after lunch.",
    "Please answer the question: where is the nearest hospital, library, or museum?",
    "Good morning, thank you very much for your help with my question.",
    "Market prices rose sharply while government officials discussed a new budget.",
    " ".join(string.ascii_letters + string.digits + string.punctuation),
)


def corpus() -> list[str]:
    """Return the deterministic ~850-sentence corpus every tokenizer is built from."""
    combos = itertools.product(_NOUNS, _VERBS, _ADJECTIVES + _MORE_ADJECTIVES)
    sentences = [
        f"{_DETERMINERS[i % len(_DETERMINERS)]} {noun} {verb} {adj}{_ENDINGS[i % len(_ENDINGS)]}".capitalize()
        for i, (noun, verb, adj) in enumerate(combos)
    ]
    return sentences + list(_EXTRA)


def _wordpiece_vocab() -> dict[str, int]:
    # Built from the corpus rather than trained: WordPieceTrainer breaks frequency
    # ties differently from run to run, and tests want byte-identical directories.
    # Every character is also a "##" continuation, so any word splits into pieces.
    normalizer = normalizers.BertNormalizer(lowercase=True)  # what BertTokenizer applies
    splitter = pre_tokenizers.BertPreTokenizer()
    words = {w for line in corpus() for w, _ in splitter.pre_tokenize_str(normalizer.normalize_str(line))}
    chars = {c for word in words for c in word}
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    tokens = [*specials, *sorted(chars), *sorted(f"##{c}" for c in chars), *sorted(words - chars)]
    return {token: i for i, token in enumerate(tokens)}


def _sentencepiece_model(*, pad_id: int, eos_id: int, unk_id: int) -> bytes:
    """Train a unigram sentencepiece model in memory; an id of -1 leaves that token out."""
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(corpus()),
        model_writer=buf,
        model_type="unigram",
        vocab_size=300,
        hard_vocab_limit=False,  # the corpus yields ~210 pieces; take what it has
        num_threads=1,  # one thread keeps the result reproducible
        minloglevel=2,
        pad_id=pad_id,
        eos_id=eos_id,
        unk_id=unk_id,
        bos_id=-1,  # neither Marian nor T5 prepends a BOS token
    )
    return buf.getvalue()


def _save(model_cls: type[PreTrainedModel], config: PretrainedConfig, tok: PreTrainedTokenizerBase, path: Path) -> Path:
    torch.manual_seed(SEED)
    model = model_cls(config)
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path, safe_serialization=True)
    tok.save_pretrained(path)
    return path


def _with_labels(config: PretrainedConfig, labels: Sequence[str]) -> PretrainedConfig:
    # The head size follows id2label, so setting it here also sets num_labels.
    config.id2label = dict(enumerate(labels))
    config.label2id = {label: i for i, label in enumerate(labels)}
    config.problem_type = "single_label_classification"
    return config


def _bert_config(vocab: dict[str, int]) -> BertConfig:
    return BertConfig(
        vocab_size=len(vocab),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=512,
        pad_token_id=vocab["[PAD]"],
    )


def build_bert_classifier(path: Path, labels: Sequence[str] = ("NEGATIVE", "POSITIVE")) -> Path:
    """BertForSequenceClassification; its tokenizer returns token_type_ids."""
    vocab = _wordpiece_vocab()
    tok = BertTokenizer(vocab=vocab, model_max_length=512)
    return _save(BertForSequenceClassification, _with_labels(_bert_config(vocab), labels), tok, path)


NER_LABELS = ("O", "B-PER", "I-PER", "B-ORG", "I-ORG", "B-LOC", "I-LOC", "B-MISC", "I-MISC")


def build_bert_token_classifier(path: Path) -> Path:
    """BertForTokenClassification with CoNLL-style BIO labels: random weights label tokens at
    random, which is what tests of the grouping want."""
    vocab = _wordpiece_vocab()
    tok = BertTokenizer(vocab=vocab, model_max_length=512)
    return _save(BertForTokenClassification, _with_labels(_bert_config(vocab), NER_LABELS), tok, path)


def build_bert_cross_encoder(path: Path) -> Path:
    """A one-label BertForSequenceClassification: a cross-encoder reranker's shape."""
    vocab = _wordpiece_vocab()
    config = _bert_config(vocab)
    config.num_labels = 1
    return _save(BertForSequenceClassification, config, BertTokenizer(vocab=vocab, model_max_length=512), path)


def build_bert_masked_lm(path: Path) -> Path:
    """BertForMaskedLM: fill-mask, with a [MASK] token in its vocabulary."""
    vocab = _wordpiece_vocab()
    return _save(BertForMaskedLM, _bert_config(vocab), BertTokenizer(vocab=vocab, model_max_length=512), path)


def build_distilbert_classifier(path: Path, labels: Sequence[str] = ("NEGATIVE", "POSITIVE")) -> Path:
    """DistilBertForSequenceClassification; its tokenizer returns no token_type_ids."""
    vocab = _wordpiece_vocab()
    tok = DistilBertTokenizer(vocab=vocab, model_max_length=512)
    config = DistilBertConfig(
        vocab_size=len(vocab),
        dim=32,
        n_layers=2,
        n_heads=2,
        hidden_dim=64,
        max_position_embeddings=512,
        pad_token_id=vocab["[PAD]"],
    )
    return _save(DistilBertForSequenceClassification, _with_labels(config, labels), tok, path)


def build_nli_classifier(path: Path) -> Path:
    """BERT classifier labelled like MNLI models, so zero-shot-classification finds "entailment"."""
    return build_bert_classifier(path, labels=NLI_LABELS)


def build_marian(path: Path) -> Path:
    """MarianMTModel with one locally trained sentencepiece model shared by source and target.

    Ids follow the opus-mt checkpoints: </s>=0, <unk>=1, and <pad> is the last id,
    doubling as decoder_start_token_id.
    """
    proto = _sentencepiece_model(pad_id=-1, eos_id=0, unk_id=1)
    sp = spm.SentencePieceProcessor(model_proto=proto)
    vocab = {sp.id_to_piece(i): i for i in range(sp.get_piece_size())}
    pad_id = vocab["<pad>"] = len(vocab)
    path.mkdir(parents=True, exist_ok=True)
    for name in ("source.spm", "target.spm"):
        (path / name).write_bytes(proto)
    (path / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    tok = MarianTokenizer(str(path / "source.spm"), str(path / "target.spm"), str(path / "vocab.json"))
    config = MarianConfig(
        vocab_size=len(vocab),
        decoder_vocab_size=len(vocab),
        d_model=32,
        encoder_layers=2,
        decoder_layers=2,
        encoder_attention_heads=2,
        decoder_attention_heads=2,
        encoder_ffn_dim=64,
        decoder_ffn_dim=64,
        max_position_embeddings=512,
        pad_token_id=pad_id,
        eos_token_id=0,
        forced_eos_token_id=0,
        decoder_start_token_id=pad_id,
    )
    return _save(MarianMTModel, config, tok, path)


def build_bart(path: Path, max_positions: int = 128) -> Path:
    """BartForConditionalGeneration with a locally trained byte-level BPE.

    `max_positions` sets both the learned position table and the tokenizer's
    model_max_length; the default is deliberately small so tests can send input
    longer than the model accepts without building huge strings.
    """
    bpe = ByteLevelBPETokenizer()
    specials = ["<s>", "<pad>", "</s>", "<unk>", "<mask>"]  # ids 0-3 match facebook/bart-*
    bpe.train_from_iterator(corpus(), vocab_size=400, min_frequency=1, special_tokens=specials)
    vocab = bpe.get_vocab()
    # BPE wants merges as tuples, although RobertaTokenizer's hint says list[str].
    merges = [tuple(pair) for pair in json.loads(bpe.to_str())["model"]["merges"]]
    tok = BartTokenizer(vocab=vocab, merges=merges, model_max_length=max_positions)  # type: ignore[arg-type]
    config = BartConfig(
        vocab_size=len(vocab),
        d_model=32,
        encoder_layers=2,
        decoder_layers=2,
        encoder_attention_heads=2,
        decoder_attention_heads=2,
        encoder_ffn_dim=64,
        decoder_ffn_dim=64,
        max_position_embeddings=max_positions,
        bos_token_id=vocab["<s>"],
        pad_token_id=vocab["<pad>"],
        eos_token_id=vocab["</s>"],
        decoder_start_token_id=vocab["</s>"],
        forced_eos_token_id=vocab["</s>"],
    )
    return _save(BartForConditionalGeneration, config, tok, path)


def build_t5(path: Path, max_length: int = 128) -> Path:
    """T5ForConditionalGeneration with a locally trained unigram vocabulary.

    T5 uses relative positions, so `max_length` only sets the tokenizer's
    model_max_length; it is the limit a server should enforce.
    """
    sp = spm.SentencePieceProcessor(model_proto=_sentencepiece_model(pad_id=0, eos_id=1, unk_id=2))
    pieces = [(sp.id_to_piece(i), sp.get_score(i)) for i in range(sp.get_piece_size())]
    # No <extra_id_*> sentinels: they only matter for span-corruption pre-training.
    tok = T5Tokenizer(vocab=pieces, extra_ids=0, model_max_length=max_length)
    config = T5Config(
        vocab_size=len(tok),
        d_model=32,
        d_kv=8,
        d_ff=64,
        num_layers=2,
        num_decoder_layers=2,
        num_heads=2,
        pad_token_id=0,
        eos_token_id=1,
    )
    config.decoder_start_token_id = 0  # not a declared T5Config field, but generate reads it
    return _save(T5ForConditionalGeneration, config, tok, path)


def build_bert_embedder(path: Path, pooling: str = "mean", normalize: bool = True) -> Path:
    """BertModel laid out like a sentence-transformers checkpoint (all-MiniLM-L6-v2).

    `pooling` is one of "mean", "cls", "max"; it is written to 1_Pooling/config.json
    and `normalize` decides whether modules.json lists a Normalize step.
    """
    if pooling not in ("mean", "cls", "max"):
        raise ValueError(f"pooling must be 'mean', 'cls' or 'max', got {pooling!r}")
    vocab = _wordpiece_vocab()
    _save(BertModel, _bert_config(vocab), BertTokenizer(vocab=vocab, model_max_length=512), path)
    pooling_config = {
        "word_embedding_dimension": 32,
        "pooling_mode_cls_token": pooling == "cls",
        "pooling_mode_mean_tokens": pooling == "mean",
        "pooling_mode_max_tokens": pooling == "max",
        "pooling_mode_mean_sqrt_len_tokens": False,
        "pooling_mode_weightedmean_tokens": False,
        "pooling_mode_lasttoken": False,
        "include_prompt": True,
    }
    (path / "1_Pooling").mkdir(exist_ok=True)
    (path / "1_Pooling" / "config.json").write_text(json.dumps(pooling_config, indent=2), encoding="utf-8")
    modules = [
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
    ]
    if normalize:
        (path / "2_Normalize").mkdir(exist_ok=True)
        modules.append({"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"})
    (path / "modules.json").write_text(json.dumps(modules, indent=2), encoding="utf-8")
    st_config = {"max_seq_length": 256, "do_lower_case": False}  # as all-MiniLM-L6-v2 ships
    (path / "sentence_bert_config.json").write_text(json.dumps(st_config, indent=2), encoding="utf-8")
    return path


def build_all(root: Path) -> dict[str, Path]:
    """Build every tiny model under `root`, keyed by the folder name it was written to."""
    builders = {
        "bert-clf": build_bert_classifier,
        "distilbert-clf": build_distilbert_classifier,
        "nli": build_nli_classifier,
        "marian": build_marian,
        "bart": build_bart,
        "t5": build_t5,
        "bert-embed": build_bert_embedder,
        "bert-mlm": build_bert_masked_lm,
        "bert-ner": build_bert_token_classifier,
        "bert-rerank": build_bert_cross_encoder,
    }
    return {name: build(root / name) for name, build in builders.items()}
