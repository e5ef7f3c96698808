"""Real pooled CLIP vectors (SD3, Flux) and Flux's distilled guidance: the runtime takes them as
prologue inputs and reproduces the diffusers transformers and pipelines (pooled dim ≠ joint dim,
as in the real checkpoints), step by step, with the pipeline's own scheduler config."""
import diffusers
import pytest
import torch

from ditbake.exporter import models
from ditbake.exporter.adapters import adapter_for
from ditbake.exporter.calibrate import calibrate, pooled_inputs
from ditbake.runtime import arch as runtime_arch
from ditbake.runtime import arch_flux, load
from ditbake.runtime.artifact import Profile
from ditbake.runtime.attention import AttentionRunner
from ditbake.runtime.errors import InputError
from ditbake.runtime.plan import BlockVariant

from tests.conftest import build_tiny_artifact

STEPS = 4
POOLED = 24  # tiny-*-pooled: pooled_projection_dim 24 ≠ joint_attention_dim 32


def _runtime_forward(adapter, x, t, text, *extras):
    w = adapter.weights()
    h, ctx = adapter.arch.prologue(w, adapter.config, x, t, text, {"name": "p"}, *extras)
    for i in range(adapter.num_blocks):
        h = adapter.arch.block(w, adapter.config, i, h, ctx, BlockVariant(), AttentionRunner(), "cond")
    return adapter.arch.epilogue(w, adapter.config, h, ctx)


@pytest.mark.parametrize("name", ["tiny-sd3-pooled", "tiny-flux-pooled"])
def test_transformer_with_real_pooled_and_guidance_matches_diffusers(name, rng_seed):
    adapter = adapter_for(models.from_config(models.TINY_CONFIGS[name], seed=rng_seed))
    assert adapter.config["pooled_source"] == "input"
    x, t, text, pooled = torch.randn(2, 4, 8, 6), torch.rand(2) * 1000, torch.randn(2, 5, 32), torch.randn(2, POOLED)
    extras = (pooled,)
    kwargs = {"pooled": pooled}
    if adapter.architecture == "flux":
        guidance = torch.tensor([1.5, 4.0])  # per sample: the distilled guidance is an input, not a constant
        extras, kwargs = (pooled, guidance), {"pooled": pooled, "guidance": guidance}
    assert runtime_arch.extra_inputs(adapter.arch, adapter.config) == (("pooled", "guidance")[:len(extras)])
    with torch.no_grad():
        ref = adapter.diffusers_forward(x, t, text, **kwargs)
        out = _runtime_forward(adapter, x, t, text, *extras)
        other = _runtime_forward(adapter, x, t, text, torch.randn(2, POOLED), *extras[1:])
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    assert (other - out).abs().max() > 1e-3  # the pooled vector really conditions the output
    with pytest.raises(InputError, match=f"pooled text vector of {POOLED}"):
        adapter.arch.prologue(adapter.weights(), adapter.config, x, t, text, {"name": "p"})


def _sd3_pipeline_steps(adapter, scheduler, latents, embeds, negative, pooled, negative_pooled, cfg):
    pipe = diffusers.StableDiffusion3Pipeline(transformer=adapter.model, scheduler=scheduler, vae=None,
                                              text_encoder=None, tokenizer=None, text_encoder_2=None,
                                              tokenizer_2=None, text_encoder_3=None, tokenizer_3=None)
    pipe.set_progress_bar_config(disable=True)
    steps = []
    pipe(prompt_embeds=embeds, negative_prompt_embeds=negative, pooled_prompt_embeds=pooled,
         negative_pooled_prompt_embeds=negative_pooled, latents=latents.clone(), num_inference_steps=STEPS,
         guidance_scale=cfg, height=latents.shape[-2] * 8, width=latents.shape[-1] * 8, output_type="latent",
         callback_on_step_end=lambda p, i, t, d: steps.append(d["latents"].clone()) or {})
    return steps


SD3_SHIFT2 = {"_class_name": "FlowMatchEulerDiscreteScheduler", "num_train_timesteps": 1000, "shift": 2.0}


def test_sd3_pooled_session_matches_pipeline_every_step(tmp_path, rng_seed):
    path, adapter = build_tiny_artifact(tmp_path, "tiny-sd3-pooled", steps=STEPS, samplers=["flow_euler"],
                                        scheduler_config=SD3_SHIFT2, latent=(4, 8, 8), text_len=6)
    session = load(path)
    assert session.artifact.config["pooled_source"] == "input"
    embeds, negative = torch.randn(2, 1, 6, 32)
    pooled, negative_pooled = torch.randn(2, 1, POOLED)
    latents = torch.randn(1, 4, 8, 8)
    expected = _sd3_pipeline_steps(adapter, diffusers.FlowMatchEulerDiscreteScheduler.from_config(SD3_SHIFT2),
                                   latents, embeds, negative, pooled, negative_pooled, 4.0)
    got = session.generate(embeds, negative, guidance_scale=4.0, latents=latents, keep_trajectory=True,
                           pooled_embeds=pooled, negative_pooled_embeds=negative_pooled).trajectory[1:]
    for i, (a, b) in enumerate(zip(got, expected, strict=True)):
        torch.testing.assert_close(a, b, rtol=2e-4, atol=2e-4, msg=f"step {i}")
    with pytest.raises(InputError, match="pass pooled_embeds"):
        session.generate(embeds, negative, guidance_scale=4.0)
    with pytest.raises(InputError, match="pass negative_pooled_embeds"):
        session.generate(embeds, negative, guidance_scale=4.0, pooled_embeds=pooled)
    with pytest.raises(InputError, match=r"shape \[1, 32\]"):
        session.generate(embeds, negative, pooled_embeds=torch.randn(1, 32), negative_pooled_embeds=pooled)


FLUX_DYNAMIC = {"_class_name": "FlowMatchEulerDiscreteScheduler", "base_image_seq_len": 16, "base_shift": 0.5,
                "max_image_seq_len": 256, "max_shift": 1.15, "num_train_timesteps": 1000, "shift": 3.0,
                "use_dynamic_shifting": True}


def test_flux_guidance_dynamic_shift_two_profiles_match_pipeline(tmp_path, rng_seed):
    """FluxPipeline with its dynamic shift at two resolutions, the distilled guidance and true CFG."""
    profiles = [Profile("small", (4, 8, 8), 6), Profile("large", (4, 16, 24), 6)]
    path, adapter = build_tiny_artifact(tmp_path, "tiny-flux-pooled", steps=STEPS, samplers=["flow_euler"],
                                        scheduler_config=FLUX_DYNAMIC, profiles=profiles)
    session = load(path)
    embeds, negative = torch.randn(2, 1, 6, 32)
    pooled, negative_pooled = torch.randn(2, 1, POOLED)
    firsts = []
    for prof in profiles:
        latents = torch.randn(1, *prof.latent_shape)
        pipe = diffusers.FluxPipeline(transformer=adapter.model, vae=None, text_encoder=None, tokenizer=None,
                                      text_encoder_2=None, tokenizer_2=None,
                                      scheduler=diffusers.FlowMatchEulerDiscreteScheduler.from_config(FLUX_DYNAMIC))
        pipe.set_progress_bar_config(disable=True)
        steps = []
        pipe(prompt_embeds=embeds, pooled_prompt_embeds=pooled, negative_prompt_embeds=negative,
             negative_pooled_prompt_embeds=negative_pooled, true_cfg_scale=2.0, guidance_scale=2.5,
             latents=arch_flux.pack_latents(latents), height=prof.latent_shape[1] * 8,
             width=prof.latent_shape[2] * 8, num_inference_steps=STEPS, output_type="latent",
             callback_on_step_end=lambda p, i, t, d: steps.append(d["latents"].clone()) or {})
        result = session.generate(embeds, negative, guidance_scale=2.0, guidance=2.5, latents=latents,
                                  profile=prof.name, pooled_embeds=pooled, negative_pooled_embeds=negative_pooled,
                                  keep_trajectory=True)
        for i, (a, b) in enumerate(zip(result.trajectory[1:], steps, strict=True)):
            torch.testing.assert_close(arch_flux.pack_latents(a), b, rtol=2e-4, atol=2e-4, msg=f"{prof.name} step {i}")
        firsts.append(session.artifact.sampler("flow_euler", prof.name).timesteps[1])
    assert firsts[0] != firsts[1]  # the shift really differs per profile
    other = session.generate(embeds, guidance_scale=1.0, guidance=6.0, latents=latents, profile="large",
                             pooled_embeds=pooled).latents
    assert (other - session.generate(embeds, guidance_scale=1.0, guidance=2.5, latents=latents, profile="large",
                                     pooled_embeds=pooled).latents).abs().max() > 1e-4


def test_token_mean_models_still_derive_the_pooled_vector(tmp_path):
    """The test-bed layout (pooled dim == joint dim, trained on the token mean): no pooled vector needed,
    and passing the token mean explicitly gives the same latents."""
    path, _ = build_tiny_artifact(tmp_path, "tiny-sd3", steps=2, samplers=["flow_euler"], latent=(4, 8, 8), text_len=6)
    session = load(path)
    assert session.artifact.config["pooled_source"] == "token_mean"
    embeds = torch.randn(1, 6, 32)
    embeds[0, 4:] = 0
    implicit = session.generate(embeds, guidance_scale=1.0, seed=1).latents
    explicit = session.generate(embeds, guidance_scale=1.0, seed=1, pooled_embeds=embeds[:, :4].mean(1)).latents
    torch.testing.assert_close(implicit, explicit, rtol=1e-6, atol=1e-6)


def test_calibration_takes_pooled_vectors(rng_seed):
    adapter = adapter_for(models.from_config(models.TINY_CONFIGS["tiny-sd3-pooled"], seed=rng_seed))
    embeds = torch.randn(2, 6, 32)
    kwargs = dict(latent=(4, 8, 8), sampler="flow_euler", num_steps=2, guidance_scale=3.0, seed=0, source="t",
                  progress=False)
    with pytest.raises(InputError, match="needs `pooled`"):
        calibrate(adapter, embeds, None, **kwargs)
    with pytest.raises(InputError, match="needs `negative_pooled`"):
        pooled_inputs(adapter, 2, torch.randn(2, POOLED), None, negative_given=True)
    a = calibrate(adapter, embeds, None, pooled=torch.randn(2, POOLED), **kwargs).tensors["gamma"]
    b = calibrate(adapter, embeds, None, pooled=torch.randn(2, POOLED), **kwargs).tensors["gamma"]
    assert a.shape == (2, 2, 2, 3) and torch.isfinite(a).all() and not torch.equal(a, b)


def test_compiled_engine_convention_carries_pooled_and_guidance(tmp_path):
    """prologue(x, t, text, pooled, guidance, *weights): the module the aoti / tensorrt exporters trace
    equals the eager prologue, its inputs are named in that order, and engines compiled before the
    extra inputs existed are refused by name."""
    from ditbake.exporter.engine_aoti import _input_names, engine_jobs, example_extras
    from ditbake.exporter.planner import plan_from_calibration
    from ditbake.runtime.engines import AotiEngines
    from ditbake.runtime.errors import ArtifactError

    adapter = adapter_for(models.from_config(models.TINY_CONFIGS["tiny-flux-pooled"]))
    weights = adapter.weights()
    prof = Profile("p", (4, 8, 8), 6)
    weights.update(adapter.profile_tensors(prof.to_json()))
    plan = plan_from_calibration({"architecture": "flux", "num_blocks": adapter.num_blocks,
                                  "linear_layers": list(adapter.linear_layers),
                                  "attention_sites": adapter.attention_sites, "num_steps": 1, "branches": ["cond"]})
    x, t, text = torch.randn(1, 4, 8, 8), torch.full((1,), 500.0), torch.randn(1, 6, 32)
    extras = example_extras(adapter.arch, adapter.config, torch.float32)
    assert [e.shape for e in extras] == [(1, POOLED), (1,)]
    jobs, gnames, n_ctx = engine_jobs(adapter.arch, adapter.config, weights, plan, [0], prof, x, t, text, extras)
    part, module, args = jobs[0].part, jobs[0].module, jobs[0].args
    assert part == "prologue" and _input_names(part, gnames, [], n_ctx, ("pooled", "guidance"))[:5] == \
        ["latents", "timestep", "text", "pooled", "guidance"]
    h, *ctx = module(*args)
    h_ref, ctx_ref = adapter.arch.prologue(weights, adapter.config, x, t, text, prof.to_json(), *extras)
    torch.testing.assert_close(h, h_ref)
    torch.testing.assert_close(ctx[0], ctx_ref["temb"])
    old_entry = {"part": "prologue", "file": "engines/prologue-old.pt2", "inputs": ["latents", "timestep", "text", *gnames]}
    with pytest.raises(ArtifactError, match="predates the pooled/guidance"):
        AotiEngines(adapter.arch, adapter.config, weights, tmp_path, [old_entry], "cpu")
