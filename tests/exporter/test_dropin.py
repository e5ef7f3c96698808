"""`ditbake.diffusers`: a compiled artifact in place of a real diffusers pipeline's transformer.

A tiny random WanPipeline (UMT5 text encoder, Wan VAE, a word-level tokenizer built with
`tokenizers`) runs `pipe(prompt, ...)` end to end; with the uncompressed fp32 artifact the frames
equal the plain pipeline's, with a Temporal Delta Cache plan it skips blocks exactly as
Session.generate does, and calls the artifact was not built for are refused."""
import diffusers
import numpy as np
import pytest
import torch
import transformers
from tokenizers import Tokenizer, models as tok_models, pre_tokenizers

import ditbake.diffusers as dropin
from ditbake.exporter.calibrate import calibrate
from ditbake.exporter.plan_cache import CacheConfig
from ditbake.exporter.planner import plan_from_calibration
from ditbake.runtime import load

from tests.conftest import build_tiny_artifact

STEPS, TEXT_LEN = 4, 8
SHAPE = dict(height=32, width=32, num_frames=5)  # latents [4, 2, 4, 4] under the Wan VAE's 4× / 8× factors
LATENT = (4, 2, 4, 4)
WORDS = "a red cat walks on the beach at night blue dog runs in snow".split()


def _tokenizer():
    vocab = {w: i for i, w in enumerate(["<pad>", "</s>", "<unk>", *WORDS])}
    tok = Tokenizer(tok_models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>",
                                                unk_token="<unk>")


def _pipeline(transformer, scheduler):
    torch.manual_seed(0)
    encoder = transformers.UMT5EncoderModel(transformers.UMT5Config(
        vocab_size=len(WORDS) + 3, d_model=32, d_kv=8, d_ff=64, num_layers=1, num_heads=2, relative_attention_num_buckets=8))
    vae = diffusers.AutoencoderKLWan(base_dim=3, z_dim=4, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                                     temperal_downsample=[False, True, True], latents_mean=[0.0] * 4,
                                     latents_std=[1.0] * 4)
    pipe = diffusers.WanPipeline(tokenizer=_tokenizer(), text_encoder=encoder.eval(), vae=vae.eval(),
                                 scheduler=scheduler, transformer=transformer)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _call(pipe, seed=0, **kwargs):
    args = dict(prompt="a red cat walks on the beach", negative_prompt="blue dog", num_inference_steps=STEPS,
                guidance_scale=4.0, max_sequence_length=TEXT_LEN, generator=torch.Generator().manual_seed(seed),
                output_type="np", **SHAPE) | kwargs
    return pipe(**args).frames


def _scheduler():
    return diffusers.UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=3.0)


@pytest.fixture(scope="module")
def uncompressed(tmp_path_factory):
    return build_tiny_artifact(tmp_path_factory.mktemp("u"), "tiny-wan", steps=STEPS, latent=LATENT,
                               text_len=TEXT_LEN, samplers=["unipc"])


def test_uncompressed_artifact_gives_the_pipelines_frames(uncompressed):
    path, adapter = uncompressed
    pipe = _pipeline(adapter.model, _scheduler())
    expected = _call(pipe)
    original = pipe.transformer
    compiled = dropin.replace_transformer(pipe, path)
    assert pipe.transformer is compiled and isinstance(compiled, torch.nn.Module)
    assert compiled.config.patch_size == original.config.patch_size and compiled.dtype == torch.float32
    got = _call(pipe)
    assert got.shape == expected.shape == (1, 5, 32, 32, 3)
    err = float(np.abs(got - expected).max())
    print(f"max |drop-in − pipeline| over decoded frames: {err:.2e}")
    assert err < 1e-4  # fp32 throughout: only summation order differs
    report = compiled.report
    assert report.steps == STEPS and report.block_computes == STEPS * 2 * 3 and report.skip_fraction == 0
    # a second call is a new generation (plan step 0 again, fresh Δ caches) and repeats exactly
    np.testing.assert_array_equal(_call(pipe), got)


def test_calls_the_artifact_was_not_built_for_are_refused(uncompressed):
    path, adapter = uncompressed
    pipe = _pipeline(adapter.model, _scheduler())
    dropin.replace_transformer(pipe, path)
    with pytest.raises(dropin.DropInError, match=r"runs 6 steps.*num_inference_steps=4"):
        _call(pipe, num_inference_steps=6, output_type="latent")
    with pytest.raises(dropin.DropInError, match=r"latents \[4, 2, 6, 4\].*built for"):
        _call(pipe, height=48, output_type="latent")
    with pytest.raises(dropin.DropInError, match="16 text tokens"):
        _call(pipe, max_sequence_length=16, output_type="latent")
    shifted = _pipeline(adapter.model, diffusers.UniPCMultistepScheduler(
        prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=5.0))
    dropin.replace_transformer(shifted, path)
    with pytest.raises(dropin.DropInError, match="scheduler config the artifact was built from"):
        _call(shifted, output_type="latent")
    # without the pipeline at hand, the timestep of each call is still checked
    bare = dropin.load_transformer(path)
    x, text = torch.randn(1, *LATENT), torch.randn(1, TEXT_LEN, 32)
    with pytest.raises(dropin.DropInError, match="timestep 500.00 is not a step"):
        bare(x, torch.tensor([500.0]), text)
    with pytest.raises(dropin.DropInError, match="compiles a WanTransformer3DModel"):
        dropin.load_transformer(path, pipeline=diffusers.FluxPipeline(
            scheduler=_scheduler(), vae=None, text_encoder=None, tokenizer=None, text_encoder_2=None,
            tokenizer_2=None, transformer=diffusers.FluxTransformer2DModel(
                num_layers=1, num_single_layers=1, attention_head_dim=8, num_attention_heads=2,
                joint_attention_dim=32, pooled_projection_dim=32, axes_dims_rope=[2, 2, 4])))


def test_compressed_plan_runs_in_the_pipeline_as_in_the_session(tmp_path):
    """A real TDC plan (calibrated, skip budget 0.3): the pipeline with the drop-in follows exactly the
    latents Session.generate gives for the same prompt embeddings and noise, and skips blocks."""
    def tdc_plan(meta):
        stats = calibrate(adapter, torch.randn(1, TEXT_LEN, 32), None, latent=LATENT, sampler="unipc",
                          num_steps=STEPS, guidance_scale=4.0, seed=0, source="t", progress=False)
        return plan_from_calibration(stats.meta, tensors=stats.tensors, cache=CacheConfig(skip_budget=0.3))

    from ditbake.exporter import models
    from ditbake.exporter.adapters import adapter_for

    adapter = adapter_for(models.load("tiny-wan"))  # the same seeded weights build_tiny_artifact loads
    path, adapter = build_tiny_artifact(tmp_path, "tiny-wan", steps=STEPS, latent=LATENT, text_len=TEXT_LEN,
                                        samplers=["unipc"], plan_fn=tdc_plan)
    session = load(path)
    assert session.plan.predicted["skip_fraction"] > 0
    pipe = _pipeline(adapter.model, _scheduler())
    embeds, negative = pipe.encode_prompt("a red cat walks on the beach", "blue dog", max_sequence_length=TEXT_LEN)
    latents = torch.randn(1, *LATENT)
    compiled = dropin.replace_transformer(pipe, path)
    got = pipe(prompt_embeds=embeds, negative_prompt_embeds=negative, latents=latents.clone(),
               num_inference_steps=STEPS, guidance_scale=4.0, output_type="latent", **SHAPE).frames
    expected = session.generate(embeds, negative, guidance_scale=4.0, latents=latents)
    torch.testing.assert_close(got, expected.latents, rtol=1e-5, atol=1e-5)
    assert expected.report.skip_fraction > 0
    assert compiled.report.skip_fraction == pytest.approx(expected.report.skip_fraction)
    assert compiled.report.block_skips == expected.report.block_skips


FLUX_DYNAMIC = {"_class_name": "FlowMatchEulerDiscreteScheduler", "base_image_seq_len": 16, "base_shift": 0.5,
                "max_image_seq_len": 256, "max_shift": 1.15, "num_train_timesteps": 1000, "shift": 3.0,
                "use_dynamic_shifting": True}


@pytest.mark.parametrize("name", ["tiny-sd3-pooled", "tiny-flux-pooled"])
def test_mmdit_pipelines_with_pooled_vectors(tmp_path, name):
    """SD3 batches [uncond; cond] into one call (split by the drop-in); Flux calls cond and uncond in
    cache contexts with packed latents, t / 1000, its distilled guidance and a per-profile dynamic shift."""
    flux = name.startswith("tiny-flux")
    config = FLUX_DYNAMIC if flux else {"_class_name": "FlowMatchEulerDiscreteScheduler", "shift": 3.0}
    path, adapter = build_tiny_artifact(tmp_path, name, steps=STEPS, latent=(4, 8, 8), text_len=6,
                                        samplers=["flow_euler"], scheduler_config=config)
    scheduler = diffusers.FlowMatchEulerDiscreteScheduler.from_config(config)
    none = dict(vae=None, text_encoder=None, tokenizer=None, text_encoder_2=None, tokenizer_2=None)
    if flux:
        pipe = diffusers.FluxPipeline(transformer=adapter.model, scheduler=scheduler, **none)
    else:
        pipe = diffusers.StableDiffusion3Pipeline(transformer=adapter.model, scheduler=scheduler, text_encoder_3=None,
                                                  tokenizer_3=None, **none)
    pipe.set_progress_bar_config(disable=True)
    embeds, negative = torch.randn(2, 1, 6, 32)
    pooled, negative_pooled = torch.randn(2, 1, 24)
    latents = torch.randn(1, 16, 16) if flux else torch.randn(1, 4, 8, 8)  # Flux: packed 2×2 tokens
    args = dict(prompt_embeds=embeds, negative_prompt_embeds=negative, pooled_prompt_embeds=pooled,
                negative_pooled_prompt_embeds=negative_pooled, num_inference_steps=STEPS, height=64, width=64,
                output_type="latent") | (dict(true_cfg_scale=2.0, guidance_scale=2.5) if flux else
                                         dict(guidance_scale=4.0))
    expected = pipe(latents=latents.clone(), **args).images
    compiled = dropin.replace_transformer(pipe, path)
    got = pipe(latents=latents.clone(), **args).images
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
    assert compiled.report.steps == STEPS and compiled.report.block_computes == STEPS * 2 * adapter.num_blocks
    with pytest.raises(dropin.DropInError, match="built for"):
        pipe(latents=None, **(args | dict(height=128)))


def test_cogvideox_batched_cfg_in_cond_uncond_context(tmp_path):
    """CogVideoXPipeline calls the model once per step with [uncond; cond] inside cache_context("cond_uncond")."""
    from ditbake.exporter.sampler import make_scheduler

    path, adapter = build_tiny_artifact(tmp_path, "tiny-cogvideox", steps=STEPS, samplers=["ddim"])
    pipe = diffusers.CogVideoXPipeline(tokenizer=None, text_encoder=None, vae=None, transformer=adapter.model,
                                       scheduler=make_scheduler("ddim", "cogvideox"))
    pipe.set_progress_bar_config(disable=True)
    embeds, negative = torch.randn(2, 1, 8, 32)
    latents = torch.randn(1, 3, 4, 8, 8)
    args = dict(prompt_embeds=embeds, negative_prompt_embeds=negative, num_inference_steps=STEPS, guidance_scale=5.0,
                height=64, width=64, num_frames=9, use_dynamic_cfg=False, output_type="latent")
    expected = pipe(latents=latents.clone(), **args).frames
    compiled = dropin.replace_transformer(pipe, path)
    got = pipe(latents=latents.clone(), **args).frames
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
    assert compiled.report.block_computes == STEPS * 2 * adapter.num_blocks


def test_batched_cfg_runs_cond_first_for_guidance_skips(tmp_path):
    """A plan with guidance skips (uncond served from cond's residual of the same step) through a
    pipeline that batches [uncond; cond] into one call: the drop-in runs cond first and follows the
    session's latents, with the uncond skips taken."""
    from ditbake.exporter.plan_guidance import add_guidance_skips
    from ditbake.exporter.sampler import make_scheduler

    def guided(meta):
        return add_guidance_skips(plan_from_calibration(meta), start=1, at=[1, 3])

    path, adapter = build_tiny_artifact(tmp_path, "tiny-cogvideox", steps=STEPS, samplers=["ddim"], plan_fn=guided)
    session = load(path)
    assert session.plan.uncond_skip == "guidance"
    pipe = diffusers.CogVideoXPipeline(tokenizer=None, text_encoder=None, vae=None, transformer=adapter.model,
                                       scheduler=make_scheduler("ddim", "cogvideox"))
    pipe.set_progress_bar_config(disable=True)
    embeds, negative = torch.randn(2, 1, 8, 32)
    latents = torch.randn(1, 3, 4, 8, 8)
    compiled = dropin.replace_transformer(pipe, path)
    got = pipe(latents=latents.clone(), prompt_embeds=embeds, negative_prompt_embeds=negative,
               num_inference_steps=STEPS, guidance_scale=5.0, height=64, width=64, num_frames=9,
               use_dynamic_cfg=False, output_type="latent").frames
    expected = session.generate(embeds, negative, guidance_scale=5.0, latents=latents)
    assert compiled.report.block_skips == expected.report.block_skips == 2 * adapter.num_blocks
    torch.testing.assert_close(got, expected.latents, rtol=1e-4, atol=1e-4)
