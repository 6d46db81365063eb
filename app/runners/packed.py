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

# model_type -> the first position id (RoBERTa-style models count from padding_idx + 1).
PACKABLE = {"bert": "bert", "roberta": "roberta", "xlm-roberta": "roberta"}


def packable(model: Any, output: str) -> bool:
    """Whether ``PackedEncoder`` knows this model's layers and the output asked for."""
    config = model.config
    if PACKABLE.get(config.model_type) is None or getattr(config, "is_decoder", False):
        return False
    if getattr(config, "position_embedding_type", "absolute") != "absolute":
        return False
    base = model.base_model
    if output == "logits" and not isinstance(getattr(model, "classifier", None), nn.Module):
        return False
    if output not in {"logits", "last_hidden_state"}:
        return False
    try:
        layer = base.encoder.layer[0]
        parts = (layer.attention.self.query, layer.attention.output, layer.intermediate, layer.output)
    except (AttributeError, IndexError, TypeError):
        return False
    return all(isinstance(p, nn.Module) for p in parts)


class PackedEncoder(nn.Module):
    """``model``'s forward pass on a right-padded batch, computed on its real tokens only.

    Returns ``{output: tensor}`` as the model would; in ``last_hidden_state`` the padded
    positions are zero (every pooling reads real tokens only).
    """

    def __init__(self, model: Any, output: str) -> None:
        super().__init__()
        self.model = model  # the only registered child: parameter names are the model's, under "model."
        self.output = output
        attention = model.base_model.encoder.layer[0].attention.self
        self.heads = attention.num_attention_heads
        self.head_size = attention.attention_head_size
        self.first_position = config_first_position(model.config)

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, token_type_ids: torch.Tensor | None = None
    ) -> dict[str, torch.Tensor]:
        base = self.model.base_model
        real = attention_mask.reshape(-1).bool()
        index = real.nonzero().squeeze(1)  # padded slot of each real token
        # Padded slot -> a packed row (a padding slot takes its row's last real token; it is
        # masked out of attention and never read back).
        slot_row = (real.long().cumsum(0) - 1).clamp(min=0)
        positions = attention_mask.cumsum(1) - 1 + self.first_position

        def packed(t: torch.Tensor) -> torch.Tensor:
            return t.reshape(-1).index_select(0, index).unsqueeze(0)

        types = packed(token_type_ids) if token_type_ids is not None else torch.zeros_like(packed(input_ids))
        x = base.embeddings(input_ids=packed(input_ids), token_type_ids=types, position_ids=packed(positions))[0]
        keys = attention_mask.bool()[:, None, None, :]

        def by_head(t: torch.Tensor) -> torch.Tensor:
            padded = t.index_select(0, slot_row).unflatten(0, attention_mask.shape)
            return padded.unflatten(2, (self.heads, self.head_size)).transpose(1, 2)

        for layer in base.encoder.layer:
            attention = layer.attention.self
            q, k, v = by_head(attention.query(x)), by_head(attention.key(x)), by_head(attention.value(x))
            context = F.scaled_dot_product_attention(q, k, v, attn_mask=keys)
            context = context.transpose(1, 2).flatten(2).flatten(0, 1).index_select(0, index)
            x = layer.attention.output(context, x)
            x = layer.output(layer.intermediate(x), x)

        hidden = x.index_select(0, slot_row).unflatten(0, attention_mask.shape)
        hidden = hidden * attention_mask.unsqueeze(-1).to(hidden.dtype)
        if self.output == "last_hidden_state":
            return {"last_hidden_state": hidden}
        pooler = getattr(base, "pooler", None)
        # BERT's classifier reads the pooled first token; RoBERTa's head reads it from the sequence.
        features = pooler(hidden) if pooler is not None else hidden
        return {"logits": self.model.classifier(features)}


def config_first_position(config: Any) -> int:
    if PACKABLE.get(config.model_type) == "roberta":
        return int(config.pad_token_id) + 1
    return 0
