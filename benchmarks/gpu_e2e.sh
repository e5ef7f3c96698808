#!/usr/bin/env bash
# The end-to-end race on the GPU machine, one device call per phase (each call has a 10-minute limit):
#   benchmarks/gpu_e2e.sh testbed  — test-bed TDC-vs-peers sweeps at 20 and 50 steps (the 50-step one
#                                    gives the peers' schedules and fidelity: tdc_50steps.json)
#   benchmarks/gpu_e2e.sh ditbake  — build + time the ditbake artifact (benchmarks/e2e.py --phase ditbake)
#   benchmarks/gpu_e2e.sh peers    — diffusers eager / torch.compile / cache hooks + torch.compile
#   benchmarks/gpu_e2e.sh flux     — the FLUX.1-dev architecture at 2048², every contender in one call
#                                    (benchmarks/e2e_flux.py; eager/compile timed on 10 of 50 steps)
# Needs the diffusers wheel in .whl/ and the cached prompt embeddings in out/gpu_in/ (carried).
set -uo pipefail
OUT=${OUT:-out/gpu}; mkdir -p "$OUT"
source benchmarks/gpu_env.sh  # carried wheels, ditbake importable, NVLink multicast off
nvidia-smi --query-gpu=name,clocks.sm,clocks.max.sm --format=csv > "$OUT/gpu.txt" 2>&1
EMB=out/gpu_in/tdc_embeds_8.pt
case "${1:-}" in
  testbed)
    timeout 200 python3 benchmarks/tdc_peers.py --steps 50 --calib-prompts 8 --eval-prompts 8 --embeds $EMB \
      --budgets 0.2,0.3,0.4,0.5 --granularities block,step --extrapolations none,linear --out "$OUT/tdc_50steps.json" \
      --plot "$OUT/tdc_50steps.png" > "$OUT/tdc_50steps.log" 2>&1
    timeout 120 python3 benchmarks/tdc_peers.py --steps 20 --calib-prompts 8 --eval-prompts 8 --embeds $EMB \
      --granularities block,step --extrapolations none,linear --out "$OUT/tdc.json" --plot "$OUT/tdc.png" > "$OUT/tdc.log" 2>&1
    tail -25 "$OUT/tdc_50steps.log" "$OUT/tdc.log" ;;
  ditbake)
    timeout 560 python3 benchmarks/e2e.py --phase ditbake --artifact /tmp/e2e_artifact --out "$OUT/e2e_ditbake.json" \
      > "$OUT/e2e_ditbake.log" 2>&1
    tail -8 "$OUT/e2e_ditbake.log" ;;
  peers)
    timeout 560 python3 benchmarks/e2e.py --phase peers --peer-source "${PEER_SOURCE:-benchmarks/results/tdc_50steps.json}" \
      --out "$OUT/e2e_peers.json" > "$OUT/e2e_peers.log" 2>&1
    tail -12 "$OUT/e2e_peers.log" ;;
  flux)
    timeout 560 python3 benchmarks/e2e_flux.py --timed-steps 10 --budget-s 470 --artifact /tmp/e2e_flux_artifact \
      --out "$OUT/e2e_flux.json" > "$OUT/e2e_flux.log" 2>&1
    tail -12 "$OUT/e2e_flux.log" ;;
  *) echo "usage: $0 testbed|ditbake|peers|flux" >&2; exit 2 ;;
esac
