#!/usr/bin/env bash
# One prepared run on a lent GPU machine (the device tool; docs/scale.md "On a GPU"): the pipeline on CUDA
# against the CPU (bench/device_parity.py), the synthetic scale rows on the GPU (bench/scale.py --device cuda:
# host and device peaks, time), and the CUDA kernel tests. Everything it writes goes under $OUT (at most 8
# files). Needs, carried from the developer's machine: .whl (the gguf wheel the GPU image lacks) and .devtok
# (tokenizer.json + tokenizer_config.json for the synthetic models). Self-limited to BUDGET seconds (default
# 560) so the call ends inside its 600 s limit with what it has. CHECKS picks and orders the steps (default: all,
# as below); GPTQ_SIZES / FLEX_SIZES the synthetic sizes of the scale rows (a later session runs what an earlier
# one's budget cut off).
set -u
cd "$(dirname "$0")/.."
BUDGET=${BUDGET:-560}
OUT=${OUT:-/tmp/device-out}
mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  || { echo "wheel install failed"; exit 1; }
export PYTHONPATH=/tmp/site:$PWD/src:$PWD PYTHONUNBUFFERED=1 FLEXQUANT_CACHE=/tmp/fq-cache \
  FLEXQUANT_SYNTH_TOKENIZER=$PWD/.devtok
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv; nproc
  python3 -c "import torch, transformers, triton; print(torch.__version__, transformers.__version__, triton.__version__)"
} > "$OUT/machine.txt" 2>&1

left() { echo $(( BUDGET - SECONDS )); }
step() {  # step NAME MAX_SECONDS CMD...: run CMD for at most MAX_SECONDS (less if the budget is nearly spent)
  local name=$1 t=$2; shift 2
  local l; l=$(left)
  (( l < 20 )) && { echo "== $name: skipped, budget spent" | tee -a "$OUT/checks.log"; return; }
  (( t > l - 25 )) && t=$(( l - 25 ))
  echo "== $name (≤ ${t}s)" | tee -a "$OUT/checks.log"
  # SIGINT first: pytest then still prints its durations, a bench its partial rows; SIGKILL 15 s later
  timeout -s INT -k 15 "$t" "$@" >> "$OUT/checks.log" 2>&1
  echo "== $name: rc=$? at ${SECONDS}s" | tee -a "$OUT/checks.log"
}

SCALE=(python3 -m bench.scale --no-depth --peer-sizes "" --distributed-sizes "" --device cuda --out "$OUT"
       --models-dir /tmp/models --timeout "${ROW_SECONDS:-200}")
CHECKS=${CHECKS:-"parity scale-gptq kernel-tests scale-flexible"}
for c in $CHECKS; do
  case $c in
    parity) step parity 150 python3 -m bench.device_parity --out "$OUT/parity.json" ;;
    scale-gptq) step scale-gptq "${GPTQ_SECONDS:-330}" "${SCALE[@]}" --sizes "${GPTQ_SIZES:-1.1b,2b}" --methods gptq \
                  --name scale_gpu_gptq ;;
    kernel-tests) step kernel-tests "${KERNEL_SECONDS:-120}" python3 -m pytest -q -p no:cacheprovider --durations=25 \
                    tests/test_kernels_gpu.py ;;
    scale-flexible) step scale-flexible "${FLEX_SECONDS:-250}" "${SCALE[@]}" --sizes "${FLEX_SIZES:-1.1b}" \
                      --methods flexible --name scale_gpu_flexible ;;
    *) echo "unknown check $c (parity, scale-gptq, kernel-tests, scale-flexible)"; exit 2 ;;
  esac
done
cp bench/results/work/scale/rows.json "$OUT/scale_rows.json" 2>/dev/null
# each row's own log (its progress lines: where a killed row was) lies too deep under $OUT to come back
for f in "$OUT"/work/scale/logs/*.log; do [ -f "$f" ] && { echo "### $f"; tail -c 4000 "$f"; }; done > "$OUT/row_logs.txt"
tail -c 20000 "$OUT/checks.log"
