"""The OpenAPI document holds: schemathesis (every check, every phase: examples, coverage,
fuzzing, stateful) against a live server on the local catalog, with API and admin keys
set so that the auth checks run too. Schema-valid requests are answered, schema-violating
ones refused with a 4xx, no 5xx, every status and body as documented; the few allowances
for rules JSON Schema cannot state are in tests/schemathesis.toml, each with its reason.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import server_process

pytestmark = pytest.mark.contract

CONFIG = Path(__file__).with_name("schemathesis.toml")
ST = Path(sys.executable).with_name("st")
ADMIN_KEY = "contract-admin-key"


@pytest.mark.skipif(not ST.exists(), reason="schemathesis is not installed (pip install -e '.[dev]')")
def test_the_openapi_document_holds_for_every_operation(local_catalog: Path, layout_env: dict[str, str]) -> None:
    env = {
        **layout_env,
        "TESSERA_CATALOG": str(local_catalog),
        # Small caps keep each generated request cheap; the document states them, whatever they are.
        "TESSERA_MAX_NEW_TOKENS_CAP": "16",
        "TESSERA_MAX_NUM_BEAMS": "4",
        "TESSERA_MAX_INPUTS_PER_REQUEST": "8",
        "TESSERA_MAX_CHARS_PER_INPUT": "2000",
        "TESSERA_API_KEYS": "contract-inference-key",
        "TESSERA_ADMIN_KEYS": ADMIN_KEY,
    }
    with server_process(env) as server:
        command = [str(ST), "--no-color", "--config-file", str(CONFIG), "run", f"{server.url}/openapi.json"]
        command += ["--checks", "all", "--header", f"Authorization: Bearer {ADMIN_KEY}", "--request-timeout", "60"]
        run = subprocess.run(command, capture_output=True, text=True, timeout=900)
        server_log = server.output()
    report = run.stdout + run.stderr
    counts = re.search(r"(\d+) generated, (\d+) passed", report)
    print(report[-1500:])
    assert run.returncode == 0, report[-6000:] + "\n--- server log ---\n" + server_log[-3000:]
    assert counts is not None and int(counts[1]) == int(counts[2]) >= 1000, report[-2000:]
    assert "Traceback" not in server_log
