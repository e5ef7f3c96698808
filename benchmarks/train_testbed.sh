#!/usr/bin/env bash
# Train both test-bed models in one GPU session (≈ 8 min wall on an H100), results → $OUT.
# Here first (CPU):  .venv/bin/python -m ditbake.exporter.testbed.train embed --out out/testbed
#                    python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#                      --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 -d .whl diffusers==0.42.1 requests
# Then on the GPU machine, carrying .whl and out/testbed:  bash benchmarks/train_testbed.sh
# Copy $OUT/testbed-{wan,sd3}/* into artifacts/testbed-{wan,sd3}/ and run
# `python -m ditbake.exporter.testbed.samples --model {wan,sd3}` here for samples.png, loss.png, timing.json.
set -uo pipefail
OUT=${OUT:-out/testbed-train}; mkdir -p "$OUT"
WAN_MINUTES=${WAN_MINUTES:-4.5}; SD3_MINUTES=${SD3_MINUTES:-2.8}
export PYTHONUNBUFFERED=1
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site
fi
mkdir -p /tmp/ns/ditbake && for p in exporter runtime plugins; do ln -sfn "$PWD/$p" /tmp/ns/ditbake/$p; done
export PYTHONPATH=/tmp/ns:${PYTHONPATH:-}
for m in wan sd3; do
  minutes=$([ $m = wan ] && echo "$WAN_MINUTES" || echo "$SD3_MINUTES")
  batch=$([ $m = wan ] && echo 64 || echo 128)
  python3 -m ditbake.exporter.testbed.train fit --model $m --embeds out/testbed --out "$OUT/testbed-$m" \
    --minutes "$minutes" --batch-size $batch > "$OUT/train_$m.log" 2>&1
  tail -2 "$OUT/train_$m.log"
done
rm -f "$OUT"/*/loss.png  # drawn here from history.json; keeps $OUT under the 8-file limit
