#!/usr/bin/env bash
# Issue 18 item 1 in one GPU call (≤ 540 s on an H100): every search on the 16,384-token bed
# (artifacts/testbed-wan16k, 16×64×64 px, held-out rule v2), held-out captions and seeds 1234/777/4242,
# 20 UniPC steps, CFG 5, float32 eager runtime. Four parts run side by side, each under its own
# `timeout` and each writing as it goes (a part cut short keeps its finished points):
#   tdc       benchmarks/tdc_monotone.py: TDC per block / per step at budgets 0.10-0.50 (5 % steps),
#             the pre-fix diagnosis, FirstBlockCache / MagCache / TaylorSeer (two processes: sweep, peers)
#   heads     benchmarks/heads.py: head-wise attention δ sweep (attention FLOPs removed vs PSNR / SSIM)
#   precision benchmarks/precision.py: DMPQ mixed vs uniform W4A4 / W8A8 (INT8)
#   combined  benchmarks/combined.py: skips + precision + heads, scored by the `ditbake eval` harness
# The GPU machine has no text encoder: every caption embedding comes from a cache made here first:
#   .venv/bin/python benchmarks/prompt_cache.py --model artifacts/testbed-wan16k --out .carry/fid16k/embeds.safetensors
# GPU call (carry .whl .carry):  DITBAKE_COMMIT=<sha> bash benchmarks/gpu_fidelity16k.sh
# CPU smoke of every part at a reduced shape (4×16×16 px, 4 steps, one prompt):
#   SMOKE=1 OUT=/tmp/fid16k bash benchmarks/gpu_fidelity16k.sh
# Knobs (env): PARTS (default tdc,heads,precision,combined), LIMIT (s per part, default 470), TDC_PROMPTS,
#   CAL, BUDGETS, DELTAS, H_CAL, H_PROMPTS, P_PROMPTS, BITS, C_PROMPTS, C_SEEDS, COMBOS (see below).
# Banded heads on the GPU run the runtime's chunked fp32 reference (the bed's head dim 32 has no
# Triton kernel), so heads and combined are the slow parts; each JSON is rewritten as points finish.
# $OUT (at most 8 files come back): heads16k.json tdc_monotone16k.json tdc_monotone16k.png precision16k.json
#   dmpq16k.json combined16k.json summary.txt extras.tar.gz (logs, heatmap, scatter, eval strips, part files).
set -uo pipefail
OUT=${OUT:-out/fid16k}; mkdir -p "$OUT"; OUT=$(cd "$OUT" && pwd)
X=$OUT/extra; mkdir -p "$X"; W=${WORK:-/tmp/fid16k-work}; rm -rf "$W"; mkdir -p "$W"
MODEL=artifacts/testbed-wan16k; EMB=${EMBEDS:-.carry/fid16k/embeds.safetensors}
start=$SECONDS
if [ "${SMOKE:-0}" = 1 ]; then  # every part end to end on the CPU at a reduced shape (RoPE is relative)
  export PYTHONPATH=$PWD/benchmarks:${PYTHONPATH:-}
  DEV=cpu; SHAPE=(--frames 4 --size 16); STEPS=4; TDC_PROMPTS=1; CAL=1; BUDGETS=0.20,0.40
  DELTAS=0.1; ABL=""; H_PROMPTS=1; P_PROMPTS=1; BITS=6.5; MAXTOK=64; C_PROMPTS=1; C_SEEDS=1234
  COMBOS=0.25:6.5:0.1,0.25:8:0.1; LIMIT=${LIMIT:-300}; PY=.venv/bin/python; THREADS=1
else
  source benchmarks/gpu_env.sh  # carried diffusers wheel, ditbake importable, NVLink multicast off
  nvidia-smi --query-gpu=name,memory.total --format=csv > "$X/gpu.txt" 2>&1
  DEV=cuda; SHAPE=(); STEPS=20; TDC_PROMPTS=${TDC_PROMPTS:-3}; CAL=${CAL:-4}
  BUDGETS=${BUDGETS:-0.10,0.15,0.20,0.25,0.30,0.35,0.40,0.45,0.50}
  DELTAS=${DELTAS:-0.1,0.2,0.4,0.05}; ABL=${ABL:-}; H_PROMPTS=${H_PROMPTS:-3}; P_PROMPTS=${P_PROMPTS:-3}
  BITS=${BITS:-6.5,5.5}; MAXTOK=512; C_PROMPTS=${C_PROMPTS:-3}; C_SEEDS=${C_SEEDS:-1234,777}
  COMBOS=${COMBOS:-0.3:6.5:0.1,0.2:8:0.1}; LIMIT=${LIMIT:-470}; PY=python3; THREADS=4
fi
[ -f "$EMB" ] || { echo "no caption-embedding cache $EMB: run benchmarks/prompt_cache.py here first" >&2; exit 2; }
export OMP_NUM_THREADS=$THREADS
# plots need matplotlib; without it the JSONs still come (heads and tdc plot after writing theirs)
SCATTER="$X/precision_scatter16k.png"; $PY -c "import matplotlib" 2>/dev/null || SCATTER=""
SEEDS=1234,777,4242
part() {  # name, command...: one timed part, its log in extra/, its time in summary.txt
  local name=$1; shift; local t=$SECONDS
  timeout "$LIMIT" "$@" > "$X/$name.log" 2>&1; local rc=$?
  echo "$name: rc $rc, $((SECONDS - t)) s" >> "$X/times.txt"
}
TDC=(--device $DEV --model $MODEL "${SHAPE[@]}" --steps $STEPS --prompts $TDC_PROMPTS --prompt-set spec
     --held-out-rule v2 --calib-prompts $CAL --budgets $BUDGETS --embeds $EMB --threads $THREADS --cache "$W/tdc"
     --out "$OUT/tdc_monotone16k.json" --plot "$OUT/tdc_monotone16k.png")
PARTS=,${PARTS:-tdc,heads,precision,combined},  # a second call may run fewer: PARTS=heads,combined
on() { [[ $PARTS == *",$1,"* ]]; }
on tdc && part tdc_sweep $PY benchmarks/tdc_monotone.py "${TDC[@]}" --parts reference,block,step,diagnose &
on tdc && part tdc_peers $PY benchmarks/tdc_monotone.py "${TDC[@]}" --parts peers --tag _peers &
on heads && part heads $PY benchmarks/heads.py --models wan16k --deltas $DELTAS --ablation-deltas "$ABL" --steps $STEPS \
  --calibration-prompts ${H_CAL:-$((CAL < 2 ? CAL : 2))} --eval-prompts $H_PROMPTS --seeds $SEEDS --device $DEV "${SHAPE[@]}" \
  --embeds $EMB --results "$W/heads" --partial "$X/heads_partial.json" --out "$W/built" &
on precision && part precision $PY benchmarks/precision.py --model $MODEL --device $DEV "${SHAPE[@]}" --steps $STEPS \
  --calib-prompts $((CAL < 2 ? CAL : 2)) --eval-prompts $P_PROMPTS --seeds $SEEDS --max-tokens $MAXTOK --budgets $BITS \
  --headline-bits ${BITS%%,*} --no-measured --embeds $EMB --out "$OUT/precision16k.json" --dmpq-out "$OUT/dmpq16k.json" \
  --scatter "$SCATTER" &
on combined && part combined $PY benchmarks/combined.py --model $MODEL --device $DEV "${SHAPE[@]}" --steps $STEPS \
  --calib-prompts $((CAL < 2 ? CAL : 2)) --max-tokens $MAXTOK --prompts $C_PROMPTS --seeds $C_SEEDS --combos $COMBOS \
  --embeds $EMB --out "$OUT/combined16k.json" --eval-dir "$X/combined_eval" &
wait
on tdc && LIMIT=60 part tdc_report $PY benchmarks/tdc_monotone.py "${TDC[@]}" --parts report
[ -f "$W/heads/heads.json" ] && cp "$W/heads/heads.json" "$OUT/heads16k.json"
[ -f "$W/heads/heads_heatmap.png" ] && cp "$W/heads/heads_heatmap.png" "$X/heads_heatmap16k.png"
cp "$W"/tdc/*.json "$X/" 2>/dev/null
{ echo "gpu_fidelity16k ($DEV, ${SMOKE:+smoke, }$((SECONDS - start)) s in all)"; cat "$X/times.txt"
  for f in heads precision combined tdc_report; do [ -f "$X/$f.log" ] || continue; echo "--- $f"; grep -vE "INFO|WARNING|Triton|^\s*$" "$X/$f.log" | tail -16; done
} > "$OUT/summary.txt"
tar -czf "$OUT/extras.tar.gz" -C "$OUT" extra && rm -rf "$X"
cat "$OUT/summary.txt"
