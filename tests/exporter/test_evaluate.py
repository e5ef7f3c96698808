"""Fidelity harness: the measures on known cases, and end-to-end on tiny artifacts."""
import argparse
import json
import math

import pytest
import torch

from ditbake.exporter import evaluate as ev
from ditbake.exporter.planner import plan_from_calibration
from ditbake.runtime.errors import ArtifactError, InputError
from ditbake.runtime.plan import BlockVariant, Plan
from tests.conftest import build_tiny_artifact


def test_psnr_known_cases():
    x = torch.rand(2, 3, 16, 16)
    assert ev.psnr(x, x) == math.inf
    assert ev.psnr(x, x + 0.1) == pytest.approx(20.0, abs=1e-6)  # MSE 0.01
    with pytest.raises(InputError):
        ev.psnr(x, x[:1])


def test_ssim_known_cases(rng_seed):
    x = torch.rand(2, 3, 32, 32)
    assert ev.ssim(x, x) == pytest.approx(1.0, abs=1e-9)
    # constant images: variances and covariance vanish, so SSIM = (2ab + C1) / (a² + b² + C1)
    a, b, c1 = 0.3, 0.7, 0.01**2
    got = ev.ssim(torch.full((1, 1, 16, 16), a, dtype=torch.float64), torch.full((1, 1, 16, 16), b, dtype=torch.float64))
    assert got == pytest.approx((2 * a * b + c1) / (a * a + b * b + c1), rel=1e-9)
    # more noise, lower SSIM; symmetric
    noisy = [ev.ssim(x, (x + s * torch.randn_like(x)).clamp(0, 1)) for s in (0.02, 0.1, 0.3)]
    assert 1 > noisy[0] > noisy[1] > noisy[2]
    y = (x + 0.1 * torch.randn_like(x)).clamp(0, 1)
    assert ev.ssim(x, y) == pytest.approx(ev.ssim(y, x), rel=1e-12)
    # images smaller than the window shrink it
    assert ev.ssim(x[..., :6, :6], x[..., :6, :6]) == pytest.approx(1.0)
    with pytest.raises(InputError):
        ev.ssim(x[0], x[0])


def test_temporal_measures():
    static = torch.zeros(4, 3, 8, 8)
    moving = static.clone()
    for t in range(4):
        moving[t, :, :, t] = 1.0
    assert ev.flicker_index(static) == 0 and ev.flicker_index(moving) > 0
    assert ev.temporal_error(moving, moving) == 0
    assert ev.temporal_error(moving + 0.2, moving) == pytest.approx(0.0, abs=1e-7)  # offset, same motion
    assert ev.temporal_error(static, moving) == pytest.approx(ev.flicker_index(moving))
    assert ev.temporal_error(static[:1], moving[:1]) == 0.0


def _meta():
    return {"architecture": "wan", "num_blocks": 2, "linear_layers": ["a", "b"], "attention_sites": {"attn1": 2},
            "num_steps": 2, "branches": ["cond", "uncond"]}


def test_average_activation_bits():
    plan = plan_from_calibration(_meta())
    assert ev.average_activation_bits(plan) == 16.0
    d = plan.to_json()
    d["variants"].append(BlockVariant(precisions=(("a", "nvfp4"), ("b", "int8"))).to_json())
    d["variants"].append(BlockVariant(compute=False).to_json())
    d["steps"][1]["cond"] = [1, 2]  # one computed block at (4 + 8) / 2 bits, one skipped
    bits = ev.average_activation_bits(Plan.from_json(d))
    assert bits == pytest.approx((16 * 2 * 6 + 4 + 8) / (2 * 7))
    baseline = ev.baseline_plan(Plan.from_json(d))
    assert ev.average_activation_bits(baseline) == 16.0 and baseline.skip_fraction() == 0


def _skip_plan(meta):
    plan = plan_from_calibration(meta).to_json()
    plan["variants"].append(BlockVariant(compute=False).to_json())
    plan["steps"][2]["cond"] = [0, 1, 0]
    return Plan.from_json(plan)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval")
    full, _ = build_tiny_artifact(root / "full", "tiny-wan", steps=3)
    skip, _ = build_tiny_artifact(root / "skip", "tiny-wan", steps=3, plan_fn=_skip_plan)
    return full, skip


def test_identical_artifacts_score_perfectly(tiny, tmp_path):
    full, _ = tiny
    result = ev.evaluate(full, None, num_prompts=2, seeds=(0,), out=tmp_path, progress=False, random_embeddings=True)
    assert len(result.samples) == 2
    assert all(s.psnr == math.inf and s.ssim == pytest.approx(1.0) and s.temporal_error == 0 for s in result.samples)
    assert result.skip_fraction == 0 and result.avg_activation_bits == 16.0
    saved = json.loads((tmp_path / "eval.json").read_text())
    assert saved["summary"]["psnr"] == "inf" and (tmp_path / "strip.png").stat().st_size > 0
    assert "mean" in result.table()
    same = ev.evaluate(full, full, prompts=["a red circle"], seeds=(3,), progress=False, random_embeddings=True)
    assert same.samples[0].psnr == math.inf


def test_skipping_artifact_scores_lower(tiny):
    full, skip = tiny
    for reference in (None, full):  # baseline plan in place, or the baseline artifact
        result = ev.evaluate(skip, reference, num_prompts=1, seeds=(0, 1), progress=False, random_embeddings=True)
        assert result.skip_fraction == pytest.approx(1 / 18)
        assert all(math.isfinite(s.psnr) and s.ssim < 1 for s in result.samples)


def test_bad_inputs(tiny, tmp_path):
    full, _ = tiny
    other, _ = build_tiny_artifact(tmp_path / "other", "tiny-wan", steps=3, latent=(4, 3, 16, 16))
    with pytest.raises(ev.EvaluationError, match="different shapes"):
        ev.evaluate(full, other, num_prompts=1, progress=False, random_embeddings=True)
    # a model without a text encoder is not scored on random embeddings unless asked
    with pytest.raises(InputError, match="no text encoder"):
        ev.evaluate(full, None, num_prompts=1, progress=False)
    with pytest.raises(ArtifactError):
        ev.evaluate(tmp_path / "missing", None, progress=False)
    with pytest.raises(InputError):
        ev.evaluate(full, None, num_prompts=0, progress=False)
    with pytest.raises(InputError):
        ev.evaluate(full, None, seeds=(), progress=False)


def test_eval_subcommand_registers():
    parser = argparse.ArgumentParser()
    ev.add_eval_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["eval", "art", "--reference", "ref", "--out", "o", "--num-prompts", "3", "--seed", "7"])
    assert (args.artifact, args.reference, args.out, args.num_prompts, args.seed) == ("art", "ref", "o", 3, 7)
    assert args.func is ev.cmd_eval


def _quant_plan(meta):
    """Every linear at W4A4 (NVFP4 weights only, no 16-bit copy) but the last at W8A8 INT8 (INT8 weights
    only); block 0's first linear with the Hadamard folded in."""
    plan = plan_from_calibration(meta).to_json()
    layers = meta["linear_layers"]
    plan["variants"] = [BlockVariant(precisions=tuple((name, "int8" if name == layers[-1] else "nvfp4")
                                                      for name in layers)).to_json()]
    plan["predicted"] = {"precision": {"hadamard": [[0, layers[0]]]}}
    return Plan.from_json(plan)


def test_quantized_artifact_without_reference(tmp_path):
    """The baseline reference of an NVFP4-only artifact runs dequantized weights (was a KeyError)."""
    import ditbake.runtime as dr
    from ditbake.plugins.hadamard import apply_hadamard
    from ditbake.plugins.nvfp4 import NVFP4Tensor, dequantize_nvfp4

    quant, adapter = build_tiny_artifact(tmp_path, "tiny-wan", steps=2, plan_fn=_quant_plan)
    session = dr.load(quant)
    layer = "blocks.0." + adapter.linear_layers[0]
    assert layer + ".weight" not in session.weights and layer + ".nvfp4_hadamard" in session.weights
    assert ev.dequantize_missing_weights(session, ev.baseline_plan(session.plan)) == len(
        [k for k in session.weights if k.endswith((".nvfp4_packed", ".int8_weight"))])
    int8 = "blocks.0." + adapter.linear_layers[-1]
    torch.testing.assert_close(session.weights[int8 + ".weight"], session.weights[int8 + ".int8_weight"].float()
                               * session.weights[int8 + ".int8_scale"][:, None])
    w = session.weights
    x = torch.randn(5, w[layer + ".weight"].shape[1])
    packed = w[layer + ".nvfp4_packed"]
    folded = dequantize_nvfp4(NVFP4Tensor(packed, w[layer + ".nvfp4_block_scales"], w[layer + ".nvfp4_global_scale"],
                                          torch.Size((packed.shape[0], packed.shape[1] * 2))))
    expected = apply_hadamard(x) @ folded.T  # what the W4A16 path computes, in fp32
    got = torch.nn.functional.linear(x, w[layer + ".weight"])
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)  # fp32 matmuls on both sides
    result = ev.evaluate(quant, None, num_prompts=1, seeds=(0,), progress=False, random_embeddings=True)
    assert "dequantized" in result.reference and math.isfinite(result.samples[0].psnr)
    layers = len(adapter.linear_layers)
    assert result.avg_activation_bits == (4.0 * (layers - 1) + 8.0) / layers


def test_demo_summary_and_videos(tiny, tmp_path):
    """The demo's report reads the plan and eval.json: skipped block computations, FLOPs, bits, bytes."""
    from ditbake.exporter import demo

    _, skip = tiny
    result = ev.evaluate(skip, None, num_prompts=1, seeds=(0,), out=tmp_path, progress=False, random_embeddings=True)
    text = demo.summary(skip, tmp_path / "eval.json")
    assert "skipped blocks   1 of 18 block computations" in text and "attention FLOPs  100 %" in text
    assert "activation bits  16.0" in text and f"PSNR {result.samples[0].psnr:.1f} dB" in text
    reference, compressed = result.first_frames
    paths = demo.write_videos(reference, compressed, tmp_path, fps=4, min_side=16)
    assert all(p.stat().st_size > 0 for p in paths)


def _whole_step_plan(meta):
    plan = plan_from_calibration(meta).to_json()
    plan["variants"].append(BlockVariant(compute=False).to_json())
    plan["steps"][2]["cond"] = [1, 1, 1]  # a whole step skipped: served from the stack residual
    return Plan.from_json(plan)


def test_baseline_reference_of_a_whole_step_plan(tiny, tmp_path):
    """The in-place baseline must not keep the compressed plan's whole-step skips (it scored inf dB)."""
    full, _ = tiny
    art, _ = build_tiny_artifact(tmp_path, "tiny-wan", steps=3, plan_fn=_whole_step_plan)
    in_place = ev.evaluate(art, None, prompts=["x"], seeds=(0,), progress=False, random_embeddings=True)
    separate = ev.evaluate(art, full, prompts=["x"], seeds=(0,), progress=False, random_embeddings=True)
    assert math.isfinite(in_place.samples[0].psnr) and in_place.skip_fraction == pytest.approx(3 / 18)
    assert in_place.samples[0].psnr == pytest.approx(separate.samples[0].psnr, rel=1e-6)
