#!/usr/bin/env bash
# Wheels for bench/gpu_check.py on a bare GPU machine that reaches no package index.
#
# That machine's image has Python 3.12 with CUDA torch, transformers, tokenizers,
# safetensors, sentencepiece, huggingface_hub, numpy, httpx (with anyio, h11, idna),
# click, uvloop, prometheus-client and pyyaml, but not the serving stack: this downloads
# the rest of pyproject.toml's runtime dependencies, and theirs, as cp312 manylinux
# x86_64 (or pure-Python) wheels into .whl/ at the repository root (git-ignored, carried
# to the machine by the device tool, which takes 64 MiB at most). Each is pinned to the
# version the dev virtualenv runs, so the GPU machine serves what the tests passed on.
#
#   bench/gpu_wheels.sh                       # versions read from .venv/bin/python
#   PYTHON=path/to/another/venv/bin/python bench/gpu_wheels.sh
set -euo pipefail

cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-.venv/bin/python}
DEST=.whl
LIMIT_MIB=64

# Runtime dependencies the image lacks, then what they need that it lacks too:
# fastapi -> starlette, pydantic, annotated-doc, typing-inspection, opentelemetry-api
# (fastapi's telemetry imports it); pydantic -> pydantic-core, annotated-types;
# pydantic-settings -> python-dotenv; fastapi-offline -> fastapi. typing-extensions
# (pydantic needs >= 4.16) and anyio (fastapi needs >= 4.1) come along in case the
# image's are older.
PACKAGES=(
    fastapi starlette uvicorn httptools pydantic pydantic-core pydantic-settings
    fastapi-offline pysbd pyzmq msgspec
    annotated-doc annotated-types typing-inspection typing-extensions python-dotenv opentelemetry-api anyio
)

PLATFORMS=(manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64 manylinux1_x86_64)
platform_args=()
for platform in "${PLATFORMS[@]}"; do
    platform_args+=(--platform "$platform")
done

rm -rf "$DEST"
mkdir -p "$DEST"
for name in "${PACKAGES[@]}"; do
    version=$("$PYTHON" -c "import importlib.metadata as m, sys; print(m.version(sys.argv[1]))" "$name")
    # A pure-Python package has only a py3-none-any wheel, which a --platform list admits too.
    "$PYTHON" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        "${platform_args[@]}" --platform any -d "$DEST" "$name==$version" \
        2> >(grep -v "is ignored: it is neither a file nor a directory" >&2)
done

ls -l "$DEST"
bytes=$(du -cb "$DEST"/*.whl | tail -1 | cut -f1)
echo "$(ls "$DEST"/*.whl | wc -l) wheels, $((bytes / 1024)) KiB in $DEST/"
if ((bytes > LIMIT_MIB * 1024 * 1024)); then
    echo "over the ${LIMIT_MIB} MiB the device tool carries" >&2
    exit 1
fi
