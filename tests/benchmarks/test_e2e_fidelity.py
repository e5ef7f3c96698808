"""benchmarks/e2e_fidelity.py (the peers' test-bed fidelity for the end-to-end race) end to end on the
CPU at a reduced shape of the 16k bed (2 frames of 16×16 px = 128 tokens, 4 steps, one held-out
caption, one seed), the knob pick e2e.py times, and the FP8 linears it applies (torchao)."""
import json
import math
import random
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "benchmarks"))  # the scripts import their siblings as top-level modules
BED16K = ROOT / "artifacts" / "testbed-wan16k"

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _cache(path: Path, spec) -> None:
    """A caption cache as prompt_cache.py writes it (seeded random rows): the held-out caption scored,
    the training caption MagCache calibrates on, the empty negative prompt."""
    import prompt_cache

    gen = torch.Generator().manual_seed(5)
    captions = prompt_cache.held_out_captions(spec, 1) + prompt_cache.train_captions(spec.kind, spec.held_out_rule, 1) + [""]
    prompt_cache.save(path, {c: torch.randn(prompt_cache.TEXT_LEN, 384, generator=gen) for c in captions})


def test_smoke_sweep_against_the_uncompressed_output(tmp_path):
    pytest.importorskip("torchao")
    if not (BED16K / "testbed.json").is_file():
        pytest.skip("artifacts/testbed-wan16k is not present")
    import e2e_fidelity
    from ditbake.exporter.testbed.models import data_spec_of

    _cache(tmp_path / "embeds.safetensors", data_spec_of(BED16K))
    out = tmp_path / "ef.json"
    assert e2e_fidelity.main(["--model", str(BED16K), "--embeds", str(tmp_path / "embeds.safetensors"), "--frames", "2",
                              "--size", "16", "--steps", "4", "--prompts", "1", "--seeds", "1234", "--fbc", "0,1000",
                              "--mag", "0.25", "--taylor", "", "--out", str(out)]) == 0
    r = json.loads(out.read_text())
    assert r["complete"] and not r["not_run"] and r["provenance"]["commit"] and r["held_out_rule"] == "v2"
    assert r["latent_shape"] == [3, 2, 16, 16] and r["tokens"] == 128 and r["steps"] == 4
    assert r["fp8"]["available"] and "bypassed" in r["fp8"]["numerics"]  # the CPU path says what it is
    rows = r["rows"]
    names = ["no cache, fp8 linears"] + [f"{f}, {lin} linears" for lin in ("fp8", "bf16")
                                         for f in ("FirstBlockCache(0.0)", "MagCache(0.25)", "FirstBlockCache(1000.0)")]
    assert list(rows) == names  # FP8 first, gentle knobs first, families in turn
    assert all("error" not in row for row in rows.values()), rows
    # MagCache calibrated once per linear format, one ratio per step, on the model as deployed
    assert {k: len(v) for k, v in r["mag_ratios"].items()} == {"fp8": 4, "bf16": 4}
    assert r["mag_ratios"]["fp8"] != r["mag_ratios"]["bf16"]
    for lin in ("fp8", "bf16"):
        never, always = rows[f"FirstBlockCache(0.0), {lin} linears"], rows[f"FirstBlockCache(1000.0), {lin} linears"]
        assert never["skip_fraction"] == 0 and always["skip_fraction"] > 0.3  # all but block 0 after step 0
        assert always["skip_fraction"] >= never["skip_fraction"] and always["psnr_db"] < never["psnr_db"]
        assert rows[f"MagCache(0.25), {lin} linears"]["skip_fraction"] > 0
    # a hook that never skips reproduces the reference exactly (capped at 99 dB): the harness is
    # deterministic and only the hook's skips and the linears' format move the numbers
    assert rows["FirstBlockCache(0.0), bf16 linears"]["psnr_db"] == 99.0
    assert rows["FirstBlockCache(0.0), bf16 linears"]["ssim"] == pytest.approx(1.0)
    fp8 = rows["no cache, fp8 linears"]
    # E4M3 (3 mantissa bits) on every block linear: clearly not bf16, far from noise (measured ≈ 28 dB here)
    assert 18 < fp8["psnr_db"] < 50 and 0.5 < fp8["ssim"] < 1 and fp8["temporal_error"] > 0
    assert rows["FirstBlockCache(0.0), fp8 linears"]["psnr_db"] == fp8["psnr_db"]
    # the pick e2e.py makes, on these fresh numbers
    lo = e2e_fidelity.pick(r, "FirstBlockCache", 0.0, "bf16")
    hi = e2e_fidelity.pick(r, "FirstBlockCache", 99.0, "bf16")
    none = e2e_fidelity.pick(r, "FirstBlockCache", 120.0, "fp8")
    assert (lo["knob"], lo["reaches_required"]) == (1000.0, True) and (hi["knob"], hi["reaches_required"]) == (0.0, True)
    assert (none["knob"], none["reaches_required"], none["required_psnr_db"]) == (0.0, False, 120.0)
    assert e2e_fidelity.pick(r, "TaylorSeerCache", 0.0) is None


def _reference_pick(points, min_db):
    """The pick spelled differently: sort by (skip desc, PSNR desc) and take the first that reaches."""
    for p in sorted(points, key=lambda p: (-p["skip_fraction"], -p["psnr_db"])):
        if p["psnr_db"] >= min_db:
            return p, True
    return sorted(points, key=lambda p: (-p["psnr_db"], p["skip_fraction"]))[0], False


def test_pick_on_fresh_points(rng_seed):
    import e2e_fidelity

    rnd = random.Random(rng_seed)
    for _ in range(200):
        rows = {}
        for i in range(rnd.randint(1, 8)):
            rows[f"MagCache({i}), fp8 linears"] = {"family": "MagCache", "knob": i, "linears": "fp8",
                                                   "skip_fraction": rnd.choice([0.0, 0.2, 0.4, 0.6]),
                                                   "psnr_db": round(rnd.uniform(15, 45), 1)}
        # noise the pick must ignore: other family, other format, an errored point
        rows["MagCache(9), bf16 linears"] = {"family": "MagCache", "knob": 9, "linears": "bf16", "skip_fraction": 0.9,
                                             "psnr_db": 99.0}
        rows["TaylorSeerCache(2), fp8 linears"] = {"family": "TaylorSeerCache", "knob": 2, "linears": "fp8",
                                                   "skip_fraction": 0.9, "psnr_db": 99.0}
        rows["MagCache(99), fp8 linears"] = {"family": "MagCache", "knob": 99, "linears": "fp8", "error": "boom"}
        points = [r for r in rows.values() if r["family"] == "MagCache" and r["linears"] == "fp8" and "psnr_db" in r]
        min_db = rnd.uniform(10, 50)
        got = e2e_fidelity.pick({"rows": rows}, "MagCache", min_db)
        want, reaches = _reference_pick(points, min_db)
        assert (got["skip_fraction"], got["psnr_db"], got["reaches_required"]) == \
            (want["skip_fraction"], want["psnr_db"], reaches), (rng_seed, min_db, points, got)
        assert got["required_psnr_db"] == min_db and got["name"] in rows
    assert e2e_fidelity.pick({"rows": {}}, "MagCache", 30.0) is None


def test_sweep_order_runs_every_point_once_fp8_first_gentle_first():
    import e2e_fidelity

    sweep = {"FirstBlockCache": (0.01, 0.1, 0.4), "MagCache": (0.005, 0.25), "TaylorSeerCache": (2,)}
    order = e2e_fidelity.sweep_order(sweep, ("fp8", "bf16"))
    assert len(order) == len(set(order)) == 12
    assert [lin for _, _, lin in order] == ["fp8"] * 6 + ["bf16"] * 6
    assert order[:3] == [("FirstBlockCache", 0.01, "fp8"), ("MagCache", 0.005, "fp8"), ("TaylorSeerCache", 2, "fp8")]
    for family, knobs in sweep.items():  # within a family, the sweep's own order (gentle first)
        assert [k for f, k, lin in order if f == family and lin == "bf16"] == list(knobs)


def test_bad_arguments_are_refused(tmp_path):
    import e2e_fidelity

    for argv in (["--seeds", "1,x"], ["--seeds", ","], ["--steps", "0"], ["--fbc", "0.1,a"], ["--taylor", "2.5"],
                 ["--linears", "fp4"]):
        with pytest.raises(SystemExit) as e:
            e2e_fidelity.parse_args([*argv, "--out", str(tmp_path / "x.json")])
        assert e.value.code == 2, argv


def test_fp8_linears_quantize_only_block_linears_row_wise(rng_seed):
    """quantize_blocks against FP8 spelled out: each weight row and each activation row scaled by its
    own amax / 448 (computed in bf16, the tensors' dtype, as torchao does) to E4M3, the product and
    the bias in fp32, rounded to bf16 once; the weight bytes count the FP8 data and the fp32 row
    scales, and a linear outside `blocks` stays bf16."""
    pytest.importorskip("torchao")
    import fp8_linears

    model = torch.nn.Module()
    model.blocks = torch.nn.ModuleList([torch.nn.Linear(64, 96), torch.nn.Linear(96, 32, bias=False)])
    model.head = torch.nn.Linear(32, 16)
    model.to(torch.bfloat16)
    weights = [b.weight.detach().clone() for b in model.blocks]
    bf16_bytes = fp8_linears.weight_bytes(model)
    fp8_linears.quantize_blocks(model, torch.device("cpu"))
    assert type(model.head.weight) is torch.nn.Parameter and model.head.weight.dtype == torch.bfloat16
    assert fp8_linears.weight_bytes(model) == bf16_bytes - sum(w.numel() * 2 for w in weights) + \
        sum(w.numel() + w.shape[0] * 4 for w in weights)

    def e4m3(t):
        scale = (t.abs().amax(-1, keepdim=True) / torch.finfo(torch.float8_e4m3fn).max).float()
        return (t.float() / scale).to(torch.float8_e4m3fn).float() * scale

    for block, weight, features in zip(model.blocks, weights, (64, 96)):
        x = torch.randn(2, 5, features, dtype=torch.bfloat16)
        bias = 0 if block.bias is None else block.bias.float()
        got = block(x)
        # one bf16 ulp: fp32 sums in another order may round the other way
        torch.testing.assert_close(got, (e4m3(x) @ e4m3(weight).T + bias).to(torch.bfloat16), atol=1e-5, rtol=2**-7)
        bf16 = (x.float() @ weight.float().T + bias).to(torch.bfloat16)
        assert (got.float() - bf16.float()).abs().max() > 1e-2  # it is not the bf16 product
