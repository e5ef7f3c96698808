"""The calibration pass records Γ and Δ statistics that match a direct computation."""
import math

import pytest
import torch

from ditbake.exporter import calibrate as cal, models
from ditbake.exporter.adapters import adapter_for
from ditbake.exporter.sampler import make_scheduler


@pytest.mark.parametrize("name", ["tiny-wan", "tiny-cogvideox"])
def test_stats_match_direct_computation(tmp_path, name, rng_seed):
    adapter = adapter_for(models.load(name, seed=rng_seed))
    latent = adapter.latent_shape(3, 8, 8)
    text_len = 8
    embeds = torch.randn(2, text_len, 32)
    stats = cal.calibrate(adapter, embeds, None, latent=latent, sampler=("unipc" if name == "tiny-wan" else "ddim"),
                          num_steps=3, guidance_scale=4.0, seed=5, source=name, progress=False)
    g = stats.tensors["gamma"]
    assert g.shape == (2, 2, 3, 3)
    assert torch.isnan(stats.tensors["delta_change"][:, :, 0]).all()
    assert torch.isfinite(stats.tensors["delta_change"][:, :, 1:]).all()

    # Step 0, prompt 1, cond branch, block 0 by hand.
    scheduler = make_scheduler(stats.meta["sampler"], adapter.architecture)
    scheduler.set_timesteps(3)
    x = torch.randn((1, *latent), generator=torch.Generator().manual_seed(5 + 1))
    captured = {}
    block = adapter.block_modules()[0]

    def hook(module, args, kwargs, output):
        captured.setdefault("io", adapter.block_io(args, kwargs, output))

    handle = block.register_forward_hook(hook, with_kwargs=True)
    with torch.no_grad():
        adapter.diffusers_forward(x, scheduler.timesteps[:1], embeds[1:2])
    handle.remove()
    inp, out = captured["io"]
    gamma = ((out - inp).abs().mean() / inp.abs().mean()).item()
    assert math.isclose(g[1, 0, 0, 0].item(), gamma, rel_tol=1e-5)
    assert math.isclose(stats.tensors["delta_l1"][1, 0, 0, 0].item(), (out - inp).abs().mean().item(), rel_tol=1e-5)

    path = stats.save(tmp_path / "cal")
    again = cal.CalibrationStats.load(path)
    assert again.meta == stats.meta
    assert torch.equal(again.tensors["gamma"], g)


def test_missing_calibration_is_a_clear_error(tmp_path):
    with pytest.raises(cal.CalibrationError, match="run `ditbake calibrate` first"):
        cal.CalibrationStats.load(tmp_path)


def test_extra_observers_share_the_single_pass():
    """A later technique adds its statistic as an observer; it sees every (prompt, branch, step)."""
    adapter = adapter_for(models.load("tiny-wan"))

    class CountForwards(cal.Observer):
        def __init__(self, adapter, shape):
            self.seen = torch.zeros(shape[:3])
            self.handle = adapter.model.register_forward_pre_hook(lambda *_: self.seen.__setitem__(self.where, 1.0))
            self.ended = 0

        def results(self):
            return {"forwards": self.seen}

        def end_prompt(self):
            self.ended += 1

        def remove(self):
            self.handle.remove()

    stats = cal.calibrate(adapter, torch.randn(2, 8, 32), None, latent=adapter.latent_shape(2, 8, 8), sampler="unipc",
                          num_steps=3, guidance_scale=3.0, seed=0, source="tiny-wan", progress=False,
                          observers=[CountForwards])
    assert torch.equal(stats.tensors["forwards"], torch.ones(2, 2, 3))
    assert not adapter.model._forward_pre_hooks  # removed after the pass


def test_a_bf16_checkpoint_with_fp32_kept_modules_calibrates(tmp_path):
    # diffusers keeps Wan's scale_shift_table (its first parameter) and norms in fp32 when loading
    # bf16 weights; the latents must follow the bf16 patch embedding, not the first parameter
    src = models.from_config(dict(models.TINY_CONFIGS["tiny-wan"]), seed=0)
    src.save_pretrained(tmp_path / "wan")
    model = models.load(tmp_path / "wan", dtype=torch.bfloat16)
    assert next(model.parameters()).dtype == torch.float32  # the situation under test
    assert models.compute_dtype(model) == torch.bfloat16
    adapter = adapter_for(model)
    stats = cal.calibrate(adapter, torch.randn(1, 8, 32), None, latent=adapter.latent_shape(3, 8, 8),
                          sampler="unipc", num_steps=2, guidance_scale=1.0, seed=0, source="bf16", progress=False)
    assert torch.isfinite(stats.tensors["gamma"]).all()


def test_compute_dtype_needs_floating_parameters():
    with pytest.raises(models.UnsupportedModelError):
        models.compute_dtype(torch.nn.Module())
