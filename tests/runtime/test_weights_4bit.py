"""8-bit weights stored as NVFP4 and materialized at load (runtime/weights_4bit.py, build --weight-storage)."""
import json

import pytest
import torch

from ditbake.exporter import build as builder, models
from ditbake.exporter.adapters import adapter_for
from ditbake.exporter.build_quant import nvfp4_stored_8bit_layers
from ditbake.plugins.int8 import quantize_weight_per_channel
from ditbake.plugins.nvfp4 import dequantize_nvfp4, fake_quantize_nvfp4, quantize_nvfp4
from ditbake.runtime import load, weights_4bit
from ditbake.runtime.artifact import MANIFEST, WEIGHTS, Profile, load_artifact
from ditbake.runtime.errors import ArtifactError, PlanError
from ditbake.runtime.plan import BlockVariant, Plan

STEPS = 3


def _plan(adapter, precision="int8", bf16_layer=None):
    """Every block linear at `precision` (one layer kept bf16 on block 0 when asked), every step."""
    layers = list(adapter.linear_layers)
    plain = BlockVariant(precisions=tuple((n, precision) for n in layers))
    variants = [plain]
    ids = [0] * adapter.num_blocks
    if bf16_layer is not None:
        variants.append(BlockVariant(precisions=tuple((n, "bf16" if n == bf16_layer else precision) for n in layers)))
        ids[0] = 1
    return Plan(architecture=adapter.architecture, num_blocks=adapter.num_blocks, linear_layers=tuple(layers),
                attention_sites=adapter.attention_sites, variants=variants,
                steps=[{"cond": tuple(ids), "uncond": tuple(ids)} for _ in range(STEPS)])


def _build(adapter, plan, path, **kw):
    return builder.build(adapter, plan, path, profiles=[Profile("p", adapter.latent_shape(2, 8, 8), 8)],
                         samplers=["unipc"], dtype=torch.float32, progress=False, **kw)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


@pytest.fixture(scope="module")
def tiny():
    return adapter_for(models.load("tiny-wan"))


def test_nvfp4_storage_loads_the_8bit_weights_of_the_dequantized_nvfp4_weight(tiny, tmp_path, rng_seed):
    plan = _plan(tiny, bf16_layer="attn1.to_q")
    art = _build(tiny, plan, tmp_path / "a", weight_storage="nvfp4")
    manifest = json.loads((art / MANIFEST).read_text())
    listed = manifest[weights_4bit.MANIFEST_KEY]
    assert listed == nvfp4_stored_8bit_layers(plan)
    assert "blocks.0.attn1.to_q" not in listed and "blocks.1.attn1.to_q" in listed  # bf16 on block 0 stays 16-bit
    stored = manifest["tensors"]
    for layer in listed:  # the file holds 4.5 bits per weight for them, no 8-bit or 16-bit copy
        assert f"{layer}.nvfp4_packed" in stored and f"{layer}.int8_weight" not in stored
        assert f"{layer}.weight" not in stored and f"{layer}.nvfp4_hadamard" not in stored
    source = tiny.weights()
    w = load_artifact(art).weights
    for layer in listed:
        q, s = quantize_weight_per_channel(fake_quantize_nvfp4(source[layer + ".weight"].float()), "int8")
        assert torch.equal(w[layer + ".int8_weight"], q) and torch.equal(w[layer + ".int8_scale"], s)
        assert layer + ".nvfp4_packed" not in w
    # the whole generation equals an 8-bit-stored artifact of the model with NVFP4-rounded weights
    rounded = adapter_for(models.load("tiny-wan"))
    with torch.no_grad():
        for layer in listed:
            b, name = layer.removeprefix("blocks.").split(".", 1)
            mod = rounded.block_modules()[int(b)].get_submodule(name)
            mod.weight.copy_(fake_quantize_nvfp4(mod.weight.float()))
    ref = _build(rounded, plan, tmp_path / "ref")
    gen = torch.Generator().manual_seed(rng_seed)
    embeds, latents = torch.randn(1, 8, 32, generator=gen), torch.randn(1, *tiny.latent_shape(2, 8, 8), generator=gen)
    got = load(art).generate(embeds, latents=latents, guidance_scale=4.0).latents
    want = load(ref).generate(embeds, latents=latents, guidance_scale=4.0).latents
    plain = load(_build(tiny, plan, tmp_path / "plain")).generate(embeds, latents=latents, guidance_scale=4.0).latents
    # same weights (equal above), same ops: only fp32 rounding of differently aligned buffers differs
    # (≈ 1e-6), which at times flips an activation's INT8 rounding, and three CFG steps of this random
    # model amplify a flip (measured up to 1.8e-3 relative L2); what the NVFP4 rounding itself moves the
    # output is ≈ 30× more
    assert _rel(got, want) < 0.1 * _rel(plain, want), (_rel(got, want), _rel(plain, want))
    assert (art / WEIGHTS).stat().st_size < (ref / WEIGHTS).stat().st_size


def test_gptq_hessians_change_the_stored_rounding(tiny, tmp_path, rng_seed):
    plan = _plan(tiny)
    layer = "blocks.1.ffn.net.2"
    k = tiny.weights()[layer + ".weight"].shape[1]
    gen = torch.Generator().manual_seed(rng_seed)
    x = torch.randn(512, k, generator=gen) @ torch.randn(k, k, generator=gen)
    art = _build(tiny, plan, tmp_path / "g", weight_storage="nvfp4", hessians={layer: x.T @ x})
    from safetensors.torch import load_file
    stored = load_file(str(art / WEIGHTS))
    rtn = quantize_nvfp4(tiny.weights()[layer + ".weight"].float())
    assert not torch.equal(stored[layer + ".nvfp4_packed"], rtn.packed)  # GPTQ moved some roundings
    other = "blocks.0.ffn.net.2"  # no statistics: round to nearest
    assert torch.equal(stored[other + ".nvfp4_packed"], quantize_nvfp4(tiny.weights()[other + ".weight"].float()).packed)
    w = tiny.weights()[layer + ".weight"].float()
    deq = dequantize_nvfp4(type(rtn)(stored[layer + ".nvfp4_packed"], stored[layer + ".nvfp4_block_scales"],
                                     stored[layer + ".nvfp4_global_scale"], w.shape))
    err_gptq = (x @ (deq - w).T).norm()
    err_rtn = (x @ (dequantize_nvfp4(rtn) - w).T).norm()
    assert err_gptq < err_rtn


def test_default_storage_is_unchanged_and_unknown_storage_is_refused(tiny, tmp_path, caplog):
    plan = _plan(tiny)
    k = tiny.weights()["blocks.0.ffn.net.2.weight"].shape[1]
    with caplog.at_level("WARNING"):  # statistics with nothing to round: said, not silently dropped
        art = _build(tiny, plan, tmp_path / "d", hessians={"blocks.0.ffn.net.2": torch.eye(k)})
    assert "no layer is stored in plain NVFP4" in caplog.text
    manifest = json.loads((art / MANIFEST).read_text())
    assert weights_4bit.MANIFEST_KEY not in manifest
    assert "blocks.0.attn1.to_q.int8_weight" in manifest["tensors"]
    with pytest.raises(PlanError, match="weight storage"):
        _build(tiny, plan, tmp_path / "x", weight_storage="int4")


def _edit_manifest(art, fn):
    m = json.loads((art / MANIFEST).read_text())
    fn(m)
    (art / MANIFEST).write_text(json.dumps(m))


@pytest.mark.parametrize("edit, match", [
    (lambda m: m.__setitem__(weights_4bit.MANIFEST_KEY, ["blocks.0.attn1.to_q"]), "must be an object"),
    (lambda m: m[weights_4bit.MANIFEST_KEY].__setitem__("blocks.0.attn1.to_q", "int4"), "expected one of"),
    (lambda m: m[weights_4bit.MANIFEST_KEY].__setitem__("blocks.0.attn1.to_q", "fp8"), "plan runs it"),
    (lambda m: m[weights_4bit.MANIFEST_KEY].__setitem__("blocks.9.attn1.to_q", "int8"), "no blocks.9"),
])
def test_tampered_manifest_entries_are_refused(tiny, tmp_path, edit, match):
    art = _build(tiny, _plan(tiny), tmp_path / "t", weight_storage="nvfp4")
    _edit_manifest(art, edit)
    with pytest.raises(ArtifactError, match=match):
        load_artifact(art)


def test_stored_8bit_copy_beside_the_nvfp4_one_is_refused(tiny, tmp_path):
    weights = {"l.nvfp4_packed": torch.zeros(4, 8, dtype=torch.uint8),
               "l.nvfp4_block_scales": torch.zeros(4, 1, dtype=torch.float8_e4m3fn),
               "l.nvfp4_global_scale": torch.ones(()), "l.int8_weight": torch.zeros(4, 16, dtype=torch.int8)}
    with pytest.raises(ArtifactError, match="also stores"):
        weights_4bit.check({"l": "int8"}, weights)
    del weights["l.int8_weight"]
    out = weights_4bit.materialize(weights, weights_4bit.check({"l": "int8"}, weights))
    assert out["l.int8_weight"].shape == (4, 16) and "l.nvfp4_packed" not in out and "l.nvfp4_packed" in weights


def test_resident_nvfp4_converts_in_the_graph_and_matches_load_time_conversion(tiny, tmp_path, rng_seed):
    """`nvfp4-resident`: the NVFP4 tensors stay in the session's weights (marked, no manifest entry, no
    8-bit copy), each call makes the 8-bit weight, and the latents equal the load-time conversion's."""
    from ditbake.runtime.engines import variant_weight_names

    plan = _plan(tiny, bf16_layer="attn1.to_q")
    resident = _build(tiny, plan, tmp_path / "r", weight_storage="nvfp4-resident")
    loaded = _build(tiny, plan, tmp_path / "l", weight_storage="nvfp4")
    manifest = json.loads((resident / MANIFEST).read_text())
    assert weights_4bit.MANIFEST_KEY not in manifest
    layers = nvfp4_stored_8bit_layers(plan)
    session = load(resident)
    for layer in layers:
        assert f"{layer}.nvfp4_as_8bit" in session.weights and f"{layer}.int8_weight" not in session.weights
    # the engine of a block reads the NVFP4 tensors and the marker of its converted layers
    names = variant_weight_names(session.weights, session.arch, tiny.config, 1, plan.variants[0])
    assert {"ffn.net.2.nvfp4_packed", "ffn.net.2.nvfp4_as_8bit", "ffn.net.2.nvfp4_global_scale"} <= set(names)
    assert not any(n.endswith(".nvfp4_hadamard") or n.endswith("int8_weight") for n in names)
    resident_bytes = sum(t.numel() * t.element_size() for t in session.weights.values())
    loaded_bytes = sum(t.numel() * t.element_size() for t in load(loaded).weights.values())
    assert resident_bytes < loaded_bytes
    gen = torch.Generator().manual_seed(rng_seed)
    embeds, latents = torch.randn(1, 8, 32, generator=gen), torch.randn(1, *tiny.latent_shape(2, 8, 8), generator=gen)
    got = session.generate(embeds, latents=latents, guidance_scale=4.0).latents
    want = load(loaded).generate(embeds, latents=latents, guidance_scale=4.0).latents
    plain = load(_build(tiny, plan, tmp_path / "p")).generate(embeds, latents=latents, guidance_scale=4.0).latents
    assert _rel(got, want) < 0.1 * _rel(plain, want)  # the same 8-bit weights, made per call (see above)


@pytest.mark.slow
def test_resident_nvfp4_compiles_into_aoti_engines(tiny, tmp_path, rng_seed):
    """The per-call conversion traces into the block engines (CPU AOTInductor): the engine's inputs are
    the NVFP4 tensors and its output equals the eager session's."""
    plan = _plan(tiny)
    art = _build(tiny, plan, tmp_path / "a", weight_storage="nvfp4-resident", backend="aoti")
    manifest = json.loads((art / MANIFEST).read_text())
    block = next(e for e in manifest["engines"] if e["key"].startswith("block"))
    assert any(n.endswith(".nvfp4_as_8bit") for n in block["inputs"]) and not any("int8_weight" in n for n in block["inputs"])
    gen = torch.Generator().manual_seed(rng_seed)
    embeds, latents = torch.randn(1, 8, 32, generator=gen), torch.randn(1, *tiny.latent_shape(2, 8, 8), generator=gen)
    got = load(art).generate(embeds, latents=latents, guidance_scale=4.0).latents
    eager = _build(tiny, plan, tmp_path / "e", weight_storage="nvfp4-resident")
    want = load(eager).generate(embeds, latents=latents, guidance_scale=4.0).latents
    # Inductor's fp32 op order differs from eager's by ~1e-6 (measured after one step: ≤ 3e-6 absolute);
    # over three CFG steps that can flip activations' INT8 rounding (measured up to 1.8e-3 relative L2),
    # far below what the NVFP4 rounding itself moves the output
    plain = load(_build(tiny, plan, tmp_path / "p")).generate(embeds, latents=latents, guidance_scale=4.0).latents
    assert _rel(got, want) < 0.1 * _rel(plain, want), (_rel(got, want), _rel(plain, want))
