#!/usr/bin/env bash
# cuDNN band attention (plugins/attention_cudnn.py) on the GPU machine, in one device call (< 10 min):
# the GPU tests, then the benchmark. Carry the frontend wheel in .whl/ (gpu_env.sh installs every
# .whl/*.whl into /tmp/site with --no-deps: the frontend without CuTe DSL runs cuDNN's own engines,
# the cuDNN torch ships). Everything lands in $OUT.
#   carry: .whl/nvidia_cudnn_frontend-1.32.0-cp312-cp312-manylinux_2_27_x86_64.manylinux_2_28_x86_64.whl
set -uo pipefail
OUT=${OUT:-out/gpu}; mkdir -p "$OUT"
source benchmarks/gpu_env.sh  # carried wheels, ditbake importable, NVLink multicast off
nvidia-smi --query-gpu=name,clocks.sm,clocks.max.sm --format=csv > "$OUT/gpu.txt" 2>&1
python3 -c "import torch, cudnn; print('frontend', cudnn.__version__, '| torch', torch.__version__, '| cudnn (torch)', torch.backends.cudnn.version(), '| cudnn (frontend)', cudnn.backend_version())" \
  > "$OUT/cudnn_env.txt" 2>&1
timeout 300 python3 -m pytest -q -m gpu -p no:cacheprovider tests/plugins/test_attention_cudnn.py \
  > "$OUT/test_attention_cudnn_gpu.log" 2>&1
echo "tests rc=$?" >> "$OUT/test_attention_cudnn_gpu.log"
timeout 240 python3 benchmarks/bench_attention_cudnn.py --out "$OUT/attention_cudnn_h100.json" \
  > "$OUT/bench_attention_cudnn.log" 2>&1
echo "bench rc=$?" >> "$OUT/bench_attention_cudnn.log"
cat "$OUT/cudnn_env.txt"; tail -15 "$OUT/test_attention_cudnn_gpu.log"; tail -40 "$OUT/bench_attention_cudnn.log"
