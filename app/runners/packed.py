"""A BERT-family encoder run on packed tokens: a ragged batch costs its real tokens only.

``PackedEncoder`` takes the padded batch the model takes and returns the model's output,
but runs embeddings, projections, feed-forward layers and layer norms on the real tokens
packed into one ``[tokens, hidden]`` matrix (on a CPU a padded token costs as much as a
real one); only attention, a small share of the work at these lengths, goes back to the
padded shape. It reuses the model's own modules (no weights of its own), knows the
architectures in ``PACKABLE``, and like a trace is used only once it matches the eager
model (app/runners/traced.py).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn


class _Bert:
    """Where BERT's parts are: embeddings, per-layer projections and norms, the head."""

    def first_position(self, config: Any) -> int:
        return 0

    def layers(self, base: Any) -> Any:
        return base.encoder.layer

    def embed(self, base: Any, ids: torch.Tensor, types: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        return base.embeddings(input_ids=ids, token_type_ids=types, position_ids=positions)

    def projections(self, layer: Any) -> tuple[Any, Any, Any]:
        attention = layer.attention.self
        return attention.query, attention.key, attention.value

    def heads(self, layer: Any) -> tuple[int, int]:
        return layer.attention.self.num_attention_heads, layer.attention.self.attention_head_size

    def after_attention(self, layer: Any, context: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return layer.attention.output(context, x)  # out-projection, residual, layer norm

    def feed_forward(self, layer: Any, x: torch.Tensor) -> torch.Tensor:
        return layer.output(layer.intermediate(x), x)

    def logits(self, model: Any, hidden: torch.Tensor) -> torch.Tensor:
        # BERT's classifier reads the pooled first token; RoBERTa's head reads it from the sequence.
        pooler = getattr(model.base_model, "pooler", None)
        return model.classifier(pooler(hidden) if pooler is not None else hidden)

    def knows(self, model: Any) -> bool:
        layer = self.layers(model.base_model)[0]
        parts = (*self.projections(layer), layer.attention.output, layer.intermediate, layer.output)
        return all(isinstance(p, nn.Module) for p in parts)


class _Roberta(_Bert):
    """BERT's layout; positions count from padding_idx + 1."""

    def first_position(self, config: Any) -> int:
        return int(config.pad_token_id) + 1


class _DistilBert(_Bert):
    """DistilBERT: no token types, its own layer names, a pre-classifier on the first token."""

    def layers(self, base: Any) -> Any:
        return base.transformer.layer

    def embed(self, base: Any, ids: torch.Tensor, types: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        return base.embeddings(input_ids=ids, position_ids=positions)

    def projections(self, layer: Any) -> tuple[Any, Any, Any]:
        return layer.attention.q_lin, layer.attention.k_lin, layer.attention.v_lin

    def heads(self, layer: Any) -> tuple[int, int]:
        return layer.attention.n_heads, layer.attention.attention_head_size

    def after_attention(self, layer: Any, context: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return layer.sa_layer_norm(layer.attention.out_lin(context) + x)

    def feed_forward(self, layer: Any, x: torch.Tensor) -> torch.Tensor:
        return layer.output_layer_norm(layer.ffn(x.unsqueeze(0)).squeeze(0) + x)

    def logits(self, model: Any, hidden: torch.Tensor) -> torch.Tensor:
        return model.classifier(F.relu(model.pre_classifier(hidden[:, 0])))

    def knows(self, model: Any) -> bool:
        layer = self.layers(model.base_model)[0]
        parts = (
            *self.projections(layer),
            layer.attention.out_lin,
            layer.sa_layer_norm,
            layer.ffn,
            layer.output_layer_norm,
        )
        return all(isinstance(p, nn.Module) for p in parts)


# model_type -> where its parts are; anything else runs padded.
PACKABLE: dict[str, _Bert] = {
    "bert": _Bert(),
    "roberta": _Roberta(),
    "xlm-roberta": _Roberta(),
    "distilbert": _DistilBert(),
}


def packable(model: Any, output: str) -> bool:
    """Whether ``PackedEncoder`` knows this model's layers and the output asked for."""
    config = model.config
    family = PACKABLE.get(config.model_type)
    if family is None or getattr(config, "is_decoder", False):
        return False
    if getattr(config, "position_embedding_type", "absolute") != "absolute":
        return False
    if output not in {"logits", "last_hidden_state"}:
        return False
    if output == "logits" and not isinstance(getattr(model, "classifier", None), nn.Module):
        return False
    try:
        return family.knows(model)
    except (AttributeError, IndexError, TypeError):
        return False


class PackedEncoder(nn.Module):
    """``model``'s forward pass on a right-padded batch, computed on its real tokens only.

    Returns ``{output: tensor}`` as the model would; in ``last_hidden_state`` the padded
    positions are zero (every pooling reads real tokens only).
    """

    def __init__(self, model: Any, output: str) -> None:
        super().__init__()
        self.model = model  # the only registered child: parameter names are the model's, under "model."
        self.output = output
        self.family = PACKABLE[model.config.model_type]
        self.heads, self.head_size = self.family.heads(self.family.layers(model.base_model)[0])
        self.first_position = self.family.first_position(model.config)

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, token_type_ids: torch.Tensor | None = None
    ) -> dict[str, torch.Tensor]:
        base, family = self.model.base_model, self.family
        real = attention_mask.reshape(-1).bool()
        index = real.nonzero().squeeze(1)  # padded slot of each real token
        # Padded slot -> a packed row (a padding slot takes its row's last real token; it is
        # masked out of attention and never read back).
        slot_row = (real.long().cumsum(0) - 1).clamp(min=0)
        positions = attention_mask.cumsum(1) - 1 + self.first_position

        def packed(t: torch.Tensor) -> torch.Tensor:
            return t.reshape(-1).index_select(0, index).unsqueeze(0)

        types = packed(token_type_ids) if token_type_ids is not None else torch.zeros_like(packed(input_ids))
        x = family.embed(base, packed(input_ids), types, packed(positions))[0]
        keys = attention_mask.bool()[:, None, None, :]

        def by_head(t: torch.Tensor) -> torch.Tensor:
            padded = t.index_select(0, slot_row).unflatten(0, attention_mask.shape)
            return padded.unflatten(2, (self.heads, self.head_size)).transpose(1, 2)

        for layer in family.layers(base):
            q, k, v = (by_head(projection(x)) for projection in family.projections(layer))
            context = F.scaled_dot_product_attention(q, k, v, attn_mask=keys)
            context = context.transpose(1, 2).flatten(2).flatten(0, 1).index_select(0, index)
            x = family.feed_forward(layer, family.after_attention(layer, context, x))

        hidden = x.index_select(0, slot_row).unflatten(0, attention_mask.shape)
        hidden = hidden * attention_mask.unsqueeze(-1).to(hidden.dtype)
        if self.output == "last_hidden_state":
            return {"last_hidden_state": hidden}
        return {"logits": family.logits(self.model, hidden)}
