"""Compiled component engines: `build --backend aoti` from a pipeline directory compiles the text
encoder and the VAE decoder (per profile) into AOTInductor packages of the artifact, hashed in the
manifest; the runtime runs them instead of the eager modules, and their outputs equal the eager
modules'.

Tolerance: the engines are the runtime's own fp32 encoder/decoder code compiled by Inductor, which
fuses and reorders fp32 reductions (layer/group/RMS norms, matmuls, softmax): a few ulps per op;
rtol 1e-5 (atol 1e-6 for values near zero) allows that (the tests pass there) and still fails for
any wrong weight, mask or layout (differences of order 1e-1).
"""
import json
import shutil

import pytest
import torch

from ditbake.exporter.cli import main
from ditbake.runtime import ArtifactError, load
from tests.pipelines import wan_pipeline

pytestmark = pytest.mark.slow  # one AOTInductor build (5 engines): ~2 min of CPU on the shared 2 cores

PROMPTS = ["a red fox running through snow at dawn", "waves"]  # two lengths: the padding mask matters
RTOL, ATOL = 1e-5, 1e-6


@pytest.fixture(scope="module")
def wan(tmp_path_factory):
    """One Wan pipeline, one calibration and plan, built eager and aoti (compiled once per session)."""
    root = tmp_path_factory.mktemp("wan-components")
    model = wan_pipeline(root / "pipe")
    cal, plan = root / "cal", root / "plan.json"
    assert main(["calibrate", "--model", str(model), "--out", str(cal), "--prompts", "a cat walks on the beach",
                 "--profile", "16x16x9", "--text-len", "16", "--steps", "2", "--sampler", "unipc"]) == 0
    assert main(["plan", "--calibration", str(cal), "--out", str(plan)]) == 0
    arts = {}
    for backend in ("eager", "aoti"):
        arts[backend] = root / backend
        assert main(["build", "--model", str(model), "--plan", str(plan), "--calibration", str(cal),
                     "--out", str(arts[backend]), "--dtype", "float32", "--profile", "16x16x9",
                     "--backend", backend]) == 0
    return arts


def test_manifest_lists_hashed_component_engines(wan):
    manifest = json.loads((wan["aoti"] / "manifest.json").read_text())
    engines = {e["key"]: e for e in manifest["components"]["engines"]}
    profile = manifest["profiles"][0]["name"]
    assert set(engines) == {"text_encoder", f"vae-{profile}"}
    for e in engines.values():
        assert e["file"].startswith("components/engines/") and e["file"].endswith(".pt2")
        assert manifest["files"][e["file"]]["sha256"] == e["sha256"]
    assert engines["text_encoder"]["input_shape"] == [1, 16]
    assert engines[f"vae-{profile}"]["input_shape"] == [1, *manifest["profiles"][0]["latent_shape"]]
    assert "components" not in json.dumps(manifest["engines"])  # block engines stay separate


def test_compiled_components_equal_eager(wan, monkeypatch):
    aoti, eager = load(wan["aoti"], backend="aoti"), load(wan["eager"])
    a, e = aoti.components, eager.components
    assert e.engines is None and set(a.engines.engines) == {"text_encoder", f"vae-{aoti.profile().name}"}
    ref_text, _ = e.encode(PROMPTS)
    latents = torch.randn(2, *aoti.profile().latent_shape)
    ref_frames = e.decode(latents)
    # the eager modules must not run on the aoti side: make them fail there
    from ditbake.runtime import text_t5, vae_wan

    def refuse(*args, **kwargs):
        raise AssertionError("the eager module ran instead of the compiled engine")

    monkeypatch.setattr(text_t5, "encode", refuse)
    monkeypatch.setattr(vae_wan, "decode", refuse)
    got_text, _ = a.encode(PROMPTS)
    got_frames = a.decode(latents)
    assert ref_text.abs().max() > 0.1 and (ref_text[1, -1] == 0).all()  # rows past "waves" are zeroed
    torch.testing.assert_close(got_text, ref_text, rtol=RTOL, atol=ATOL)
    assert got_frames.shape == ref_frames.shape == (2, 9, 16, 16, 3)
    torch.testing.assert_close(got_frames, ref_frames, rtol=RTOL, atol=ATOL)


def test_unbuilt_shape_falls_back_to_eager(wan):
    """Latents of no profile (here 1 latent frame) decode with the eager module, same result."""
    aoti, eager = load(wan["aoti"], backend="aoti"), load(wan["eager"])
    latents = torch.randn(1, 16, 1, 2, 2)
    torch.testing.assert_close(aoti.components.decode(latents), eager.components.decode(latents))


def test_tampered_component_engine_refused(wan, tmp_path):
    dst = tmp_path / "t"
    shutil.copytree(wan["aoti"], dst)
    engine = next((dst / "components" / "engines").glob("vae-*.pt2"))
    data = bytearray(engine.read_bytes())
    data[len(data) // 2] ^= 0xFF
    engine.write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match="sha256 mismatch for components/engines/vae-"):
        load(dst, backend="aoti")


def test_unlisted_component_engine_refused(wan, tmp_path):
    """A components.engines entry naming a file the manifest does not hash is refused at load."""
    dst = tmp_path / "u"
    shutil.copytree(wan["aoti"], dst)
    manifest = json.loads((dst / "manifest.json").read_text())
    manifest["components"]["engines"][0]["file"] = "components/engines/other.pt2"
    (dst / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ArtifactError, match="not listed"):
        load(dst, backend="aoti")
