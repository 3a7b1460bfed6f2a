#!/usr/bin/env bash
# Build llama.cpp from the source tree that llama-cpp-python vendors on PyPI (no hub, no git): the tools
# llama-perplexity, llama-quantize, llama-imatrix and llama-bench under .llama/bin, the shared libraries under
# .llama/lib, and a venv .venv-llama whose `llama_cpp` binding loads those libraries (LLAMA_CPP_LIB_PATH) —
# one build, so the binding and the tools are the same llama.cpp. Used by bench/gguf.py and bench/cpu_speed.py
# as the real client of `flexquant export --format gguf`. About 10 minutes on 2 cores.
# Usage: bash bench/llama_env.sh   (after the core .venv exists)
set -euo pipefail
cd "$(dirname "$0")/.."
VERSION=${LLAMA_CPP_PYTHON:-0.3.36}
OUT=${LLAMA_DIR:-.llama}
VENV=${LLAMA_VENV:-.venv-llama}
mkdir -p "$OUT/src"
echo '*' > "$OUT/.gitignore"
if [ ! -d "$OUT/src/llama_cpp_python-$VERSION" ]; then
    .venv/bin/python -m pip download --no-deps --no-binary :all: "llama-cpp-python==$VERSION" -d "$OUT/src"
    tar -xzf "$OUT/src/llama_cpp_python-$VERSION.tar.gz" -C "$OUT/src"
fi
TREE="$OUT/src/llama_cpp_python-$VERSION/vendor/llama.cpp"
cmake -S "$TREE" -B "$OUT/build" -DCMAKE_BUILD_TYPE=Release -DBUILD_SHARED_LIBS=ON -DLLAMA_CURL=OFF \
    -DLLAMA_BUILD_SERVER=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DGGML_NATIVE=ON \
    -DCMAKE_INSTALL_PREFIX="$PWD/$OUT" >/dev/null
cmake --build "$OUT/build" -j"$(nproc)" --target llama-perplexity llama-quantize llama-imatrix llama-bench llama
cmake --install "$OUT/build" >/dev/null 2>&1 || true   # installs what was built; missing targets are skipped
mkdir -p "$OUT/bin" "$OUT/lib"
cp -f "$OUT"/build/bin/llama-* "$OUT/bin/"
find "$OUT/build" -name "*.so*" -exec cp -Pf {} "$OUT/lib/" \;
[ -x "$VENV/bin/python" ] || .venv/bin/python -m venv "$VENV"
echo '*' > "$VENV/.gitignore"
CORE=$(.venv/bin/python -c "import site; print(site.getsitepackages()[0])")
SITE=$("$VENV/bin/python" -c "import site; print(site.getsitepackages()[0])")
printf '%s\n%s\n' "$CORE" "$PWD/src" > "$SITE/zz_flexquant_core.pth"
CMAKE_ARGS="-DLLAMA_BUILD=OFF" "$VENV/bin/python" -m pip install --no-deps --no-build-isolation \
    scikit-build-core diskcache jinja2 >/dev/null 2>&1 || "$VENV/bin/python" -m pip install scikit-build-core diskcache jinja2
CMAKE_ARGS="-DLLAMA_BUILD=OFF" "$VENV/bin/python" -m pip install --no-deps "$OUT/src/llama_cpp_python-$VERSION.tar.gz"
LLAMA_CPP_LIB_PATH="$PWD/$OUT/lib" "$VENV/bin/python" - <<'PY'
import llama_cpp
print("llama venv ok: llama-cpp-python", llama_cpp.__version__)
PY
"$OUT/bin/llama-perplexity" --version 2>&1 | head -2
