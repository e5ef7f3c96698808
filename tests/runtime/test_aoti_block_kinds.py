"""aoti engines per (block kind, variant): Flux's double- and single-stream blocks and SD3's last
(context_pre_only) block each get their own engine, and the runtime picks the engine of a block's kind.

Tolerance: the engines are fp32 and compute what the eager ops compute, up to Inductor's fusion and
summation order (measured max |diff| 2.0e-6 for tiny-flux and 2.4e-6 for tiny-sd3 built with
`--backend aoti`, on latents of magnitude ~3.5 after 2 steps); 1e-4, as
tests/runtime/test_aoti.py, while running a double block's engine on a single block's weights
fails outright (different input count) and a wrong kind's code gives O(1) differences.
"""
import json
import shutil

import pytest
import torch

from ditbake.exporter import models
from ditbake.exporter.adapters import adapter_for
from ditbake.exporter.engine_aoti import engine_jobs, example_extras
from ditbake.exporter.planner import plan_from_calibration
from ditbake.runtime import ArtifactError, load
from ditbake.runtime import arch as runtime_arch
from ditbake.runtime.artifact import Profile
from ditbake.runtime.attention import AttentionRunner
from ditbake.runtime.engines import engine_key
from ditbake.runtime.plan import BlockVariant, Plan

from tests.conftest import build_tiny_artifact


@pytest.fixture(scope="module")
def flux(tmp_path_factory):
    root = tmp_path_factory.mktemp("kinds")
    aoti, _ = build_tiny_artifact(root / "a", "tiny-flux-pooled", steps=2, backend="aoti", guidance=False)
    eager, _ = build_tiny_artifact(root / "e", "tiny-flux-pooled", steps=2, guidance=False)
    return aoti, eager


@pytest.mark.slow  # the fixture compiles 4 AOTInductor engines
def test_flux_engines_per_kind_match_eager(flux):
    aoti, eager = flux
    manifest = json.loads((aoti / "manifest.json").read_text())
    keys = sorted(e["key"] for e in manifest["engines"])
    assert keys == ["block-double-v0-p0", "block-single-v0-p0", "epilogue-p0", "prologue-p0"]
    inputs = {e["block_kind"]: e["inputs"] for e in manifest["engines"] if e["part"] == "block"}
    assert "block.proj_mlp.weight" in inputs["single"] and "block.proj_mlp.weight" not in inputs["double"]
    a, e = load(aoti, backend="aoti"), load(eager)
    prof = a.profile()
    pooled_dim = models.TINY_CONFIGS["tiny-flux-pooled"]["pooled_projection_dim"]  # CLIP pooled ≠ T5 width
    text, pooled = torch.randn(1, prof.text_len, 32), torch.randn(1, pooled_dim)
    ra = a.generate(text, seed=3, pooled_embeds=pooled, guidance=2.5)
    re_ = e.generate(text, seed=3, pooled_embeds=pooled, guidance=2.5)
    assert re_.latents.abs().max() > 0.5
    torch.testing.assert_close(ra.latents, re_.latents, rtol=1e-4, atol=1e-4)


@pytest.mark.slow
def test_artifact_without_kind_engines_is_refused(flux, tmp_path):
    """An aoti Flux artifact from before block kinds (one `block-v0-p0` engine for all blocks) gets a
    typed error naming the rebuild, not a crash inside the engine."""
    aoti, _ = flux
    old = tmp_path / "old"
    shutil.copytree(aoti, old)
    manifest = json.loads((old / "manifest.json").read_text())
    manifest["engines"] = [e | {"key": "block-v0-p0"} if e.get("block_kind") == "double" else e
                           for e in manifest["engines"] if e.get("block_kind") != "single"]
    (old / "manifest.json").write_text(json.dumps(manifest))
    session = load(old, backend="aoti")
    text = torch.randn(1, session.profile().text_len, 32)
    pooled = torch.randn(1, models.TINY_CONFIGS["tiny-flux-pooled"]["pooled_projection_dim"])
    with pytest.raises(ArtifactError, match="no compiled engine for variant 0 at block 2 .*rebuild"):
        session.generate(text, seed=0, pooled_embeds=pooled)


@pytest.mark.parametrize("name,kinds", [("tiny-sd3", {"joint": 0, "joint_pre_only": 2}),
                                        ("tiny-flux-pooled", {"double": 0, "single": 2})])
def test_traced_block_of_each_kind_equals_eager(name, kinds):
    """The module the aoti/tensorrt exporters trace per kind runs that kind's block (at its first index,
    on the hidden state the blocks before it give) and equals the eager block, for fresh inputs."""
    adapter = adapter_for(models.load(name))
    arch, config = adapter.arch, adapter.config
    assert runtime_arch.block_kinds(arch, config, adapter.num_blocks) == kinds
    weights = adapter.weights()
    prof = Profile("p", tuple(adapter.latent_shape(1, 8, 8)), 6)
    weights.update(adapter.profile_tensors(prof.to_json()))
    plan = plan_from_calibration({"architecture": arch.NAME, "num_blocks": adapter.num_blocks,
                                  "linear_layers": list(adapter.linear_layers),
                                  "attention_sites": adapter.attention_sites, "num_steps": 1, "branches": ["cond"]})
    x, t = torch.randn(1, *prof.latent_shape), torch.full((1,), 700.0)
    text = torch.randn(1, prof.text_len, arch.text_dim(config))
    extras = example_extras(arch, config, torch.float32)
    jobs, _, _ = engine_jobs(arch, config, weights, plan, [0], prof, x, t, text, extras)
    blocks = [(j.kind, j.module, j.args) for j in jobs if j.part == "block"]
    assert [k for k, _, _ in blocks] == list(kinds)
    names = [j.block_names for j in jobs if j.part == "block"]
    assert names[0] != names[1]  # the kinds store different weights
    served = [j.blocks for j in jobs if j.part == "block"]  # one engine per kind serves all its blocks
    assert sorted(b for s in served for b in s) == list(range(adapter.num_blocks))
    for kind, module, (h, *ctx_tensors_and_weights) in blocks:
        h = torch.randn_like(h)
        _, ctx = arch.prologue(weights, config, x, t, text, prof.to_json(), *extras)
        expected = arch.block(weights, config, kinds[kind], h, ctx, BlockVariant(), AttentionRunner(), "cond")
        torch.testing.assert_close(module(h, *ctx_tensors_and_weights), expected)


def test_block_keys_of_one_kind_models_are_unchanged():
    """Wan/CogVideoX artifacts built before block kinds keep loading: their key has no kind."""
    wan = runtime_arch.get("wan")
    assert engine_key("block", 2, "p0", runtime_arch.block_kind(wan, {}, 5)) == "block-v2-p0"
    assert engine_key("block", 2, "p0", "single") == "block-single-v2-p0"
    assert engine_key("block", 2, "p0", "single", group=1) == "block-single-v2-g1-p0"


@pytest.mark.parametrize("name", ["tiny-flux", "tiny-sd3"])
def test_engines_of_a_plan_that_quantizes_every_linear(name, rng_seed):
    """Every linear of every block kind int8 (16-bit weights not stored): each kind's engine takes its
    blocks' int8 weights, the example input of a later kind comes from the blocks before it run as
    planned, and each traced module equals the eager block under the same variant."""
    from ditbake.exporter.build_quant import quantize_weights

    adapter = adapter_for(models.load(name))
    arch, config = adapter.arch, adapter.config
    prof = Profile("p", tuple(adapter.latent_shape(1, 8, 8)), 6)
    base = plan_from_calibration({"architecture": arch.NAME, "num_blocks": adapter.num_blocks,
                                  "linear_layers": list(adapter.linear_layers),
                                  "attention_sites": adapter.attention_sites, "num_steps": 1, "branches": ["cond"]})
    int8 = BlockVariant(precisions=tuple((n, "int8") for n in sorted(adapter.linear_layers)), heads=base.variants[0].heads)
    plan = Plan.from_json(base.to_json() | {"variants": [int8.to_json()]})
    source = adapter.weights()
    weights = quantize_weights(source, dict(source), plan, arch.BLOCK_PREFIX, set(adapter.absent_linears))
    assert not any(k.endswith(".to_q.weight") for k in weights)  # the 16-bit copies are gone
    weights.update(adapter.profile_tensors(prof.to_json()))
    gen = torch.Generator().manual_seed(rng_seed)
    x, t = torch.randn(1, *prof.latent_shape, generator=gen), torch.full((1,), 700.0)
    text = torch.randn(1, prof.text_len, arch.text_dim(config), generator=gen)
    extras = example_extras(arch, config, torch.float32)
    jobs, _, _ = engine_jobs(arch, config, weights, plan, [0], prof, x, t, text, extras)
    blocks = [j for j in jobs if j.part == "block"]
    assert len(blocks) == 2 and sorted(b for j in blocks for b in j.blocks) == list(range(adapter.num_blocks))
    _, ctx = arch.prologue(weights, config, x, t, text, prof.to_json(), *extras)
    for job in blocks:
        linear = [n for n in job.block_names if n.rsplit(".", 1)[0] in adapter.linear_layers and not n.endswith(".bias")]
        assert linear and all(".int8_" in n for n in linear), linear
        h, *ctx_tensors_and_weights = job.args
        expected = arch.block(weights, config, job.blocks[0], h, ctx, int8, AttentionRunner(), "cond")
        torch.testing.assert_close(job.module(h, *ctx_tensors_and_weights), expected)
