"""Component engines of an image pipeline (SD3: CLIP-L/G with projections, T5, AutoencoderKL): the
aoti packages of the CLIP encoder (with the penultimate hidden state SD3 reads and the projected
pooled vector) and the KL decoder equal the eager runtime modules on fresh inputs; the tensorrt
backend's ONNX graphs of all four components pass onnx.checker and equal eager under onnx.reference.

Tolerance: fp32 compiled vs eager, the same ops reordered by Inductor / the ONNX optimizer: a few
ulps per op; rtol 1e-5 / atol 1e-6 for aoti, and the ONNX check's 1e-4 absolute
(engine_trt's, on outputs of magnitude ~1-4) — a wrong weight or mask gives differences of order 1e-1.
"""
import pytest
import torch

from ditbake.exporter.build_components import export_components
from ditbake.exporter.engine_components import compile_components
from ditbake.runtime import text_clip, vae_kl
from ditbake.runtime.artifact import Profile
from ditbake.runtime.components_engines import as_outputs
from ditbake.runtime.engines import promote_libstdcxx
from tests.pipelines import sd3_pipeline

TEXT_LEN = 77 + 8
PROFILE = Profile("16x16", (4, 16, 16), TEXT_LEN)


@pytest.fixture(scope="module")
def sd3(tmp_path_factory):
    root = tmp_path_factory.mktemp("sd3-components")
    model = sd3_pipeline(root / "pipe")
    out = root / "art"
    out.mkdir()
    section, _ = export_components(model, out, text_len=TEXT_LEN)
    return out, section


@pytest.mark.slow  # two AOTInductor compiles
def test_aoti_clip_and_kl_decoder_equal_eager(sd3):
    out, section = sd3
    only = dict(section, text_encoders={"text_encoder": section["text_encoders"]["text_encoder"]})
    entries = {e["key"]: e for e in compile_components(only, out, [PROFILE], backend="aoti", progress=False)}
    assert set(entries) == {"text_encoder", "vae-16x16"}
    clip = entries["text_encoder"]
    assert clip["outputs"] == ["last_hidden_state", "pooled", "hidden_states", "text_embeds"]
    assert clip["hidden_state_index"] == -2 and clip["input_shape"] == [1, 77]
    promote_libstdcxx()
    from safetensors.torch import load_file

    enc = section["text_encoders"]["text_encoder"]
    w = load_file(str(out / enc["weights"]))
    engine = torch._inductor.aoti_load_package(str(out / clip["file"]))
    ids = torch.randint(0, enc["config"]["vocab_size"], (1, 77))
    ids[0, 9] = enc["config"]["eos_token_id"]  # the pooled vector is read at the first end-of-text token
    mask = torch.ones(1, 77, dtype=torch.int64)
    got = as_outputs(engine(ids, mask, *[w[k] for k in clip["inputs"][2:]]))
    assert len(got) == len(clip["outputs"])
    ref = text_clip.encode(w, enc["config"], ids, mask, hidden_state_index=-2)
    for name, g in zip(clip["outputs"], got):
        torch.testing.assert_close(g, ref[name], rtol=1e-5, atol=1e-6)
    assert not torch.allclose(ref["hidden_states"], ref["last_hidden_state"])

    vae = entries["vae-16x16"]
    assert vae["input_shape"] == [1, 4, 16, 16]
    vw = load_file(str(out / section["vae"]["weights"]))
    engine = torch._inductor.aoti_load_package(str(out / vae["file"]))
    z = torch.randn(1, 4, 16, 16)
    (got,) = as_outputs(engine(z, *[vw[k] for k in vae["inputs"][1:]]))
    ref = vae_kl.decode(vw, section["vae"]["config"], z)
    assert got.shape == ref.shape == (1, 3, 32, 32)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-6)


def test_tensorrt_onnx_graphs_of_every_component_equal_eager(sd3):
    pytest.importorskip("onnx")  # the tensorrt-export extra
    pytest.importorskip("onnxscript")
    out, section = sd3
    entries = compile_components(section, out, [PROFILE], backend="tensorrt", progress=False, verify=True)
    assert sorted(e["key"] for e in entries) == ["text_encoder", "text_encoder_2", "text_encoder_3", "vae-16x16"]
    for e in entries:
        assert e["onnx_checked"] and (out / e["onnx"]).is_file()
        assert e["onnx_reference_max_abs_err"] <= 1e-4  # compile_components raised otherwise
