#!/usr/bin/env bash
# Create (or update) .venv-peers: a venv, separate from the core .venv, for bench/peers.py.
# llm-compressor 0.14.0.1 pins transformers<=5.17, so it must not share the core venv.
# torch==2.13.0 is named on the command line so pip keeps the local CPU wheel instead of
# pulling a multi-GB CUDA build.  Usage: bash bench/peers_env.sh   (PYTHON=python3.11 to choose)
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${PEERS_VENV:-.venv-peers}   # override only for testing
PY=${PYTHON:-python3}

[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
echo '*' > "$VENV/.gitignore"          # keep the venv out of git without touching .gitignore
"$VENV/bin/python" -m pip install --upgrade pip
"$VENV/bin/python" -m pip install \
    torch==2.13.0 \
    transformers==5.17.0 \
    llmcompressor==0.14.0.1 \
    compressed-tensors==0.19.0 \
    hqq==0.2.8.post1 \
    accelerate==1.15.0 \
    safetensors
"$VENV/bin/python" - <<'EOF'
import importlib.metadata as md
import torch
assert torch.__version__.startswith("2.13.0"), torch.__version__
import hqq.core.quantize, llmcompressor  # noqa: F401  (import check)
print("peers venv ok:", {p: md.version(p) for p in
      ("torch", "transformers", "llmcompressor", "compressed-tensors", "hqq")})
EOF
