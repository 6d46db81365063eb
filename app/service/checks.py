"""The limits every request meets, whatever route it came through: inputs per request,
characters per input, generation caps and deadlines (each tenant's rate is the engine's,
app/engine/rate.py: one bucket per tenant, whichever front a request came through)."""

from __future__ import annotations

from app.config import Settings
from app.errors import InputTooLarge, InvalidInput
from app.payloads import GenerationSettings


def check_inputs(settings: Settings, texts: list[str]) -> None:
    if len(texts) > settings.max_inputs_per_request:
        raise InputTooLarge(
            f"{len(texts)} inputs in one request; the limit is {settings.max_inputs_per_request} "
            "(TESSERA_MAX_INPUTS_PER_REQUEST): split the request"
        )
    for i, text in enumerate(texts):
        if len(text) > settings.max_chars_per_input:
            raise InputTooLarge(
                f"input {i} has {len(text)} characters; the limit is {settings.max_chars_per_input} "
                "(TESSERA_MAX_CHARS_PER_INPUT)"
            )


def check_generation(settings: Settings, generation: GenerationSettings) -> None:
    asked = dict(generation)
    caps = {
        "max_new_tokens": settings.max_new_tokens_cap,
        "max_length": settings.max_new_tokens_cap,
        "num_beams": settings.max_num_beams,
    }
    for name, cap in caps.items():
        if name in asked and asked[name] > cap:
            raise InvalidInput(f"{name} {asked[name]} is over this server's cap of {cap}")


def timeout_of(settings: Settings, requested: float | None) -> float:
    return min(requested or settings.request_timeout_s, settings.max_request_timeout_s)
