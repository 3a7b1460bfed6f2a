#!/usr/bin/env bash
# Create .venv-gptq: the core .venv plus optimum + GPTQModel, so that transformers' GPTQ integration can load
# flexquant's GPTQ exports on CPU (bench/export_bench.py, tests/test_export.py when run with this python).
#
# GPTQModel 7.x declares torch>=2.14.1, which would replace the CPU torch 2.13.0 here by a multi-GB CUDA
# build; its CPU path works with torch 2.13.0, so it is installed without its dependencies into a venv that
# sees the core venv's packages (a .pth file), plus the few small pure-Python packages it imports.
# Its CPU kernels are compiled on first use (a few minutes, cached under ~/.cache/gptqmodel).
# Usage: bash bench/gptq_env.sh   (after the core .venv exists)
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${GPTQ_VENV:-.venv-gptq}
CORE=$(.venv/bin/python -c "import site; print(site.getsitepackages()[0])")

[ -x "$VENV/bin/python" ] || .venv/bin/python -m venv "$VENV"
echo '*' > "$VENV/.gitignore"          # keep the venv out of git without touching .gitignore
SITE=$("$VENV/bin/python" -c "import site; print(site.getsitepackages()[0])")
printf '%s\n%s\n' "$CORE" "$PWD/src" > "$SITE/zz_flexquant_core.pth"
"$VENV/bin/python" -m pip install --no-deps \
    optimum==2.3.0 gptqmodel==7.7.0 device-smi pypcre tokenicer logbar defuser threadpoolctl
"$VENV/bin/python" - <<'EOF'
import torch, gptqmodel, optimum.gptq, flexquant  # noqa: F401  (import check)
print("gptq venv ok: torch", torch.__version__, "gptqmodel", gptqmodel.__version__)
EOF
