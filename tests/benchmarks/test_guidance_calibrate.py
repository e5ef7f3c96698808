"""benchmarks/guidance_calibrate.py end to end on the CPU at a reduced shape of the 16k bed (2 frames of
16×16 px, the 50 %-skip plan cut to 12 steps): the calibration measures every eligible step, the chosen
steps are the cheapest, and the three plans are scored on a held-out caption it never saw."""
import json
import math
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "benchmarks"))
BED16K = ROOT / "artifacts" / "testbed-wan16k"

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_smoke_calibrates_and_scores_on_held_out_captions(tmp_path):
    if not (BED16K / "testbed.json").is_file():
        pytest.skip("artifacts/testbed-wan16k is not present")
    import guidance_calibrate
    import prompt_cache
    from ditbake.exporter.testbed.models import data_spec_of

    spec = data_spec_of(BED16K)
    gen = torch.Generator().manual_seed(5)
    calib = prompt_cache.train_captions(spec.kind, spec.held_out_rule, 1)
    held = prompt_cache.held_out_captions(spec, 1)
    assert not set(calib) & set(held)
    prompt_cache.save(tmp_path / "e.safetensors",
                      {c: torch.randn(prompt_cache.TEXT_LEN, 384, generator=gen) for c in calib + held + [""]})
    out = tmp_path / "g.json"
    assert guidance_calibrate.main(["--model", str(BED16K), "--embeds", str(tmp_path / "e.safetensors"),
                                    "--frames", "2", "--size", "16", "--steps-cap", "12", "--count", "2",
                                    "--calib-prompts", "1", "--prompts", "1", "--seeds", "1234",
                                    "--out", str(out)]) == 0
    r = json.loads(out.read_text())
    errors = {int(k): v for k, v in r["step_errors"].items()}
    # the b05 plan's steps 6, 8, 11 compute both branches after the warm-up prefix (7, 9, 10 skip)
    assert sorted(errors) == [6, 8, 11] and all(math.isfinite(e) and e > 0 for e in errors.values())
    assert r["chosen"] == [6, 11]  # two of three without neighbours: the ends
    assert r["calibration_captions"] == calib and r["held_out"]["prompts"] == held
    rows = r["rows"]
    assert list(rows) == ["calibrated", "spread", "no guidance skips"]
    assert rows["calibrated"]["guidance_skips"] == [6, 11] and rows["no guidance skips"]["guidance_skips"] == []
    assert rows["calibrated"]["forward_fraction"] == pytest.approx(rows["no guidance skips"]["forward_fraction"] - 2 / 24)
    for row in rows.values():
        assert "error" not in row and math.isfinite(row["psnr_db"]), row
    saved = json.loads(out.with_suffix(".plan.json").read_text())
    assert saved["uncond_skip"] == "guidance"
