"""The aoti backend: AOTInductor engines per block variant, weights as inputs, same results as eager."""
import json
import math
import subprocess
import sys

import pytest
import torch

from ditbake.exporter.planner import plan_from_calibration
from ditbake.runtime import ArtifactError, load
from ditbake.runtime.plan import BlockVariant, Plan

from tests.conftest import build_tiny_artifact


def _mixed_plan(meta):
    """Full blocks, a TDC skip, and a purified-refresh variant: two compiled block engines."""
    plan = plan_from_calibration(meta).to_json()
    plan["variants"].append(BlockVariant(compute=False).to_json())
    plan["variants"].append(plan["variants"][0] | {"purified": True})
    plan["steps"][1]["cond"] = [2, 2, 0]
    plan["steps"][2]["cond"] = [0, 1, 2]
    return Plan.from_json(plan)


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory):
    root = tmp_path_factory.mktemp("aoti")
    aoti, _ = build_tiny_artifact(root / "a", "tiny-wan", steps=3, plan_fn=_mixed_plan, backend="aoti")
    eager, _ = build_tiny_artifact(root / "e", "tiny-wan", steps=3, plan_fn=_mixed_plan)
    return aoti, eager


def test_engines_per_variant_and_match_eager(artifacts):
    aoti, eager = artifacts
    manifest = json.loads((aoti / "manifest.json").read_text())
    parts = sorted((e["part"], e["variant"]) for e in manifest["engines"])
    assert parts == [("block", 0), ("block", 2), ("epilogue", None), ("prologue", None)]  # no engine for skips
    assert all(e["file"] in manifest["files"] and e["built_for"]["device"] == "cpu" for e in manifest["engines"])
    a, e = load(aoti, backend="aoti"), load(eager)
    text = torch.randn(1, a.profile().text_len, 32)
    ra, re_ = a.generate(text, seed=4), e.generate(text, seed=4)
    torch.testing.assert_close(ra.latents, re_.latents, rtol=1e-4, atol=1e-4)
    assert ra.report.block_skips == re_.report.block_skips == 1
    assert ra.report.attention_flops_fraction == re_.report.attention_flops_fraction == 1.0


def _per_block_precision_plan(meta):
    """A per-block precision plan (what DMPQ writes): blocks store different weight formats, and the
    NVFP4 variant folds the Hadamard into block 1's attn1.to_q only, so its blocks need two engines."""
    plan = plan_from_calibration(meta).to_json()
    base = plan["variants"][0]

    def with_precisions(**formats):
        return base | {"precisions": base["precisions"] | {k.replace("__", "."): v for k, v in formats.items()}}

    plan["variants"] += [with_precisions(attn1__to_q="nvfp4", ffn__net__2="nvfp4"), with_precisions(attn1__to_q="int8")]
    schedule = [[1, 1, 0], [2, 1, 2], [0, 2, 0]]  # variant per block at steps 0, 1, 2
    for step, ids in zip(plan["steps"], schedule):
        for branch in step:
            step[branch] = ids
    plan["predicted"]["precision"] = {"hadamard": [[1, "attn1.to_q"]]}
    return Plan.from_json(plan)


@pytest.mark.slow
def test_per_block_precision_plans_compile_into_engine_groups(tmp_path):
    """Blocks of one kind that store different formats share each variant's engine where the weights
    it reads agree and get an engine group each where they do not; results equal eager."""
    aoti, _ = build_tiny_artifact(tmp_path / "a", "tiny-wan", steps=3, plan_fn=_per_block_precision_plan,
                                  backend="aoti")
    eager, _ = build_tiny_artifact(tmp_path / "e", "tiny-wan", steps=3, plan_fn=_per_block_precision_plan)
    blocks = {e["key"]: e for e in json.loads((aoti / "manifest.json").read_text())["engines"] if e["part"] == "block"}
    served = {(e["variant"], tuple(e["blocks"])) for e in blocks.values()}
    assert served == {(0, (0, 2)), (1, (0,)), (1, (1,)), (2, (0, 1, 2))}
    nvfp4 = [e for e in blocks.values() if e["variant"] == 1]
    assert sorted(e["key"].split("-")[2] for e in nvfp4) == ["g0", "g1"]
    marker = "block.attn1.to_q.nvfp4_hadamard"
    assert [marker in e["inputs"] for e in sorted(nvfp4, key=lambda e: e["blocks"])] == [False, True]
    int8 = next(e for e in blocks.values() if e["variant"] == 2)  # reads the 8-bit weight, not NVFP4 / 16-bit
    assert "block.attn1.to_q.int8_weight" in int8["inputs"] and "block.attn1.to_q.weight" not in int8["inputs"]
    assert not any(".nvfp4_" in n for n in int8["inputs"])
    a, e = load(aoti, backend="aoti"), load(eager)
    text = torch.randn(1, a.profile().text_len, 32)
    torch.testing.assert_close(a.generate(text, seed=5).latents, e.generate(text, seed=5).latents,
                               rtol=1e-4, atol=1e-4)
    # eval's baseline reference (all bf16: variant 0 everywhere, which block 1 never runs here) runs
    # eagerly on a compiled artifact, so both artifacts measure the same fidelity
    from ditbake.exporter import evaluate as ev

    scores = [ev.evaluate(path, None, prompts=["x"], seeds=(0,), progress=False, random_embeddings=True).samples[0]
              for path in (aoti, eager)]
    assert scores[0].psnr == pytest.approx(scores[1].psnr, abs=0.05) and math.isfinite(scores[0].psnr)


def test_tampered_engine_refused(artifacts, tmp_path):
    import shutil
    aoti, _ = artifacts
    dst = tmp_path / "t"
    shutil.copytree(aoti, dst)
    engine = next((dst / "engines").iterdir())
    data = bytearray(engine.read_bytes())
    data[len(data) // 2] ^= 0xFF
    engine.write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match="sha256 mismatch for engines/"):
        load(dst, backend="aoti")


def _head_plan(heads, steps=2):
    def head_plan(meta):
        plan = plan_from_calibration(meta).to_json()
        plan["variants"].append(plan["variants"][0] | {"heads": {"attn1": heads}})
        for step in plan["steps"][1:]:
            step["cond"] = [1, 0, 1]
        return Plan.from_json(plan)
    return head_plan


def _eight_bit_plan(site, *variant_heads):
    """One variant per entry of ``variant_heads`` (a head list for ``site``), taken in turn per step."""
    def plan_fn(meta):
        plan = plan_from_calibration(meta).to_json()
        base = plan["variants"][0]
        plan["variants"] = [base | {"heads": {site: heads}} for heads in variant_heads]
        for i, step in enumerate(plan["steps"]):
            for branch in step:
                step[branch] = [i % len(variant_heads)] * len(step[branch])
        return Plan.from_json(plan)
    return plan_fn


EIGHT_BIT = {  # full INT8 (Flux: text first in its joint sequence), arrow INT8 beside full FP8, and (Wan) a
    # bf16 arrow head beside a full one: the head-wise op's reference in the same engines (one build for all)
    "tiny-wan": _eight_bit_plan("attn1", [["full", 0, 0, "int8"]] * 2,
                                [["arrow", 2, 2, "int8"], ["full", 0, 0, "fp8"]],
                                [["arrow", 2, 2], ["full", 0, 0]]),
    "tiny-flux-pooled": _eight_bit_plan("attn", [["full", 0, 0, "int8"]] * 2),
}


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(EIGHT_BIT))
def test_eight_bit_heads_compile_on_cpu_and_match_eager(name, tmp_path):
    """8-bit heads in a CPU engine compute the reference eager runs (they used to return uninitialized
    memory: Inductor inlined the Triton op's CUDA body). Tolerance: Inductor's fused projections give
    q, k, v within fp32 rounding of eager's, and a rounding step can move one INT8/FP8 code (an input
    change of 2e-7 moves the reference's output by up to 2e-3, relative); measured 5e-4 (Wan) and
    1.2e-3 (Flux) on the latents, against the formats' own ~4% error and NaN/O(1) for garbage."""
    guidance = {} if name == "tiny-wan" else {"guidance": False}
    aoti, _ = build_tiny_artifact(tmp_path / "a", name, steps=3, plan_fn=EIGHT_BIT[name], backend="aoti", **guidance)
    eager, _ = build_tiny_artifact(tmp_path / "e", name, steps=3, plan_fn=EIGHT_BIT[name], **guidance)
    called = set()  # the engines call the reference ops, not a CUDA body
    for entry in json.loads((aoti / "manifest.json").read_text())["engines"]:
        if entry["part"] == "block":
            data = (aoti / entry["file"]).read_bytes()
            called |= {op for op in (b"attention_8bit_reference", b"head_attention_reference") if op in data}
    assert called == ({b"attention_8bit_reference", b"head_attention_reference"} if name == "tiny-wan"
                      else {b"attention_8bit_reference"})
    a, e = load(aoti, backend="aoti"), load(eager)
    text = torch.randn(1, a.profile().text_len, 32)
    extra = {}
    if name != "tiny-wan":
        from ditbake.exporter import models

        extra = {"pooled_embeds": torch.randn(1, models.TINY_CONFIGS[name]["pooled_projection_dim"]), "guidance": 2.5}
    ra, re_ = a.generate(text, seed=7, **extra), e.generate(text, seed=7, **extra)
    assert ra.latents.isfinite().all()
    assert ((ra.latents - re_.latents).norm() / re_.latents.norm()).item() < 1e-2
    assert ra.report.attention_flops_fraction == re_.report.attention_flops_fraction
    if name == "tiny-wan":  # a fresh process registers the reference ops before loading the engines
        torch.save({"text": text, "latents": ra.latents}, tmp_path / "io.pt")
        code = ("import sys, torch; from ditbake.runtime import load; io = torch.load(sys.argv[2]); "
                "out = load(sys.argv[1], backend='aoti').generate(io['text'], seed=7).latents; "
                "sys.exit(0 if torch.equal(out, io['latents']) else 1)")
        subprocess.run([sys.executable, "-c", code, str(aoti), str(tmp_path / "io.pt")], check=True)


@pytest.mark.slow
def test_cached_heads_compile_and_match_eager(tmp_path):
    """A plan that reuses cached heads: every block engine returns its attention output, the engine of
    the reusing variant takes it back; the runtime keeps the cache per (branch, block, site) as eager
    does, so both backends give the same latents (CFG: two branches, two caches)."""
    plan_fn = _head_plan([["cached", 0, 0], ["full", 0, 0]], steps=3)
    aoti, _ = build_tiny_artifact(tmp_path / "a", "tiny-wan", steps=3, plan_fn=plan_fn, backend="aoti")
    eager, _ = build_tiny_artifact(tmp_path / "e", "tiny-wan", steps=3, plan_fn=plan_fn)
    blocks = [e for e in json.loads((aoti / "manifest.json").read_text())["engines"] if e["part"] == "block"]
    assert all(e["outputs"] == ["hidden", "attention.attn1"] for e in blocks)
    assert sorted(("cached.attn1" in e["inputs"]) for e in blocks) == [False, True]
    a, e = load(aoti, backend="aoti"), load(eager)
    text = torch.randn(1, a.profile().text_len, 32)
    ra, re_ = a.generate(text, seed=6), e.generate(text, seed=6)
    torch.testing.assert_close(ra.latents, re_.latents, rtol=1e-4, atol=1e-4)
    assert ra.report.attention_flops_fraction == re_.report.attention_flops_fraction < 1.0
    # the cached head really is last step's output: recomputing it instead changes the result
    full = build_tiny_artifact(tmp_path / "f", "tiny-wan", steps=3,
                               plan_fn=_head_plan([["full", 0, 0], ["full", 0, 0]], steps=3))[0]
    assert not torch.allclose(load(full).generate(text, seed=6).latents, ra.latents, rtol=1e-4, atol=1e-4)
