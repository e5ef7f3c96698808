"""Flux adapter: the runtime's uniform-block implementation (double then single blocks, joint
[text; image] sequence) matches the diffusers FluxTransformer2DModel forward."""
import pytest
import torch
import torch.nn.functional as F

from ditbake.exporter import models
from ditbake.exporter.adapters import ADAPTERS, adapter_for
from ditbake.exporter.sampler import SAMPLERS, SamplerError, bake, make_scheduler
from ditbake.plugins.head_attention import arrow_allowed
from ditbake.runtime import arch as runtime_arch
from ditbake.runtime import arch_flux
from ditbake.runtime.attention import AttentionRunner
from ditbake.runtime.errors import UnsupportedModelError
from ditbake.runtime.plan import BlockVariant, HeadScheme

from tests.conftest import trace_block_io


def _flux(seed=0, **overrides):
    config = dict(models.TINY_CONFIGS["tiny-flux"]) | overrides
    return adapter_for(models.from_config(config, seed=seed))


def _inputs(batch=2):
    x = torch.randn(batch, 4, 8, 6)  # non-square: 2x2 packing, image ids and unpacking must agree
    t = torch.rand(batch) * 1000
    text = torch.randn(batch, 5, 32)
    text[0, 3:] = 0  # a short prompt: padding rows are zero and drop out of the pooled vector
    return x, t, text


def _runtime_forward(adapter, x, t, text, variant=None, attention=None):
    w = adapter.weights()
    h, ctx = adapter.arch.prologue(w, adapter.config, x, t, text, {"name": "p"})
    attention = attention or AttentionRunner()
    for i in range(adapter.num_blocks):
        h = adapter.arch.block(w, adapter.config, i, h, ctx, variant or BlockVariant(), attention, "cond")
    return adapter.arch.epilogue(w, adapter.config, h, ctx), attention


@pytest.mark.parametrize("guidance", [False, True])
def test_flux_runtime_matches_diffusers(guidance, rng_seed):
    adapter = _flux(rng_seed, guidance_embeds=guidance)
    x, t, text = _inputs()
    with torch.no_grad():
        ref = adapter.diffusers_forward(x, t, text)
        out, attention = _runtime_forward(adapter, x, t, text)
    assert out.shape == ref.shape == x.shape
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    assert attention.flops_done == attention.flops_dense > 0


def test_flux_all_full_head_schemes_identical():
    adapter = _flux()
    x, t, text = _inputs()
    full = BlockVariant(heads=(("attn", (HeadScheme("full"), HeadScheme("full"))),))
    with torch.no_grad():
        base, _ = _runtime_forward(adapter, x, t, text)
        same, _ = _runtime_forward(adapter, x, t, text, variant=full)
    assert torch.equal(base, same)


class _Recording(AttentionRunner):
    """Checks each arrow site against dense attention under the arrow mask, text first."""

    def __init__(self):
        super().__init__()
        self.ranges = []

    def __call__(self, key, q, k, v, schemes, text_range, grid=None):
        out = super().__call__(key, q, k, v, schemes, text_range, grid)
        self.ranges.append(text_range)
        pos = torch.arange(q.shape[2])
        for h, s in enumerate(schemes):
            mask = None if s.kind == "full" else arrow_allowed(pos[:, None], pos[None, :], s.left, s.right, *text_range)
            ref = F.scaled_dot_product_attention(q[:, h:h + 1], k[:, h:h + 1], v[:, h:h + 1], attn_mask=mask)
            torch.testing.assert_close(out[:, h:h + 1], ref, rtol=1e-5, atol=1e-5)
        return out


def test_flux_arrow_heads_use_text_first_range():
    adapter = _flux()
    x, t, text = _inputs(batch=1)
    arrow = BlockVariant(heads=(("attn", (HeadScheme("arrow", 2, 3), HeadScheme("full"))),))
    runner = _Recording()
    with torch.no_grad():
        out, _ = _runtime_forward(adapter, x, t, text, variant=arrow, attention=runner)
        dense, _ = _runtime_forward(adapter, x, t, text)
    assert runner.ranges == [(0, 5)] * adapter.num_blocks  # double and single blocks alike
    assert torch.isfinite(out).all() and not torch.allclose(out, dense)
    assert runner.flops_done < runner.flops_dense


def test_flux_metadata_layout_and_weights():
    adapter = _flux()
    assert "FluxTransformer2DModel" in ADAPTERS and adapter.architecture == "flux"
    assert runtime_arch.get("flux") is arch_flux
    blocks = adapter.block_modules()
    assert len(blocks) == adapter.num_blocks == 4
    # each block lists exactly its own linears (every nn.Linear of the diffusers block), the plan the union
    for b, block in enumerate(blocks):
        linears = {n for n, m in block.named_modules() if isinstance(m, torch.nn.Linear)}
        assert set(adapter.block_linears(b)) == linears
        assert linears == set(arch_flux.DOUBLE_BLOCK_LINEARS if b < 2 else arch_flux.SINGLE_BLOCK_LINEARS)
    assert set(adapter.linear_layers) == set(arch_flux.DOUBLE_BLOCK_LINEARS) | set(arch_flux.SINGLE_BLOCK_LINEARS)
    assert len(adapter.linear_layers) == len(set(adapter.linear_layers)) == 17
    absent = set(adapter.absent_linears)
    assert absent == {(b, n) for b in range(4) for n in adapter.linear_layers if n not in adapter.block_linears(b)}
    assert (3, "proj_mlp") not in absent and (0, "proj_mlp") in absent and (3, "ff.net.2") in absent
    assert adapter.attention_sites == {"attn": 2}
    latent = adapter.latent_shape(1, 8, 6)
    assert latent == (4, 8, 6)
    layout = adapter.token_layout(latent, 5)
    assert layout.grid == (1, 4, 3) and layout.text == (0, 5) and layout.visual == (5, 17)  # text FIRST
    assert adapter.config["text_dim"] == 32
    w = adapter.weights()  # single blocks renumbered after the double ones, same tensors
    assert not any(k.startswith("single_transformer_blocks.") for k in w)
    single = adapter.model.single_transformer_blocks[0].proj_mlp.weight
    assert w["transformer_blocks.2.proj_mlp.weight"].data_ptr() == single.data_ptr()
    assert "transformer_blocks.1.ff.net.2.weight" in w and "transformer_blocks.3.proj_out.weight" in w
    assert SAMPLERS["flux"] == ("flow_euler",)


def test_flux_block_io_joint_sequence():
    adapter = _flux()
    seen = trace_block_io(adapter, torch.randn(1, 4, 8, 8), torch.tensor([500.0]), torch.randn(1, 5, 32))
    assert len(seen) == 4
    for (inp, out), (nxt, _) in zip(seen, seen[1:]):
        assert inp.shape == out.shape == (1, 5 + 16, 32)
        torch.testing.assert_close(out, nxt)  # one block's output is the next one's input


@pytest.mark.parametrize("overrides,message", [
    ({"patch_size": 2}, "patch_size"),
    ({"in_channels": 6}, "multiples of 4"),
])
def test_flux_unsupported_configs_raise(overrides, message):
    with pytest.raises(UnsupportedModelError, match=message) as info:
        _flux(**overrides)
    assert "\n" not in str(info.value)


def test_flux_sampler_static_shift_bakes_dynamic_needs_a_profile():
    table = bake(make_scheduler("flow_euler", "flux", {"shift": 3.0}), 6, "flow_euler")
    assert table.num_steps == 6 and len(table.sample_coeffs) == 6
    with pytest.raises(SamplerError, match="use_dynamic_shifting") as info:  # mu comes per profile (bake_samplers)
        bake(make_scheduler("flow_euler", "flux", {"use_dynamic_shifting": True, "shift": 3.0}), 6, "flow_euler")
    assert "\n" not in str(info.value)
