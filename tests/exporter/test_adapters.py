"""The runtime's own implementation of each architecture must match the diffusers forward."""
import pytest
import torch

from ditbake.exporter import models
from ditbake.exporter.adapters import ADAPTERS, adapter_for
from ditbake.runtime.attention import AttentionRunner
from ditbake.runtime.errors import UnsupportedModelError
from ditbake.runtime.plan import BlockVariant

CASES = {"tiny-wan": ((4, 3, 8, 12), 8), "tiny-cogvideox": ((3, 4, 8, 8), 8)}


def _runtime_forward(adapter, x, t, text, latent):
    w = adapter.weights()
    profile = {"name": "p", "latent_shape": list(latent)}
    w.update(adapter.profile_tensors(profile))
    h, ctx = adapter.arch.prologue(w, adapter.config, x, t, text, profile)
    attention = AttentionRunner()
    for i in range(adapter.num_blocks):
        h = adapter.arch.block(w, adapter.config, i, h, ctx, BlockVariant(), attention, "cond")
    return adapter.arch.epilogue(w, adapter.config, h, ctx), attention


@pytest.mark.parametrize("name", sorted(CASES))
def test_runtime_matches_diffusers_forward(name, rng_seed):
    latent, text_len = CASES[name]
    adapter = adapter_for(models.load(name, seed=rng_seed))
    x = torch.randn(2, *latent)
    t = torch.rand(2) * 1000
    text = torch.randn(2, text_len, 32)
    with torch.no_grad():
        ref = adapter.diffusers_forward(x, t, text)
        out, attention = _runtime_forward(adapter, x, t, text, latent)
    assert out.shape == ref.shape
    # Same fp32 ops in the same order: only reduction-order noise is allowed.
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    assert attention.flops_done == attention.flops_dense > 0


@pytest.mark.parametrize("name", sorted(CASES))
def test_adapter_metadata(name):
    adapter = adapter_for(models.load(name))
    latent, text_len = CASES[name]
    blocks = adapter.block_modules()
    assert len(blocks) == adapter.num_blocks == 3
    for layer in adapter.linear_layers:  # every listed linear exists in every block
        for block in blocks:
            assert isinstance(block.get_submodule(layer), torch.nn.Linear)
    assert adapter.attention_sites == {"attn1": 2}
    layout = adapter.token_layout(latent, text_len)
    f, h, w = layout.grid
    assert layout.visual[1] - layout.visual[0] == f * h * w
    if name == "tiny-cogvideox":
        assert layout.text == (0, text_len) and layout.visual[0] == text_len
    else:
        assert layout.text == (0, 0)


def test_unsupported_class_lists_supported():
    with pytest.raises(UnsupportedModelError, match="supported: " + ", ".join(sorted(ADAPTERS))):
        adapter_for(torch.nn.Linear(2, 2))
    with pytest.raises(UnsupportedModelError, match="not supported"):
        models.from_config({"_class_name": "UNet2DConditionModel"})


def test_load_from_local_diffusers_dir(tmp_path):
    model = models.load("tiny-wan", seed=3)
    model.save_pretrained(tmp_path / "transformer")
    loaded = models.load(tmp_path)
    for (k, a), (_, b) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), k


def test_load_errors_are_typed(tmp_path):
    with pytest.raises(models.ModelLoadError, match="neither"):
        models.load(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(models.ModelLoadError, match="config.json"):
        models.load(tmp_path / "empty")
