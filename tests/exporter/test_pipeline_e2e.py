"""Text in, frames out from a user's pipeline directory: a tiny random WanPipeline saved with
save_pretrained goes through `ditbake calibrate` (its own UMT5 + tokenizer), `plan`, `build` (two
shape profiles, components stored) and the runtime alone, and the decoded frames equal
`pipe(prompt, ...)` for the same seed.

Both sides draw the initial noise with a CPU torch generator seeded alike (the runtime's
`torch.randn(shape, generator)` is what diffusers' `randn_tensor` calls), so no latents are passed.
Tolerance: fp32 on both sides, the same operations in a different order (plain torch vs
diffusers/transformers modules) over 2 steps and the VAE: 1.2e-7 observed on frames in [0, 1], 1e-5
allowed.
"""
import json

import pytest
import torch

from ditbake.exporter.cli import main
from tests.pipelines import wan_pipeline

PROMPT = "a red fox running through snow at dawn"
NEGATIVE = "blurry, low quality"


@pytest.fixture(scope="module")
def wan(tmp_path_factory):
    root = tmp_path_factory.mktemp("wan-e2e")
    model = wan_pipeline(root / "pipe")
    cal, plan, art = root / "cal", root / "plan.json", root / "art"
    assert main(["calibrate", "--model", str(model), "--out", str(cal), "--prompts", "a cat walks on the beach",
                 "--negative-prompt", NEGATIVE, "--profile", "16x16x9", "--text-len", "16", "--steps", "2",
                 "--sampler", "unipc"]) == 0
    assert main(["plan", "--calibration", str(cal), "--out", str(plan)]) == 0
    assert main(["build", "--model", str(model), "--plan", str(plan), "--calibration", str(cal), "--out", str(art),
                 "--dtype", "float32", "--profile", "16x16x9", "--profile", "32x16x5"]) == 0
    return model, art, cal


def test_calibration_used_the_pipelines_text_encoder(wan):
    _, _, cal = wan
    meta = json.loads((cal / "calibration.json").read_text())
    assert meta["conditioning"]["origin"] == "WanPipeline text encoder(s)"
    assert meta["conditioning"]["prompts"] == ["a cat walks on the beach"] and meta["pixels"] == [16, 16, 9]
    assert meta["latent_shape"] == [16, 3, 2, 2] and meta["text_len"] == 16


def test_artifact_holds_components_and_profiles(wan, capsys):
    _, art, _ = wan
    capsys.readouterr()
    assert main(["inspect", str(art)]) == 0
    assert json.loads(capsys.readouterr().out)["components"] == {
        "pipeline": "WanPipeline", "text_encoders": {"text_encoder": "UMT5EncoderModel"}, "vae": "AutoencoderKLWan"}
    manifest = json.loads((art / "manifest.json").read_text())
    comp = manifest["components"]
    assert comp["pipeline"] == "WanPipeline" and comp["negative_prompt"] == NEGATIVE
    enc = comp["text_encoders"]["text_encoder"]
    assert enc["kind"] == "umt5" and enc["class"] == "UMT5EncoderModel" and enc["max_length"] == 16
    assert comp["vae"]["kind"] == "wan"
    for rel in (enc["weights"], comp["vae"]["weights"], enc["tokenizer"] + "/tokenizer.json"):
        assert rel in manifest["files"], rel  # hashed like the transformer's weights
    assert [(p["name"], p["latent_shape"]) for p in manifest["profiles"]] == [
        ("16x16x9", [16, 3, 2, 2]), ("32x16x5", [16, 2, 4, 2])]


def test_generate_and_decode_equal_the_pipeline(wan):
    import diffusers

    import ditbake.runtime as dr

    model, art, _ = wan
    session = dr.load(art)
    pipe = diffusers.WanPipeline.from_pretrained(model, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    embeds, negative = pipe.encode_prompt(PROMPT, NEGATIVE, max_sequence_length=16)
    mine = session.encode_prompt([PROMPT])
    diff = (mine - embeds).abs().max().item()
    assert diff < 1e-5, f"prompt embeddings differ from WanPipeline.encode_prompt by {diff:.2e}"
    for height, width, frames in ((16, 16, 9), (32, 16, 5)):
        profile = f"{height}x{width}x{frames}"
        result = session.generate(prompt=PROMPT, negative_prompt=NEGATIVE, seed=7, guidance_scale=5.0, profile=profile)
        got = session.decode(result.latents)  # [B, F, H, W, 3]
        ref = pipe(PROMPT, NEGATIVE, height=height, width=width, num_frames=frames, num_inference_steps=2,
                   guidance_scale=5.0, max_sequence_length=16, output_type="pt",
                   generator=torch.Generator().manual_seed(7)).frames  # [B, F, 3, H, W]
        ref = ref.permute(0, 1, 3, 4, 2)
        assert got.shape == ref.shape == (1, frames, height, width, 3)
        diff = (got - ref).abs().max().item()
        assert diff < 1e-5, f"{profile}: decoded frames differ from WanPipeline's by {diff:.2e}"
    # the default negative prompt is the one the artifact was built with
    torch.testing.assert_close(session.generate(prompt=PROMPT, seed=7, guidance_scale=5.0).latents,
                               session.generate(prompt=PROMPT, negative_prompt=NEGATIVE, seed=7).latents)


def test_run_writes_every_sample_as_mp4_and_latents(wan, tmp_path):
    import av
    from safetensors.torch import load_file

    _, art, _ = wan
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a cat walks on the beach\n\na dog jumps into a lake\n")
    assert main(["run", str(art), "--prompt", str(prompts), "--height", "32", "--width", "16", "--frames", "5",
                 "--output", str(tmp_path / "clip.mp4"), "--seed", "1"]) == 0
    for i in range(2):
        with av.open(str(tmp_path / f"clip_{i:03d}.mp4")) as container:
            frames = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
        assert len(frames) == 5 and frames[0].shape == (32, 16, 3)
        latents = load_file(str(tmp_path / f"clip_{i:03d}.latents.safetensors"))["latents"]
        assert latents.shape == (16, 2, 4, 2)
    a = load_file(str(tmp_path / "clip_000.latents.safetensors"))["latents"]
    b = load_file(str(tmp_path / "clip_001.latents.safetensors"))["latents"]
    assert not torch.allclose(a, b)  # two prompts, two samples
    assert main(["run", str(art), "--prompt", PROMPT, "--frames", "7", "--output", str(tmp_path / "x.mp4")]) == 5
    assert main(["run", str(art), "--prompt", PROMPT, "--output", str(tmp_path / "x.gif")]) == 5


def _build(model, root, profile, sampler, extra=()):
    cal, plan, art = root / "cal", root / "plan.json", root / "art"
    assert main(["calibrate", "--model", str(model), "--out", str(cal), "--prompts", "a cat walks on the beach",
                 "--profile", profile, "--steps", "2", "--sampler", sampler, *extra]) == 0
    assert main(["plan", "--calibration", str(cal), "--out", str(plan)]) == 0
    assert main(["build", "--model", str(model), "--plan", str(plan), "--calibration", str(cal), "--out", str(art),
                 "--dtype", "float32"]) == 0
    return art


def test_cogvideox_pipeline_end_to_end(tmp_path):
    """CogVideoX: T5 without a mask (as its pipeline), frames-first latents, DDIM, VAE /scaling_factor."""
    import diffusers

    import ditbake.runtime as dr
    from tests.pipelines import cogvideox_pipeline

    model = cogvideox_pipeline(tmp_path / "pipe")
    art = _build(model, tmp_path, "16x16x9", "ddim")
    session = dr.load(art)
    pipe = diffusers.CogVideoXPipeline.from_pretrained(model, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    embeds, _ = pipe.encode_prompt(PROMPT, NEGATIVE, max_sequence_length=16)
    diff = (session.encode_prompt([PROMPT]) - embeds).abs().max().item()
    assert diff < 1e-5, f"prompt embeddings differ from CogVideoXPipeline.encode_prompt by {diff:.2e}"
    got = session.decode(session.generate(prompt=PROMPT, negative_prompt=NEGATIVE, seed=3, guidance_scale=6.0).latents)
    ref = pipe(PROMPT, NEGATIVE, height=16, width=16, num_frames=9, num_inference_steps=2, guidance_scale=6.0,
               max_sequence_length=16, output_type="pt", generator=torch.Generator().manual_seed(3)).frames
    ref = ref.permute(0, 1, 3, 4, 2)
    assert got.shape == ref.shape == (1, 9, 16, 16, 3)
    diff = (got - ref).abs().max().item()
    assert diff < 1e-5, f"decoded frames differ from CogVideoXPipeline's by {diff:.2e}"


def test_sd3_pipeline_end_to_end(tmp_path):
    """SD3: CLIP-L + CLIP-G penultimate states beside T5 tokens, the real pooled vector (both CLIPs'
    projections, 32-d, not the token mean), flow-match Euler, VAE /scaling + shift."""
    import diffusers

    import ditbake.runtime as dr
    from tests.pipelines import sd3_pipeline

    model = sd3_pipeline(tmp_path / "pipe")
    art = _build(model, tmp_path, "16x16", "flow_euler", ("--text-len", str(77 + 8)))
    session = dr.load(art)
    pipe = diffusers.StableDiffusion3Pipeline.from_pretrained(model, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    got = session.decode(session.generate(prompt=PROMPT, negative_prompt=NEGATIVE, seed=5, guidance_scale=5.0).latents)
    ref = pipe(PROMPT, negative_prompt=NEGATIVE, height=16, width=16, num_inference_steps=2, guidance_scale=5.0,
               max_sequence_length=8, output_type="pt", generator=torch.Generator().manual_seed(5)).images
    ref = ref[:, None].permute(0, 1, 3, 4, 2)  # an image: one frame
    assert got.shape == ref.shape == (1, 1, 16, 16, 3)
    diff = (got - ref).abs().max().item()
    assert diff < 1e-5, f"decoded image differs from StableDiffusion3Pipeline's by {diff:.2e}"


def test_flux_pipeline_end_to_end(tmp_path):
    """Flux (guidance-distilled, dynamic shift): T5 tokens + CLIP pooled, guidance embedding 3.5, no
    CFG (the pipeline's default true_cfg_scale 1), shift resolved for the 16×16 profile, unpacked latents."""
    import diffusers

    import ditbake.runtime as dr
    from tests.pipelines import flux_pipeline

    model = flux_pipeline(tmp_path / "pipe")
    art = _build(model, tmp_path, "16x16", "flow_euler", ("--text-len", "8"))  # CFG off: the pipeline's default
    assert json.loads((tmp_path / "cal" / "calibration.json").read_text())["guidance_scale"] == 1.0
    session = dr.load(art)
    pipe = diffusers.FluxPipeline.from_pretrained(model, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    got = session.decode(session.generate(prompt=PROMPT, seed=5, guidance_scale=1.0, guidance=3.5).latents)
    ref = pipe(PROMPT, height=16, width=16, num_inference_steps=2, guidance_scale=3.5, max_sequence_length=8,
               output_type="pt", generator=torch.Generator().manual_seed(5)).images
    ref = ref[:, None].permute(0, 1, 3, 4, 2)
    assert got.shape == ref.shape == (1, 1, 16, 16, 3)
    diff = (got - ref).abs().max().item()
    assert diff < 1e-5, f"decoded image differs from FluxPipeline's by {diff:.2e}"
