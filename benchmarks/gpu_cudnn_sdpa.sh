#!/usr/bin/env bash
# ditbake's C++ cuDNN ops (plugins/cudnn_sdpa.py) on the GPU machine in one device call: build the
# extension, GPU tests, the kernel benchmark (+ AOTInductor check). Carry .whl (diffusers) and
# .whl-cudnn (nvidia-cudnn-frontend wheel: headers + Python API). Everything lands in $OUT.
set -uo pipefail
OUT=${OUT:-out/gpu}; mkdir -p "$OUT"
source benchmarks/gpu_env.sh
nvidia-smi --query-gpu=name,clocks.sm,clocks.max.sm --format=csv > "$OUT/gpu.txt" 2>&1
t=$SECONDS
timeout 300 python3 -c "
import logging, time; logging.basicConfig(level=logging.INFO)
from ditbake.plugins import cudnn_sdpa as c
ok = c.load_native(verbose=True); print('native', ok, c.unavailable_reason())" > "$OUT/native_build.log" 2>&1
echo "build $((SECONDS - t)) s" >> "$OUT/native_build.log"; tail -5 "$OUT/native_build.log"
timeout ${TEST_LIMIT:-240} python3 -m pytest -q -m gpu -p no:cacheprovider ${TESTS:-tests/runtime/test_attention_kernels.py} \
  > "$OUT/test_cudnn_sdpa_gpu.log" 2>&1; echo "tests rc=$?" >> "$OUT/test_cudnn_sdpa_gpu.log"; tail -12 "$OUT/test_cudnn_sdpa_gpu.log"
timeout ${BENCH_LIMIT:-300} python3 benchmarks/bench_cudnn_sdpa.py --out "$OUT/cudnn_sdpa_h100.json" ${BENCH_ARGS:-} \
  > "$OUT/bench_cudnn_sdpa.log" 2>&1; echo "bench rc=$?" >> "$OUT/bench_cudnn_sdpa.log"
grep -v "^INFO" "$OUT/bench_cudnn_sdpa.log" | tail -60
