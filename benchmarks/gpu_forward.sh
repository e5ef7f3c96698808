#!/usr/bin/env bash
# Issue 15's GPU work in phases, each within one device call (10-minute limit); results → $OUT.
#   kernels  — GPU tests of the 8-bit kernels, attention_8bit sweep, FP8 linear with fused quantization
#   wan      — forward race, Wan2.1-1.3B at 32,760 tokens (eager + aoti rows)
#   flux     — forward race, Flux at 2048² (eager rows; BACKENDS=aoti ONLY=... NO_BF16=1 for aoti rows)
#   linears  — FP8 / FP8 fast-accum / INT8 linears fused with their producer, INT8 tile sweep
#   cutlass  — build the CUTLASS INT8 GEMM (nvidia-cutlass wheel in .whl/), its GPU tests, the GEMM bench;
#              the library lands in $OUT/ext: carry it as DITBAKE_EXT_DIR to skip the build next call
#   wan-eager-fidelity — wan with BACKENDS=eager (a8, b8, c8; LIMIT 330 s), then fidelity: with `wan`
#              BACKENDS=aoti in another call, the whole of issue 15's Wan acceptance in two calls
#   fidelity — the race's configurations on the 16k video test bed (PSNR / SSIM vs its bf16 output,
#              3 held-out v2 captions × 2 seeds, 20 steps, CFG 5, eager), ≤ 240 s; needs the caption
#              cache carried: .carry/fid16k/embeds.safetensors (benchmarks/prompt_cache.py makes it)
set -uo pipefail
OUT=${OUT:-out/gpu}; mkdir -p "$OUT"
source benchmarks/gpu_env.sh
nvidia-smi --query-gpu=name,clocks.sm,clocks.max.sm --format=csv > "$OUT/gpu.txt" 2>&1
case "${1:-}" in
  kernels)
    timeout 150 python3 -m pytest -q -ra -m gpu tests/plugins/test_attention_8bit.py tests/plugins/test_linear_fp8.py \
      > "$OUT/test_gpu.log" 2>&1; tail -15 "$OUT/test_gpu.log"
    timeout 240 python3 benchmarks/bench_attention_8bit.py --out "$OUT/attention_8bit_h100.json" > "$OUT/attn8.log" 2>&1
    tail -30 "$OUT/attn8.log"
    timeout 120 python3 benchmarks/bench_linear_fp8.py --out "$OUT/linear_fp8_h100.json" > "$OUT/linfp8.log" 2>&1
    tail -8 "$OUT/linfp8.log" ;;
  wan)  # BACKENDS=aoti / eager splits the race over two calls when both do not fit one
    timeout ${LIMIT:-570} python3 benchmarks/forward_race.py --model wan --backends "${BACKENDS:-eager,aoti}" \
      ${ONLY:+--only "$ONLY"} ${NO_BF16:+--no-bf16-row} ${PROFILE:+--profile} --out "$OUT/forward_race_wan${TAG:-}_h100.json" \
      > "$OUT/race_wan.log" 2>&1; grep -v "^INFO\|^W1\|already exists" "$OUT/race_wan.log" | tail -24 ;;
  flux)
    timeout ${LIMIT:-570} python3 benchmarks/forward_race.py --model flux --backends "${BACKENDS:-eager}" \
      ${ONLY:+--only "$ONLY"} ${NO_BF16:+--no-bf16-row} ${PROFILE:+--profile} --out "$OUT/forward_race_flux${TAG:-}_h100.json" \
      > "$OUT/race_flux.log" 2>&1; tail -14 "$OUT/race_flux.log" ;;
  fidelity)
    EMB=${EMBEDS:-.carry/fid16k/embeds.safetensors}
    [ -f "$EMB" ] || { echo "no caption-embedding cache $EMB: run benchmarks/prompt_cache.py first, carry .carry" >&2; exit 2; }
    timeout 240 python3 benchmarks/forward_fidelity.py --model artifacts/testbed-wan16k --device cuda --embeds "$EMB" \
      --prompts ${F_PROMPTS:-3} --seeds ${F_SEEDS:-1234,777} --out "$OUT/forward_fidelity16k_h100.json" \
      > "$OUT/fidelity16k.log" 2>&1; echo "rc $?"; tail -14 "$OUT/fidelity16k.log" ;;
  linears)  # FP8 / FP8 fast-accum / INT8 linears with their producer, INT8 GEMM tile sweep, GPU tests
    timeout 150 python3 -m pytest -q -ra -m gpu tests/plugins/test_linear_int8.py tests/plugins/test_linear_fp8.py \
      tests/plugins/test_linear_8bit.py > "$OUT/test_gpu_linears.log" 2>&1; tail -6 "$OUT/test_gpu_linears.log"
    timeout 200 python3 benchmarks/bench_linear_fp8.py --out "$OUT/linear_8bit_fused.json" > "$OUT/lin8.log" 2>&1
    grep -v "^W1\|^INFO" "$OUT/lin8.log" | tail -8 ;;
  cutlass)
    mkdir -p "$OUT/ext"
    ( time timeout 300 python3 -c "import logging; logging.basicConfig(level=logging.INFO)
import ditbake.plugins.gemm_w8a8_cutlass as g; ok = g.load_native(); print('cutlass loaded', ok, g.unavailable_reason())" ) \
      > "$OUT/cutlass_build.log" 2>&1; tail -5 "$OUT/cutlass_build.log"
    cp "$DITBAKE_EXT_DIR"/ditbake_gemm_w8a8_cutlass-*.so "$OUT/ext/" 2>/dev/null
    timeout 200 python3 -m pytest -q -ra -m gpu tests/plugins/test_gemm_w8a8_cutlass.py tests/plugins/test_gemm_8bit_persistent.py \
      > "$OUT/test_gpu_cutlass.log" 2>&1; tail -6 "$OUT/test_gpu_cutlass.log"
    timeout 200 python3 benchmarks/bench_gemm_8bit.py --out "$OUT/gemm_8bit_cutlass.json" > "$OUT/gemm_cutlass.log" 2>&1
    grep -v "^W1" "$OUT/gemm_cutlass.log" | tail -40 ;;
  wan-eager-fidelity)  # the second of issue 15's closing calls: Wan's eager rows, then the 16k-bed fidelity
    LIMIT=${LIMIT:-330} BACKENDS=eager NO_BF16=1 ONLY=${ONLY:-'\((a8|b8|c8)\)'} bash "$0" wan
    bash "$0" fidelity ;;
  *) echo "usage: $0 kernels|wan|flux|fidelity|linears|cutlass|wan-eager-fidelity" >&2; exit 2 ;;
esac
