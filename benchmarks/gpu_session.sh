#!/usr/bin/env bash
# One batched GPU session: install ditbake against the machine's own CUDA torch, run the GPU
# tests, the linear benchmark with CUDA graphs, and an AOTInductor-on-CUDA check. Results → $OUT.
set -uo pipefail
OUT=${OUT:-out/gpu}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
fi
python3 -m pip install -q --no-deps --no-build-isolation -e . > "$OUT/install.log" 2>&1 || {
  mkdir -p /tmp/ns/ditbake && for p in exporter runtime plugins; do ln -sfn "$PWD/$p" /tmp/ns/ditbake/$p; done
  export PYTHONPATH=/tmp/ns:${PYTHONPATH:-}; }
nvidia-smi --query-gpu=name,clocks.sm,clocks.max.sm --format=csv > "$OUT/gpu.txt" 2>&1
timeout 240 make test-gpu GPU_PYTHON=python3 2>&1 | tail -40 > "$OUT/test_gpu.log"
timeout 150 python3 benchmarks/bench_linear.py --graphs --out "$OUT/linear_h100.json" > "$OUT/bench_linear.log" 2>&1
timeout 150 python3 benchmarks/aoti_cuda_check.py --out "$OUT/aoti_cuda.json" > "$OUT/aoti_cuda.log" 2>&1
tail -3 "$OUT/test_gpu.log"; tail -5 "$OUT/aoti_cuda.log"
