"""The baked sampler reproduces the diffusers pipelines step by step."""
import diffusers
import numpy as np
import pytest
import torch

from ditbake.exporter import scheduler_config
from ditbake.exporter.sampler import SamplerError, bake, default_samplers, make_scheduler
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


# --- the pipeline's own scheduler/ config (issue 14 item 2) ------------------------------------------

WAN_UNIPC_SHIFT5 = {"_class_name": "UniPCMultistepScheduler", "prediction_type": "flow_prediction",
                    "use_flow_sigmas": True, "flow_shift": 5.0, "num_train_timesteps": 1000, "solver_order": 2}
# CogVideoX-2b's DDIM config with a non-default snr_shift_scale (5b uses 1.0; the class default is 3.0)
COG_DDIM = {"_class_name": "CogVideoXDDIMScheduler", "beta_end": 0.012, "beta_schedule": "scaled_linear",
            "beta_start": 0.00085, "clip_sample": False, "num_train_timesteps": 1000, "prediction_type": "v_prediction",
            "rescale_betas_zero_snr": True, "set_alpha_to_one": True, "snr_shift_scale": 1.0, "steps_offset": 0,
            "timestep_spacing": "trailing"}
# (model, pipeline scheduler config, sampler kind, the scheduler the pipeline would run with that kind)
CONFIGS = [
    ("tiny-wan", WAN_UNIPC_SHIFT5, "unipc", lambda: diffusers.UniPCMultistepScheduler.from_config(WAN_UNIPC_SHIFT5)),
    ("tiny-wan", WAN_UNIPC_SHIFT5, "flow_euler", lambda: diffusers.FlowMatchEulerDiscreteScheduler(shift=5.0)),
    ("tiny-cogvideox", COG_DDIM, "ddim", lambda: diffusers.CogVideoXDDIMScheduler.from_config(COG_DDIM)),
    ("tiny-cogvideox", COG_DDIM, "dpmpp", lambda: diffusers.DPMSolverMultistepScheduler.from_config(COG_DDIM)),
]


@pytest.mark.parametrize("name,config,kind,reference", CONFIGS, ids=[f"{c[0]}-{c[2]}" for c in CONFIGS])
def test_pipeline_scheduler_config_every_step(tmp_path, name, config, kind, reference, rng_seed):
    pipeline_cls, _, kwargs = PIPELINES[name]
    path, adapter = build_tiny_artifact(tmp_path, name, steps=STEPS, samplers=[kind], scheduler_config=config)
    session = load(path)
    prof = session.profile()
    embeds, negative = torch.randn(2, 1, prof.text_len, 32)
    latents = torch.randn(1, *prof.latent_shape)
    scheduler = reference()
    expected = _pipeline_trajectory(pipeline_cls, adapter.model, scheduler, latents, embeds, negative, 4.5, kwargs)
    result = session.generate(embeds, negative, guidance_scale=4.5, latents=latents, keep_trajectory=True)
    assert list(session.artifact.samplers[kind].timesteps) == [float(t) for t in scheduler.timesteps]
    assert session.artifact.manifest["scheduler_config"] == config
    for i, (a, b) in enumerate(zip(result.trajectory[1:], expected, strict=True)):
        torch.testing.assert_close(a, b.float(), rtol=2e-4, atol=2e-4, msg=f"step {i}")


def test_flow_shift_5_gives_the_pipelines_timesteps():
    """The issue's example: Wan's UniPC with flow_shift 5.0 at 10 steps starts [999, 978, 952], not the
    hard-coded shift 3's [999, 964, 923]."""
    table = bake(make_scheduler("unipc", "wan", WAN_UNIPC_SHIFT5), 10, "unipc")
    assert table.timesteps[:3] == (999.0, 978.0, 952.0)
    assert bake(make_scheduler("unipc", "wan"), 10, "unipc").timesteps[:3] == (999.0, 964.0, 923.0)


def test_every_field_of_the_pipeline_config_is_honoured():
    config = dict(WAN_UNIPC_SHIFT5, solver_order=3, lower_order_final=False, final_sigmas_type="sigma_min")
    scheduler = make_scheduler("unipc", "wan", config)
    assert type(scheduler) is diffusers.UniPCMultistepScheduler
    assert {k: scheduler.config[k] for k in config if not k.startswith("_")} == \
        {k: v for k, v in config.items() if not k.startswith("_")}
    ddim = make_scheduler("ddim", "cogvideox", COG_DDIM)
    assert ddim.config.snr_shift_scale == 1.0 and ddim.config.timestep_spacing == "trailing"


def test_samplers_that_do_not_fit_the_prediction_type_are_refused():
    with pytest.raises(SamplerError, match="'ddim' does not fit.*predicts 'flow'"):
        make_scheduler("ddim", "wan", WAN_UNIPC_SHIFT5)
    with pytest.raises(SamplerError, match="'ddim' does not fit.*wan architecture"):
        make_scheduler("ddim", "wan")
    with pytest.raises(SamplerError, match="'flow_euler' does not fit.*'v_prediction'"):
        make_scheduler("flow_euler", "cogvideox", COG_DDIM)
    with pytest.raises(SamplerError, match="cannot be baked.*CogVideoXDPMScheduler"):
        default_samplers("cogvideox", dict(COG_DDIM, _class_name="CogVideoXDPMScheduler"))
    assert default_samplers("wan", WAN_UNIPC_SHIFT5) == ("unipc", "flow_euler")
    assert default_samplers("wan", dict(WAN_UNIPC_SHIFT5, _class_name="FlowMatchEulerDiscreteScheduler",
                                        shift=5.0)) == ("flow_euler", "unipc")


def test_scheduler_dir_is_found_from_root_and_transformer(tmp_path):
    root = tmp_path / "pipe"
    diffusers.UniPCMultistepScheduler.from_config(WAN_UNIPC_SHIFT5).save_pretrained(root / "scheduler")
    (root / "transformer").mkdir()
    (root / "transformer" / "config.json").write_text("{}")
    for source in (root, root / "transformer"):
        config = scheduler_config.read(source)
        assert config["_class_name"] == "UniPCMultistepScheduler" and config["flow_shift"] == 5.0
    assert scheduler_config.read(tmp_path) is None and scheduler_config.read("tiny-wan") is None


FLUX_DYNAMIC = {"_class_name": "FlowMatchEulerDiscreteScheduler", "base_image_seq_len": 256, "base_shift": 0.5,
                "max_image_seq_len": 4096, "max_shift": 1.15, "num_train_timesteps": 1000, "shift": 3.0,
                "use_dynamic_shifting": True}


def test_flux_dynamic_shift_per_profile(tmp_path, rng_seed):
    """mu is resolved per shape profile as FluxPipeline computes it; each profile gets its own table,
    and driving the table reproduces the scheduler run with the pipeline's sigmas and mu."""
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift, retrieve_timesteps

    from ditbake.runtime.artifact import Profile

    profiles = [Profile("small", (4, 8, 8), 8), Profile("large", (4, 32, 48), 8)]
    path, adapter = build_tiny_artifact(tmp_path, "tiny-flux", steps=STEPS, samplers=["flow_euler"],
                                        scheduler_config=FLUX_DYNAMIC, profiles=profiles, guidance=False)
    art = load(path).artifact
    tables = [art.sampler("flow_euler", p.name) for p in profiles]
    assert tables[0].timesteps != tables[1].timesteps
    for prof, table in zip(profiles, tables):
        scheduler = diffusers.FlowMatchEulerDiscreteScheduler.from_config(FLUX_DYNAMIC)
        seq = (prof.latent_shape[1] // 2) * (prof.latent_shape[2] // 2)  # FluxPipeline: packed latent tokens
        mu = calculate_shift(seq, 256, 4096, 0.5, 1.15)
        retrieve_timesteps(scheduler, STEPS, "cpu", sigmas=np.linspace(1.0, 1 / STEPS, STEPS), mu=mu)
        assert list(table.timesteps) == pytest.approx([float(t) for t in scheduler.timesteps], abs=1e-4)
        mix = torch.randn(6, 6, dtype=torch.float64)
        x = torch.randn(1, 6, dtype=torch.float64)
        y, baked = x.clone(), BakedSampler(table)
        for i, t in enumerate(scheduler.timesteps):
            x = scheduler.step(torch.tanh(x @ mix), t, x, return_dict=False)[0].double()
            y = baked.step(i, y, torch.tanh(y @ mix))
            torch.testing.assert_close(y, x, rtol=1e-6, atol=1e-6, msg=f"{prof.name} step {i}")
