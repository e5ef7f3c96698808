#!/usr/bin/env bash
# Calibration on the GPU machine in one device call (10-minute limit): the calibration GPU tests
# (cuda vs cpu statistics, kernel vs chunked candidates, one Wan2.1-1.3B-size search layer's memory),
# then benchmarks/calibrate_speed.py on the Wan2.1-1.3B architecture (3 steps × 4 prompts, CFG,
# extrapolated to 50 steps); `testbed` (a separate call) times artifacts/testbed-wan at its native
# shape. Results and logs → $OUT.    benchmarks/gpu_calibrate.sh [all|tests|speed|testbed|testbed16k]
# Needs the diffusers wheel in .whl/ when the image lacks diffusers (as benchmarks/gpu_e2e.sh).
set -uo pipefail
OUT=${OUT:-out/gpu}; mkdir -p "$OUT"
source benchmarks/gpu_env.sh  # carried wheels, ditbake importable, NVLink multicast off
nvidia-smi --query-gpu=name,memory.total --format=csv > "$OUT/gpu.txt" 2>&1
python3 -c "import diffusers, scipy, tqdm, safetensors; print('deps ok')" > "$OUT/deps.txt" 2>&1
case "${1:-all}" in
  tests|all)
    timeout 150 python3 -m pytest -q -ra -m gpu tests/exporter/test_calibrate_gpu.py > "$OUT/test_calibrate_gpu.log" 2>&1
    tail -4 "$OUT/test_calibrate_gpu.log" ;;&
  speed|all)
    timeout 360 python3 benchmarks/calibrate_speed.py --steps ${STEPS:-3} --prompts ${PROMPTS:-4} \
      --out "$OUT/calibrate_speed_h100.json" > "$OUT/calibrate_speed.log" 2>&1
    grep calibrate_speed "$OUT/calibrate_speed.log" | tail -9 ;;&
  testbed)
    timeout 300 python3 benchmarks/calibrate_speed.py --testbed --steps 20 --target-steps 50 --prompts 4 \
      --out "$OUT/calibrate_speed_testbed_h100.json" > "$OUT/calibrate_speed_testbed.log" 2>&1
    grep calibrate_speed "$OUT/calibrate_speed_testbed.log" | tail -9 ;;
  testbed16k)  # the 16,384-token bed at its native 16×64×64 (issue: the same 20-minute goal for it)
    timeout 420 python3 benchmarks/calibrate_speed.py --testbed artifacts/testbed-wan16k --steps 10 --target-steps 50 \
      --prompts 4 --out "$OUT/calibrate_speed_testbed16k_h100.json" > "$OUT/calibrate_speed_testbed16k.log" 2>&1
    grep calibrate_speed "$OUT/calibrate_speed_testbed16k.log" | tail -9 ;;
  tests|speed|all) ;;
  *) echo "usage: $0 [all|tests|speed|testbed|testbed16k]" >&2; exit 2 ;;
esac
cat "$OUT/deps.txt"
