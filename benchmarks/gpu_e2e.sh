#!/usr/bin/env bash
# The end-to-end race on the GPU machine, one device call per phase (each call has a 10-minute limit):
#   benchmarks/gpu_e2e.sh testbed  — test-bed TDC-vs-peers sweeps at 20 and 50 steps (the 50-step one
#                                    gives the peers' schedules and fidelity: tdc_50steps.json)
#   benchmarks/gpu_e2e.sh ditbake  — build + time the ditbake artifact (benchmarks/e2e.py --phase ditbake)
#   benchmarks/gpu_e2e.sh fidelity — the peers' fidelity on the 16k test bed (benchmarks/e2e_fidelity.py:
#                                    cache hooks x bf16 / torchao FP8 linears, 50 steps; ≤ 450 s)
#                                    → $OUT/e2e_fidelity16k.json; commit it as FP8_FIDELITY (below)
#   benchmarks/gpu_e2e.sh peers    — diffusers eager / torch.compile / torch.compile + torchao FP8 / cache
#                                    hooks + torch.compile + torchao FP8 at the FP8_FIDELITY points reaching
#                                    FIDELITY_DB (or the PSNR in FIDELITY_FROM=FILE[:KEY], default the
#                                    shipped plan of combined16k_h100.json); PEER_SOURCE adds the bf16 caches
#   benchmarks/gpu_e2e.sh flux     — the FLUX.1-dev architecture at 2048², every contender in one call
#                                    (benchmarks/e2e_flux.py; eager/compile timed on 10 of 50 steps)
# Needs the wheels in .whl/ (diffusers, torchao) and, per case, the cached prompt embeddings: out/gpu_in/
# (testbed) or .carry/fid16k/embeds.safetensors (fidelity), carried.
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
  fidelity)
    timeout 450 python3 benchmarks/e2e_fidelity.py --device cuda --embeds "${EMBEDS:-.carry/fid16k/embeds.safetensors}" \
      --out "$OUT/e2e_fidelity16k.json" > "$OUT/e2e_fidelity16k.log" 2>&1
    tail -40 "$OUT/e2e_fidelity16k.log" ;;
  peers)
    FP8_FIDELITY=${FP8_FIDELITY:-benchmarks/results/e2e_fidelity16k_h100.json}
    [ -f "$FP8_FIDELITY" ] || { echo "no $FP8_FIDELITY: run '$0 fidelity' first and commit its JSON there" >&2; exit 2; }
    if [ -n "${FIDELITY_DB:-}" ]; then BAR=(--fidelity-db "$FIDELITY_DB")
    else BAR=(--fidelity-from "${FIDELITY_FROM:-benchmarks/results/combined16k_h100.json}"); fi
    timeout 560 python3 benchmarks/e2e.py --phase peers --fp8-fidelity "$FP8_FIDELITY" "${BAR[@]}" \
      ${PEER_SOURCE:+--peer-source "$PEER_SOURCE"} ${ONLY:+--only "$ONLY"} --out "$OUT/e2e_peers.json" \
      > "$OUT/e2e_peers.log" 2>&1
    tail -14 "$OUT/e2e_peers.log" ;;
  flux)
    timeout 560 python3 benchmarks/e2e_flux.py --timed-steps 10 --budget-s 470 --artifact /tmp/e2e_flux_artifact \
      --out "$OUT/e2e_flux.json" > "$OUT/e2e_flux.log" 2>&1
    tail -12 "$OUT/e2e_flux.log" ;;
  *) echo "usage: $0 testbed|ditbake|fidelity|peers|flux" >&2; exit 2 ;;
esac
