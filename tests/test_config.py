"""Settings that contradict each other stop the server at start-up with a message naming both,
where a request the document allows could never be served under them (app/config.py)."""

from __future__ import annotations

import os
import subprocess
import sys
from typing import Any

import pytest
from pydantic import ValidationError

from app.config import Settings

INPUTS = "TESSERA_MAX_INPUTS_PER_REQUEST"
# Each pair, and what the refusal names: both settings, with their values.
PAIRS = [
    ({"max_queue_items": 8, "max_inputs_per_request": 16}, "TESSERA_MAX_QUEUE_ITEMS (8)", f"{INPUTS} (16)"),
    (
        {"rate_limit_inputs_per_s": 1.0, "rate_limit_burst": 4, "max_inputs_per_request": 8},
        "TESSERA_RATE_LIMIT_BURST (4)",
        f"{INPUTS} (8)",
    ),
    ({"max_tokens_per_request": 10, "max_inputs_per_request": 16}, "TESSERA_MAX_TOKENS_PER_REQUEST (10)", INPUTS),
    (
        {"max_body_bytes": 2048, "max_chars_per_input": 4000},
        "TESSERA_MAX_BODY_BYTES (2048)",
        "TESSERA_MAX_CHARS_PER_INPUT (4000)",
    ),
    (
        {"max_body_bytes": 1024, "max_chars_per_input": 1000, "max_inputs_per_request": 300},
        "TESSERA_MAX_BODY_BYTES (1024)",
        f"{INPUTS} (300)",
    ),
    (
        {"request_timeout_s": 700, "max_request_timeout_s": 600},
        "TESSERA_REQUEST_TIMEOUT_S (700)",
        "TESSERA_MAX_REQUEST_TIMEOUT_S (600)",
    ),
]


@pytest.mark.parametrize(("settings", "one", "other"), PAIRS)
def test_contradicting_settings_are_refused_naming_both(settings: dict[str, Any], one: str, other: str) -> None:
    with pytest.raises(ValidationError) as refused:
        Settings(hub="offline", **settings)
    message = str(refused.value)
    assert one in message and other in message, message
    assert "raise the" in message  # and what to change


def test_settings_that_fit_together_are_taken() -> None:
    Settings(hub="offline")  # the defaults
    Settings(hub="offline", max_queue_items=16, max_inputs_per_request=16, max_tokens_per_request=16)
    # A burst without a rate limits nothing, so it contradicts nothing.
    Settings(hub="offline", rate_limit_burst=4, max_inputs_per_request=8)


def test_a_server_with_a_queue_below_its_input_limit_does_not_start() -> None:
    env = {**os.environ, "TESSERA_MAX_QUEUE_ITEMS": "8", "TESSERA_MAX_INPUTS_PER_REQUEST": "16", "HF_HUB_OFFLINE": "1"}
    started = subprocess.run(
        [sys.executable, "-m", "app", "serve", "--port", "1"], env=env, capture_output=True, text=True, timeout=120
    )
    assert started.returncode != 0
    assert (
        "TESSERA_MAX_QUEUE_ITEMS (8) is below TESSERA_MAX_INPUTS_PER_REQUEST (16): a request of the largest "
        "allowed size could never be queued; raise the queue or lower the input limit"
    ) in started.stderr
