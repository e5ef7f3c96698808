"""The baked sampler reproduces the diffusers pipelines step by step."""
import diffusers
import pytest
import torch

from ditbake.exporter.sampler import SamplerError, bake, make_scheduler
from ditbake.runtime import load
from ditbake.runtime.sampler import BakedSampler

from tests.conftest import build_tiny_artifact

PIPELINES = {
    "tiny-wan": (diffusers.WanPipeline, ("unipc", "flow_euler"), dict(height=64, width=64, num_frames=9)),
    "tiny-cogvideox": (diffusers.CogVideoXPipeline, ("ddim", "dpmpp"),
                       dict(height=64, width=64, num_frames=9, use_dynamic_cfg=False)),
}
STEPS = 6


def _pipeline_trajectory(pipeline_cls, transformer, scheduler, latents, embeds, negative, guidance, kwargs):
    pipe = pipeline_cls(tokenizer=None, text_encoder=None, transformer=transformer, vae=None, scheduler=scheduler)
    pipe.set_progress_bar_config(disable=True)
    steps = []

    def record(_pipe, _i, _t, tensors):
        steps.append(tensors["latents"].clone())
        return {}

    pipe(prompt_embeds=embeds, negative_prompt_embeds=negative, latents=latents.clone(), num_inference_steps=STEPS,
         guidance_scale=guidance, output_type="latent", callback_on_step_end=record, **kwargs)
    return steps


@pytest.mark.parametrize("name,sampler", [(n, s) for n, (_, ss, _) in PIPELINES.items() for s in ss])
def test_runtime_latents_match_pipeline_every_step(tmp_path, name, sampler, rng_seed):
    pipeline_cls, _, kwargs = PIPELINES[name]
    path, adapter = build_tiny_artifact(tmp_path, name, steps=STEPS, samplers=[sampler])
    session = load(path)
    prof = session.profile()
    embeds = torch.randn(1, prof.text_len, 32)
    negative = torch.randn(1, prof.text_len, 32)
    latents = torch.randn(1, *prof.latent_shape)
    expected = _pipeline_trajectory(pipeline_cls, adapter.model, make_scheduler(sampler, adapter.architecture),
                                    latents, embeds, negative, 4.5, kwargs)
    got = session.generate(embeds, negative, guidance_scale=4.5, latents=latents, keep_trajectory=True).trajectory[1:]
    assert len(got) == len(expected) == STEPS
    for i, (a, b) in enumerate(zip(got, expected)):
        # fp32 everywhere; the table's coefficients are exact to ~1e-7 relative.
        torch.testing.assert_close(a, b.float(), rtol=2e-4, atol=2e-4, msg=f"step {i}")


def test_table_on_random_linear_dynamics(rng_seed):
    """Independent of any model: a nonlinear fake model driven through scheduler and table alike."""
    for arch, kind in (("wan", "unipc"), ("cogvideox", "dpmpp")):
        table = bake(make_scheduler(kind, arch), 10, kind)
        scheduler = make_scheduler(kind, arch)
        scheduler.set_timesteps(10)
        mix = torch.randn(6, 6, dtype=torch.float64)
        x = torch.randn(1, 6, dtype=torch.float64)
        y, baked = x.clone(), BakedSampler(table)
        for i, t in enumerate(scheduler.timesteps):
            x = scheduler.step(torch.tanh(x @ mix), t, x, return_dict=False)[0].double()
            y = baked.step(i, y, torch.tanh(y @ mix))
        torch.testing.assert_close(y, x, rtol=1e-5, atol=1e-5)


def test_nonlinear_scheduler_is_refused():
    scheduler = diffusers.DPMSolverMultistepScheduler(thresholding=True)
    with pytest.raises(SamplerError, match="not linear"):
        bake(scheduler, 4, "dpm-threshold")
    with pytest.raises(SamplerError, match="unknown sampler"):
        make_scheduler("euler_ancestral", "wan")
