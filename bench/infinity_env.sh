#!/usr/bin/env bash
# Infinity 0.0.78 (michaelfeil/infinity) in a virtualenv of its own, for bench/rerank.py.
#
#   bench/infinity_env.sh [DIR]                      # torch and optimum (ONNX Runtime) engines
#   bench/infinity_env.sh --bettertransformer [DIR]  # torch engine with BetterTransformer
#
# DIR defaults to .bench-venvs/infinity (or .bench-venvs/infinity-bt) under the repository
# root, which git ignores; PYTHON picks the interpreter (default python3, 3.9-3.13).
#
# Why two environments: infinity-emb 0.0.78 asks for optimum[onnxruntime]>=1.24 and
# sentence-transformers<4, and no single set of versions gives it both of its CPU fast paths
# beside torch 2.13:
# - default: what pip resolves today, pinned (optimum 2.1 with optimum-onnx, transformers
#   4.57). Both engines serve a cross-encoder. optimum 2 has no BetterTransformer, so the
#   torch engine runs the plain transformers model; its ONNX graph optimisation fails
#   (optimum-onnx's OptimizationConfig has no optimize_with_onnxruntime_only) and it runs
#   the exported graph unoptimised, as it logs.
# - --bettertransformer: optimum 1.27 and transformers 4.48 (BetterTransformer refuses
#   4.49 and later, with a RuntimeError Infinity does not catch): the torch engine gets
#   Infinity's default BetterTransformer (nested tensors: no work on padding). optimum 1.27's
#   ONNX Runtime side cannot import under torch 2.13 (torch.onnx's _attention_scale is
#   gone), so that environment serves the torch engine only.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"

variant=default
if [ "${1:-}" = "--bettertransformer" ]; then
  variant=bettertransformer
  shift
fi
if [ "$variant" = default ]; then
  dir="${1:-$root/.bench-venvs/infinity}"
  pins=(
    "infinity-emb[server,torch,optimum]==0.0.78"
    "optimum==2.1.0" "optimum-onnx==0.1.0" "onnxruntime==1.32.0"
    "transformers==4.57.6" "tokenizers==0.22.2" "huggingface-hub==0.36.2"
  )
  check="import infinity_emb, optimum.onnxruntime, sentence_transformers"
else
  dir="${1:-$root/.bench-venvs/infinity-bt}"
  pins=(
    "infinity-emb[server,torch]==0.0.78"
    "optimum==1.27.0" "transformers==4.48.3" "tokenizers==0.21.4" "huggingface-hub==0.36.2"
  )
  check="import infinity_emb, sentence_transformers; from optimum.bettertransformer import BetterTransformer"
fi

"${PYTHON:-python3}" -m venv "$dir"
# torch first, pinned: the CPU wheel this project's machines carry. An unpinned torch from
# PyPI is the CUDA build, several GB.
"$dir/bin/pip" install -q --disable-pip-version-check "torch==2.13.0"
"$dir/bin/pip" install -q --disable-pip-version-check "torch==2.13.0" "${pins[@]}" \
  "sentence-transformers==3.4.1" "numpy==1.26.4" "fastapi==0.165.0" "uvicorn[standard]==0.32.1"
"$dir/bin/python" -c "$check"
echo "Infinity 0.0.78 ($variant) in $dir: bench/rerank.py finds it there by default"
