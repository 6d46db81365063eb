"""The field types request bodies share, each validated by one function whose rule its JSON
schema states too, so that the OpenAPI document says what the server enforces.

Texts (inputs, labels, templates) must hold a non-space character and valid Unicode: a
lone surrogate (``"\\ud800"``, legal in JSON, unencodable in UTF-8) is refused here with
the input's index, before any tokenizer sees it. Limits that are settings (inputs per
request, characters per input, generation caps) are marked ``x-limit`` in the schema and
filled in from the server's settings when its OpenAPI document is built
(``app.api.openapi``); the service layer enforces them.
"""

from __future__ import annotations

import re
from typing import Annotated, Any

from pydantic import AfterValidator, BeforeValidator, Field, WithJsonSchema

from app.tasks import check_template

# A non-space character, with "space" spelled out as ECMA-262's \s (what JSON Schema's
# patterns mean) so that every regex engine reads it alike: Python's \s and str.isspace
# also count U+001C-U+001F and U+0085, and not U+FEFF.
_SPACE = "\\t\\n\\x0b\\f\\r \\u00a0\\u1680\\u2000-\\u200a\\u2028\\u2029\\u202f\\u205f\\u3000\\ufeff"
NOT_BLANK = f"[^{_SPACE}]"
_NON_SPACE = re.compile(NOT_BLANK)
# Exactly one "{}" in a hypothesis template, without look-arounds: runs free of "{}",
# the slot, runs free of "{}".
_NO_SLOT = r"(?:[^{]|\{+[^{}])*\{*"
ONE_SLOT = rf"^{_NO_SLOT}\{{\}}{_NO_SLOT}$"
_SURROGATE = re.compile(r"[\ud800-\udfff]")

LIMIT_KEY = "x-limit"


def limit(**keywords: str) -> dict[str, Any]:
    """A schema marker: each JSON-schema keyword takes the value of the named setting."""
    return {LIMIT_KEY: keywords}


def text_problem(text: str) -> str | None:
    """Why a client's text cannot be read, or None."""
    if not text.isascii() and _SURROGATE.search(text):
        position = _SURROGATE.search(text).start()  # type: ignore[union-attr]
        return (
            f"holds a lone surrogate (U+{ord(text[position]):04X} at character {position}), which is not "
            "valid Unicode; send UTF-8 text"
        )
    if not _NON_SPACE.search(text):
        return "is empty or blank; send text with at least one non-space character"
    return None


def one_text(value: str) -> str:
    problem = text_problem(value)
    if problem is not None:
        raise ValueError(f"the text {problem}")
    return value


def _texts(value: str | list[str]) -> str | list[str]:
    texts = [value] if isinstance(value, str) else value
    if not texts:
        raise ValueError("inputs is an empty list; send at least one text")
    for i, text in enumerate(texts):
        problem = text_problem(text)
        if problem is not None:
            raise ValueError(f"input {i} {problem}")
    return value


def _template(value: str) -> str:
    return one_text(check_template(value))


TEXT_SCHEMA: dict[str, Any] = {
    "type": "string",
    "minLength": 1,
    "pattern": NOT_BLANK,
    **limit(maxLength="max_chars_per_input"),
}

Inputs = Annotated[
    str | list[str],
    AfterValidator(_texts),
    WithJsonSchema(
        {
            "anyOf": [
                TEXT_SCHEMA,
                {"type": "array", "items": TEXT_SCHEMA, "minItems": 1, **limit(maxItems="max_inputs_per_request")},
            ],
            "description": "One text, or a list of texts (answered in the same order). Each holds a "
            "non-space character and valid Unicode (no lone surrogates).",
        }
    ),
]


# One text with the rules of an input (a rerank query), and a list of them (its documents).
Text = Annotated[str, AfterValidator(one_text), WithJsonSchema(TEXT_SCHEMA)]
Texts = Annotated[
    list[Text],
    Field(min_length=1),
    WithJsonSchema({"type": "array", "items": TEXT_SCHEMA, "minItems": 1, **limit(maxItems="max_inputs_per_request")}),
]


def masked_inputs(mask: str) -> Any:
    """Inputs that each hold ``mask``, a fill-mask model's mask token: the same rule as
    ``Inputs``, and that one, stated in the schema too."""

    def _masked(value: str | list[str]) -> str | list[str]:
        for i, text in enumerate([value] if isinstance(value, str) else value):
            if mask not in text:
                raise ValueError(f"input {i} holds no mask token; put {mask} where a word should be predicted")
        return value

    text = {"allOf": [TEXT_SCHEMA, {"pattern": re.escape(mask)}]}
    schema = {
        "anyOf": [
            text,
            {"type": "array", "items": text, "minItems": 1, **limit(maxItems="max_inputs_per_request")},
        ],
        "description": f"One text, or a list of texts, each holding the model's mask token {mask}.",
    }
    return Annotated[str | list[str], AfterValidator(_texts), AfterValidator(_masked), WithJsonSchema(schema)]


Label = Annotated[
    str,
    AfterValidator(one_text),
    WithJsonSchema({"type": "string", "minLength": 1, "pattern": NOT_BLANK}),
]
Labels = Annotated[list[Label], Field(min_length=1, max_length=100)]

Template = Annotated[
    str,
    AfterValidator(_template),
    WithJsonSchema(
        {
            "type": "string",
            "pattern": ONE_SLOT,
            "description": "How a label becomes a hypothesis: '{}' exactly once, e.g. 'This text is about {}.'",
        }
    ),
]

Timeout = Annotated[
    float | None,
    Field(
        ge=1,
        description="Seconds (at least 1) this request may wait and run, up to the server's cap; past it: 504. "
        "A client that disconnects has its work dropped at once, whatever its timeout.",
    ),
]


def integral(value: Any) -> Any:
    """JSON Schema counts 4.0 as an integer; the models are strict otherwise (no "4", no true)."""
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


# The largest count a request may hold: any setting past it means "all" or "none" already,
# and a number past 2**63 cannot travel to the engine process (MessagePack's integers).
INT_MAX = 2**31 - 1

# Constraints first, then the conversion: so the JSON schema keeps minimum/maximum.
PositiveInt = Annotated[int, Field(ge=1, le=INT_MAX), BeforeValidator(integral)]
NonNegativeInt = Annotated[int, Field(ge=0, le=INT_MAX), BeforeValidator(integral)]


def as_list(inputs: str | list[str]) -> list[str]:
    return [inputs] if isinstance(inputs, str) else list(inputs)
