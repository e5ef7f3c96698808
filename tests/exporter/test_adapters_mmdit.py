"""MMDiT adapters (SD3): the runtime's joint-sequence implementation matches the diffusers forward."""
import pytest
import torch

from ditbake.exporter import models
from ditbake.exporter.adapters import ADAPTERS, adapter_for
from ditbake.exporter.sampler import SAMPLERS, bake, make_scheduler
from ditbake.runtime.arch_sd3 import pooled_from_tokens
from ditbake.runtime.attention import AttentionRunner
from ditbake.runtime.errors import UnsupportedModelError
from ditbake.runtime.plan import BlockVariant

from tests.conftest import trace_block_io


def _sd3(seed=0, **overrides):
    config = dict(models.TINY_CONFIGS["tiny-sd3"]) | overrides
    return adapter_for(models.from_config(config, seed=seed))


def _runtime_forward(adapter, x, t, text):
    w = adapter.weights()
    h, ctx = adapter.arch.prologue(w, adapter.config, x, t, text, {"name": "p"})
    attention = AttentionRunner()
    for i in range(adapter.num_blocks):
        h = adapter.arch.block(w, adapter.config, i, h, ctx, BlockVariant(), attention, "cond")
    return adapter.arch.epilogue(w, adapter.config, h, ctx), attention


@pytest.mark.parametrize("qk_norm", [None, "rms_norm"])
def test_sd3_runtime_matches_diffusers(qk_norm, rng_seed):
    adapter = _sd3(rng_seed, qk_norm=qk_norm)
    x = torch.randn(2, 4, 8, 6)  # non-square: the cropped position table and unpatchify must agree
    t = torch.rand(2) * 1000
    text = torch.randn(2, 5, 32)
    text[0, 3:] = 0  # a short prompt: padding rows are zero and drop out of the pooled vector
    with torch.no_grad():
        ref = adapter.diffusers_forward(x, t, text)
        out, attention = _runtime_forward(adapter, x, t, text)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    assert attention.flops_done == attention.flops_dense > 0


def test_sd3_metadata_and_layout():
    adapter = _sd3()
    assert "SD3Transformer2DModel" in ADAPTERS and adapter.architecture == "sd3"
    blocks = adapter.block_modules()
    assert len(blocks) == adapter.num_blocks == 3
    for b, block in enumerate(blocks):  # each block lists exactly its linears (the last is context_pre_only)
        linears = {n for n, m in block.named_modules() if isinstance(m, torch.nn.Linear)}
        assert set(adapter.block_linears(b)) == linears and linears <= set(adapter.linear_layers)
    assert adapter.absent_linears == [(2, "attn.to_add_out"), (2, "ff_context.net.0.proj"), (2, "ff_context.net.2")]
    assert adapter.attention_sites == {"attn": 2}
    latent = adapter.latent_shape(1, 8, 6)
    assert latent == (4, 8, 6)
    layout = adapter.token_layout(latent, 5)
    assert layout.grid == (1, 4, 3) and layout.visual == (0, 12) and layout.text == (12, 17)  # text LAST
    assert adapter.config["text_dim"] == 32
    assert SAMPLERS["sd3"] == ("flow_euler",)


def test_sd3_block_io_joint_sequence():
    adapter = _sd3()
    seen = trace_block_io(adapter, torch.randn(1, 4, 8, 8), torch.tensor([500.0]), torch.randn(1, 5, 32))
    assert len(seen) == 3
    for inp, out in seen:
        assert inp.shape == out.shape == (1, 16 + 5, 32)
    last_in, last_out = seen[-1]
    torch.testing.assert_close(last_in[:, 16:], last_out[:, 16:])  # pre-only block: text passes through


def test_pooled_from_tokens_masks_padding():
    text = torch.zeros(2, 4, 3)
    text[0, :2] = torch.tensor([[1.0, 2.0, 3.0], [3.0, 2.0, 1.0]])
    pooled = pooled_from_tokens(text)
    torch.testing.assert_close(pooled[0], torch.tensor([2.0, 2.0, 2.0]))
    assert torch.equal(pooled[1], torch.zeros(3))


@pytest.mark.parametrize("overrides,message", [
    ({"dual_attention_layers": [0]}, "dual-attention"),
    ({"qk_norm": "layer_norm"}, "qk_norm"),
])
def test_sd3_unsupported_configs_raise(overrides, message):
    with pytest.raises(UnsupportedModelError, match=message) as info:
        _sd3(**overrides)
    assert "\n" not in str(info.value)


def test_sd3_sampler_bakes():
    table = bake(make_scheduler("flow_euler", "sd3"), 6, "flow_euler")
    assert table.num_steps == 6 and len(table.sample_coeffs) == 6
