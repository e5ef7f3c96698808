"""The tensorrt backend: ONNX per engine, checked with onnx.checker and executed with onnx.reference
(+ Python implementations of the trt/plugin ops), matching the eager backend. Engine build and
run need TensorRT and a GPU and skip without them.

Tolerances: the tiny models run in fp32 and the ONNX graphs compute what the eager ops compute
(the NVFP4 / INT8 / FP8 quantizers are the spec's, in the same FP32 operations up to the order of
a few products), so graphs match to FP32 rounding (measured max |err| ~3e-7); 1e-4 leaves room
for summation order and would still catch a single flipped FP4 code (≥ ~1e-3 here).
"""
import json

import pytest
import torch

onnx = pytest.importorskip("onnx")  # the tensorrt-export extra
pytest.importorskip("onnxscript")

from ditbake.exporter import engine_trt, models
from ditbake.exporter.adapters import adapter_for
from ditbake.exporter.onnx_reference_ops import run as run_onnx
from ditbake.plugins.mixed_linear import prepare_nvfp4_weight
from ditbake.runtime import BackendError, load
from ditbake.runtime.artifact import Profile
from ditbake.runtime.attention import AttentionRunner
from ditbake.runtime.plan import BlockVariant, HeadScheme, Plan

ATOL = 1e-4
HADAMARD_LAYERS = ("attn1.to_q", "ffn.net.2")  # exercise the online rotation in the graph

BASELINE = BlockVariant()
PRECISION = BlockVariant(precisions=(("attn1.to_k", "int8"), ("attn1.to_q", "nvfp4"), ("attn2.to_v", "fp8"),
                                     ("ffn.net.0.proj", "nvfp4"), ("ffn.net.2", "int8")))
ARROW = BlockVariant(heads=(("attn1", (HeadScheme("arrow", 3, 5), HeadScheme("full"))),))


def _nvfp4_weights(weights: dict, arch) -> dict:
    """Add the NVFP4 copies of every block linear the way the artifact stores them."""
    out = dict(weights)
    for key in [k for k in weights if k.startswith(arch.BLOCK_PREFIX) and k.endswith(".weight")]:
        name = key[: -len(".weight")]
        if name.split(".", 2)[2] not in arch.BLOCK_LINEARS:
            continue
        hadamard = name.split(".", 2)[2] in HADAMARD_LAYERS
        t = prepare_nvfp4_weight(weights[key], hadamard=hadamard)
        out[name + ".nvfp4_packed"], out[name + ".nvfp4_block_scales"] = t.packed, t.block_scales
        out[name + ".nvfp4_global_scale"] = t.global_scale
        if hadamard:
            out[name + ".nvfp4_hadamard"] = torch.ones(1)
    return out


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """Baseline, precision (nvfp4 + int8 + fp8, with Hadamard) and arrow-heads variants of a tiny Wan,
    exported once (onnx-only here) and verified against eager inside compile_engines."""
    adapter = adapter_for(models.load("tiny-wan"))
    arch = adapter.arch
    weights = {k: v.contiguous() for k, v in adapter.weights().items()}
    profile = Profile("p0", tuple(adapter.latent_shape(3, 8, 8)), 8)
    weights.update(adapter.profile_tensors(profile.to_json()))
    weights = _nvfp4_weights(weights, arch)
    n = adapter.num_blocks
    plan = Plan(architecture=arch.NAME, num_blocks=n, linear_layers=tuple(adapter.linear_layers),
                attention_sites=tuple(sorted(adapter.attention_sites.items())),
                variants=(BASELINE, PRECISION, ARROW, BlockVariant(compute=False)),
                steps=({"cond": (0,) * n}, {"cond": (1, 2, 3)}))
    out = tmp_path_factory.mktemp("trt")
    entries = engine_trt.compile_engines(arch, adapter.config, weights, plan, [profile], out, progress=False,
                                         onnx_only=True, verify=True, atol=ATOL)
    return adapter, weights, plan, profile, out, entries


def test_one_checked_graph_per_engine(exported):
    _, _, _, _, out, entries = exported
    assert sorted((e["part"], e["variant"]) for e in entries) == [
        ("block", 0), ("block", 1), ("block", 2), ("epilogue", None), ("prologue", None)]  # no graph for skips
    for e in entries:
        model = onnx.load(str(out / e["onnx"]))
        onnx.checker.check_model(model, full_check=True)
        assert [i.name for i in model.graph.input] == e["inputs"]
        assert {o.domain: o.version for o in model.opset_import}[""] == 23
        assert e["file"] is None and e["onnx_reference_max_abs_err"] <= ATOL


def _nodes(out, entries, vid):
    entry = next(e for e in entries if e["variant"] == vid)
    return onnx.load(str(out / entry["onnx"]))


def test_precision_variant_uses_tensorrt_native_quantization(exported):
    _, _, _, _, out, entries = exported
    model = _nodes(out, entries, 1)
    ops = [(n.domain, n.op_type) for n in model.graph.node]
    assert ops.count(("trt", "TRT_FP4DynamicQuantize")) == 2  # attn1.to_q, ffn.net.0.proj
    fp4_inputs = {i.name for i in model.graph.input if i.type.tensor_type.elem_type == onnx.TensorProto.FLOAT4E2M1}
    assert "block.attn1.to_q.nvfp4_packed" in fp4_inputs
    blocked = [n for n in model.graph.node if n.op_type == "DequantizeLinear" and n.input[0] in fp4_inputs]
    assert len(blocked) == 5 and all({a.name: a.i for a in n.attribute}["block_size"] == 16 for n in blocked)
    int8 = [n for n in model.graph.node if n.op_type == "QuantizeLinear"
            and {a.name: a.i for a in n.attribute}.get("output_dtype") == onnx.TensorProto.INT8]
    assert len(int8) == 4  # activations and re-quantized weights of attn1.to_k and ffn.net.2
    baseline_ops = {(n.domain, n.op_type) for n in _nodes(out, entries, 0).graph.node}
    assert not any(op in baseline_ops for op in [("trt", "TRT_FP4DynamicQuantize"), ("", "DequantizeLinear")])


def test_arrow_variant_is_a_plugin_node(exported):
    _, _, _, _, out, entries = exported
    model = _nodes(out, entries, 2)
    plugin = [n for n in model.graph.node if n.op_type == "head_attention"]
    assert len(plugin) == 1 and plugin[0].domain == "ditbake"
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in plugin[0].attribute}
    assert attrs["plugin_namespace"] == b"ditbake" and attrs["plugin_version"] == b"1" and attrs["aot"] == 1
    assert (attrs["text_start"], attrs["text_end"]) == (0, 0)


def test_graph_chain_matches_eager_forward(exported):
    """prologue → blocks (block i's weights under block 0's input names) → epilogue in onnx.reference.

    Each stage fed the eager stage's input matches to FP32 rounding. Chained, an upstream ~1e-7
    difference can flip a quantizer's rounding decision (one INT8 or FP4 step of one activation,
    measured 1.1e-4 after the precision block), so the chained output gets 1e-3."""
    adapter, weights, plan, profile, out, entries = exported
    arch, config = adapter.arch, adapter.config
    graphs = {e["key"]: (onnx.load(str(out / e["onnx"])), e["inputs"]) for e in entries}
    x = torch.randn(1, *profile.latent_shape)
    t = torch.full((1,), 700.0)
    text = torch.randn(1, profile.text_len, 32)

    def args(key, *lead, block=None):
        names = graphs[key][1][len(lead):]
        prefix = f"{arch.BLOCK_PREFIX}{block}." if block is not None else ""
        return [*lead, *[weights[prefix + n.removeprefix("block.")] for n in names]]

    h, *ctx = run_onnx(graphs["prologue-p0"][0], args("prologue-p0", x, t, text))
    h_ref, ctx_ref = arch.prologue(weights, config, x, t, text, profile.to_json())
    torch.testing.assert_close(h, h_ref, rtol=0, atol=ATOL)
    ctx_ref_tensors = arch.pack_ctx(ctx_ref)
    for b, vid in enumerate((1, 2, 0)):
        key = f"block-v{vid}-p0"
        (staged,) = run_onnx(graphs[key][0], args(key, h_ref, *ctx_ref_tensors, block=b))
        (h,) = run_onnx(graphs[key][0], args(key, h, *ctx, block=b))
        h_ref = arch.block(weights, config, b, h_ref, ctx_ref, plan.variants[vid], AttentionRunner(), "cond")
        torch.testing.assert_close(staged, h_ref, rtol=0, atol=ATOL)
        torch.testing.assert_close(h, h_ref, rtol=0, atol=1e-3)
    (y,) = run_onnx(graphs["epilogue-p0"][0], args("epilogue-p0", h, *ctx))
    torch.testing.assert_close(y, arch.epilogue(weights, config, h_ref, ctx_ref), rtol=0, atol=1e-3)


def test_cached_heads_refused(exported):
    adapter, weights, plan, profile, out, _ = exported
    cached = BlockVariant(heads=(("attn1", (HeadScheme("cached"), HeadScheme("full"))),))
    bad = Plan(architecture=plan.architecture, num_blocks=plan.num_blocks, linear_layers=plan.linear_layers,
               attention_sites=plan.attention_sites, variants=(BASELINE, cached),
               steps=({"cond": (0, 0, 0)}, {"cond": (1, 0, 0)}))
    with pytest.raises(BackendError, match="cached heads"):
        engine_trt.compile_engines(adapter.arch, adapter.config, weights, bad, [profile], out / "bad",
                                   progress=False, onnx_only=True)


def test_8bit_attention_exports_as_plugin_nodes(exported, tmp_path):
    """INT8-QK / FP8 head-wise attention (ditbake::attention_8bit) becomes an `attention_8bit` plugin node,
    cuDNN's fp8t composite an `fp8t_attention` one; their references (the ops' CPU kernels, the
    specifications) reproduce the eager block."""
    adapter, weights, plan, profile, _, _ = exported
    eight = BlockVariant(heads=(("attn1", (HeadScheme("arrow", 3, 5, "int8"), HeadScheme("full", precision="fp8"))),))
    int8_plan = Plan(architecture=plan.architecture, num_blocks=plan.num_blocks, linear_layers=plan.linear_layers,
                     attention_sites=plan.attention_sites, variants=(BASELINE, eight),
                     steps=({"cond": (0,) * plan.num_blocks}, {"cond": (1,) * plan.num_blocks}))
    (tmp_path / "a8").mkdir()
    (tmp_path / "fp8t").mkdir()
    entries = engine_trt.compile_engines(adapter.arch, adapter.config, weights, int8_plan, [profile], tmp_path / "a8",
                                         progress=False, onnx_only=True, verify=True, atol=ATOL)
    entry = next(e for e in entries if e["variant"] == 1)
    assert entry["onnx_reference_max_abs_err"] <= ATOL
    model = onnx.load(str(tmp_path / "a8" / entry["onnx"]))
    onnx.checker.check_model(model, full_check=True)
    nodes = [n for n in model.graph.node if n.op_type == "attention_8bit"]
    assert len(nodes) == 2 and all(n.domain == "ditbake" for n in nodes)  # one per (scheme, precision) group
    attrs = [{a.name: onnx.helper.get_attribute_value(a) for a in n.attribute} for n in nodes]
    assert sorted(a["qk_format"] for a in attrs) == [b"fp8", b"int8"] and all(a["aot"] == 0 for a in attrs)
    # fp8t (cuDNN's FP8 SDPA): the whole composite is one `fp8t_attention` plugin node
    fp8t = BlockVariant(heads=(("attn1", (HeadScheme("full", precision="fp8t"), HeadScheme("full"))),))
    fp8t_plan = Plan(architecture=plan.architecture, num_blocks=plan.num_blocks, linear_layers=plan.linear_layers,
                     attention_sites=plan.attention_sites, variants=(BASELINE, fp8t),
                     steps=({"cond": (0,) * plan.num_blocks}, {"cond": (1,) * plan.num_blocks}))
    entries = engine_trt.compile_engines(adapter.arch, adapter.config, weights, fp8t_plan, [profile],
                                         tmp_path / "fp8t", progress=False, onnx_only=True, verify=True, atol=ATOL)
    entry = next(e for e in entries if e["variant"] == 1)
    assert entry["onnx_reference_max_abs_err"] <= ATOL
    model = onnx.load(str(tmp_path / "fp8t" / entry["onnx"]))
    onnx.checker.check_model(model, full_check=True)
    nodes = [n for n in model.graph.node if n.op_type == "fp8t_attention"]
    assert len(nodes) == 1 and nodes[0].domain == "ditbake"
    assert {a.name: onnx.helper.get_attribute_value(a) for a in nodes[0].attribute}["aot"] == 0


def test_fp8t_plugin_body_is_the_composite():
    from ditbake.plugins import trt_attention_8bit
    from ditbake.plugins.cudnn_sdpa import CudnnSdpaInputError, fp8t_attention_ref

    q, k, v = (torch.randn(1, 2, 12, 16) for _ in range(3))
    out = torch.empty_like(q)
    trt_attention_8bit.run_fp8t_plugin(q, k, v, 2, 3, 0.0, out)
    torch.testing.assert_close(out, fp8t_attention_ref(q, k, v, 2, 3), rtol=0, atol=0)
    with pytest.raises(CudnnSdpaInputError):  # q and k of different shapes: the op's typed check
        trt_attention_8bit.run_fp8t_plugin(q, k[..., :8], v, 2, 3, 0.0, out)


def test_8bit_attention_plugin_body_is_the_op():
    from ditbake.plugins import trt_attention_8bit
    from ditbake.plugins.attention_8bit import attention_8bit_ref
    from ditbake.plugins.head_attention import HeadScheme as KernelScheme, schemes_to_tensor

    q, k, v = (torch.randn(1, 2, 12, 16) for _ in range(3))
    table = schemes_to_tensor((KernelScheme.arrow(2, 3), KernelScheme.full()))
    out = torch.empty_like(q)
    trt_attention_8bit.run_plugin(q, k, v, table, 0, 0, 0.0, "int8", out)
    torch.testing.assert_close(out, attention_8bit_ref(q, k, v, table, (0, 0), None, None, "int8"), rtol=0, atol=0)


@pytest.mark.skipif(engine_trt.tensorrt_available(), reason="TensorRT is installed: engines are built")
def test_build_without_tensorrt(tmp_path):
    """No TensorRT: a plain build stops with the fix named and leaves nothing; --onnx-only ships the
    checked graphs, and the runtime refuses them by name."""
    from tests.conftest import build_tiny_artifact

    with pytest.raises(BackendError, match="--onnx-only"):
        build_tiny_artifact(tmp_path / "a", "tiny-wan", steps=2, backend="tensorrt")
    assert not (tmp_path / "a" / "tiny-wan").exists()

    from ditbake.exporter import build as builder
    from ditbake.exporter.planner import plan_from_calibration

    adapter = adapter_for(models.load("tiny-wan"))
    meta = {"architecture": "wan", "num_blocks": 3, "linear_layers": list(adapter.linear_layers),
            "attention_sites": adapter.attention_sites, "num_steps": 2, "branches": ["cond", "uncond"]}
    path = builder.build(adapter, plan_from_calibration(meta), tmp_path / "b",
                         profiles=[Profile("p0", tuple(adapter.latent_shape(3, 8, 8)), 8)], samplers=["flow_euler"],
                         dtype=torch.float32, backend="tensorrt", progress=False, onnx_only=True)
    manifest = json.loads((path / "manifest.json").read_text())
    assert manifest["backend"] == "tensorrt" and len(manifest["engines"]) == 3
    assert all(e["onnx"] in manifest["files"] and e["file"] is None for e in manifest["engines"])
    with pytest.raises(BackendError, match="ONNX graphs only"):
        load(path, backend="tensorrt")


def test_plugin_module_imports_without_tensorrt_and_kernel_compiles_ahead_of_time():
    from ditbake.plugins import trt_plugins

    assert trt_plugins.PLUGIN_ID == "ditbake::head_attention"
    if not trt_plugins.HAS_TRITON:
        pytest.skip("triton is not installed")
    compiled, _ = trt_plugins.compile_aot_kernel("bf16", 64, 0.125)  # PTX for sm_90, no GPU needed
    assert compiled.metadata.name == "_trt_head_attention_kernel" and ".entry" in compiled.asm["ptx"]


@pytest.mark.gpu
def test_tensorrt_engines_match_eager(tmp_path):
    """UNTESTED here (no TensorRT): build bf16 engines and run them against the eager backend."""
    pytest.importorskip("tensorrt")
    from tests.conftest import build_tiny_artifact

    trt_path, _ = build_tiny_artifact(tmp_path / "t", "tiny-wan", steps=3, dtype=torch.bfloat16, backend="tensorrt")
    eager_path, _ = build_tiny_artifact(tmp_path / "e", "tiny-wan", steps=3, dtype=torch.bfloat16)
    a, e = load(trt_path, device="cuda", backend="tensorrt"), load(eager_path, device="cuda")
    text = torch.randn(1, a.profile().text_len, 32)
    ra, re_ = a.generate(text, seed=1), e.generate(text, seed=1)
    torch.testing.assert_close(ra.latents, re_.latents, rtol=2e-2, atol=2e-2)  # bf16 engines vs bf16 eager


def test_w8a8_layers_export_as_dequantized_8bit_weights(tmp_path):
    """Layers stored with 8-bit weights (fp8 and int8, as the build stores W8A8 layers) export as
    DequantizeLinear of the weight input plus per-token Q/DQ, and match eager (verify=True)."""
    from ditbake.plugins.int8 import quantize_weight_per_channel

    adapter = adapter_for(models.load("tiny-wan"))
    arch = adapter.arch
    weights = {k: v.contiguous() for k, v in adapter.weights().items()}
    profile = Profile("p0", tuple(adapter.latent_shape(3, 8, 8)), 8)
    weights.update(adapter.profile_tensors(profile.to_json()))
    formats = {"attn1.to_q": "fp8", "ffn.net.0.proj": "fp8", "attn1.to_out.0": "int8"}
    for b in range(adapter.num_blocks):
        for name, fmt in formats.items():
            q, s = quantize_weight_per_channel(weights[f"blocks.{b}.{name}.weight"], fmt)
            weights[f"blocks.{b}.{name}.{fmt}_weight"], weights[f"blocks.{b}.{name}.{fmt}_scale"] = q, s
    variant = BlockVariant(precisions=tuple(sorted(formats.items())))
    n = adapter.num_blocks
    plan = Plan(architecture=arch.NAME, num_blocks=n, linear_layers=tuple(adapter.linear_layers),
                attention_sites=tuple(sorted(adapter.attention_sites.items())), variants=(variant,),
                steps=({"cond": (0,) * n},))
    entries = engine_trt.compile_engines(arch, adapter.config, weights, plan, [profile], tmp_path, progress=False,
                                         onnx_only=True, verify=True, atol=ATOL)
    model = _nodes(tmp_path, entries, 0)
    kinds = {i.name: i.type.tensor_type.elem_type for i in model.graph.input}
    assert kinds["block.attn1.to_q.fp8_weight"] == onnx.TensorProto.FLOAT8E4M3FN
    assert kinds["block.attn1.to_out.0.int8_weight"] == onnx.TensorProto.INT8
    weight_dq = [n for n in model.graph.node if n.op_type == "DequantizeLinear" and n.input[0].endswith("_weight")]
    assert len(weight_dq) == 3
    quantized = [n for n in model.graph.node if n.op_type == "QuantizeLinear"]
    assert len(quantized) == 3  # one per-token activation quantizer per W8A8 layer, none for weights
