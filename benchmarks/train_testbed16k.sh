#!/usr/bin/env bash
# Train the 16,384-token test bed (`wan16k`) on the GPU in resumable calls; results → $OUT.
# Here first (CPU): .venv/bin/python -m ditbake.exporter.testbed.train embed --out out/testbed
#                   mkdir -p .carry/testbed && cp out/testbed/embeds_video.safetensors .carry/testbed/
# Call 1 (carry .whl .carry):      STAGE=1 bash benchmarks/train_testbed16k.sh
#   a low-resolution stage (16×32×32 = 4,096 tokens, cheap) then the full size (16×64×64) from it.
# Call k>1 (carry .whl .carry, with the previous $OUT/testbed-wan16k copied to .carry/init, or INIT=<dir>
#   to continue from a bed already in the tree, e.g. INIT=artifacts/testbed-wan16k):
#                                  STAGE=2 bash benchmarks/train_testbed16k.sh
# Each call ends by generating every held-out caption (clips.safetensors, samples.png) so the bed can
# be judged here (`python -m ditbake.exporter.testbed.adherence`) before deciding on another call.
set -uo pipefail
source benchmarks/gpu_env.sh
OUT=${OUT:-out/testbed16k-train}; mkdir -p "$OUT"
STAGE=${STAGE:-1}; COMPILE=${COMPILE:---compile}; LOW_MINUTES=${LOW_MINUTES:-5.5}; FULL_MINUTES=${FULL_MINUTES:-2.5}
EMB=.carry/testbed; W=/tmp/wan16k; mkdir -p $W
fit() { python3 -m ditbake.exporter.testbed.train fit --model wan16k --embeds $EMB "$@"; }
# call 1 starts from scratch; later calls from the bed the previous call returned
if [ "$STAGE" = 1 ]; then init=(); low_lr=5e-4; else init=(--init "${INIT:-.carry/init}"); low_lr=${LOW_LR:-4e-4}; fi
if [ "$LOW_MINUTES" != 0 ]; then
  fit --out $W/low "${init[@]}" --clip 16x32x32 --minutes "$LOW_MINUTES" --batch-size 64 --lr $low_lr \
    --seed "$STAGE" --warmup-steps 100 $COMPILE >> "$OUT/train.log" 2>&1 || { tail -30 "$OUT/train.log"; exit 1; }
  cp $W/low/history.json "$OUT/history_low$STAGE.json"
  init=(--init $W/low)
fi
seed=$((STAGE + 100)); lr=${FULL_LR:-3e-4}
fit --out $W/full "${init[@]}" --minutes "$FULL_MINUTES" --batch-size 16 --lr $lr --seed $seed --warmup-steps 100 \
  --eval-every 200 $COMPILE >> "$OUT/train.log" 2>&1 || { tail -30 "$OUT/train.log"; exit 1; }
mkdir -p "$OUT/testbed-wan16k" && cp $W/full/{config.json,diffusion_pytorch_model.safetensors,testbed.json,history.json} "$OUT/testbed-wan16k/"
python3 -m ditbake.exporter.testbed.generate --model-dir $W/full --embeds $EMB --split held_out \
  --out "$OUT/clips.safetensors" --grid "$OUT/samples.png" --batch 12 >> "$OUT/train.log" 2>&1
grep -E "steps in|wrote" "$OUT/train.log"; nvidia-smi --query-gpu=name,memory.used --format=csv
