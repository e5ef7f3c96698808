"""Dense 8-bit attention (plugins/attention_8bit_dense.py): the op's CPU path is attention_8bit's
specification with every head full, its checks, export as one node; on the GPU the kernel against the
reference and fp64 attention (ragged lengths: the padded-key correction), against the general 8-bit
kernel, its load variants, and under torch.compile."""
import logging

import pytest
import torch

from ditbake.plugins import attention_8bit as a8
from ditbake.plugins import attention_8bit_dense as dense
from ditbake.plugins import head_attention as ha
from ditbake.plugins.head_attention import HeadAttentionError, HeadScheme

from test_attention_8bit import peaky_qkv, rel_err

logger = logging.getLogger(__name__)


def full_table(heads: int, device="cpu") -> torch.Tensor:
    return ha.schemes_to_tensor([HeadScheme.full()] * heads).to(device)


# ------------------------------------------------------------------ CPU: the op's specification and checks

@pytest.mark.parametrize("seq_len,head_dim,scale", [(130, 64, None), (77, 128, 0.05)])
def test_cpu_op_is_the_reference_with_every_head_full(seq_len, head_dim, scale, rng_seed):
    q, k, v = peaky_qkv(2, 3, seq_len, head_dim)
    got = torch.ops.ditbake.attention_8bit_dense(q, k, v, scale)
    want = a8.attention_8bit_ref(q, k, v, full_table(3), (0, 0), None, scale, "int8")
    assert got.dtype == q.dtype and torch.equal(got, want)
    # and that specification is INT8 attention: close to fp64 attention, within the reference's bound
    exact = ha.head_attention_ref(q.double(), k.double(), v.double(), full_table(3), (0, 0), None, scale)
    assert rel_err(got, exact) < 0.05, f"seed {rng_seed}"


@pytest.mark.parametrize("bad", ["shape", "rank", "scale", "dtype"])
def test_cpu_op_refuses_malformed_input(bad):
    q, k, v = (torch.randn(1, 2, 40, 64, dtype=torch.bfloat16) for _ in range(3))
    args = {"shape": (q, k[:, :1], v, None), "rank": (q[0], k[0], v[0], None), "scale": (q, k, v, -1.0),
            "dtype": (q, k.float(), v, None)}[bad]
    with pytest.raises(HeadAttentionError):
        torch.ops.ditbake.attention_8bit_dense(*args)


def test_cpu_export_keeps_one_node():
    q, k, v = (torch.randn(1, 2, 40, 64) for _ in range(3))

    class Layer(torch.nn.Module):
        def forward(self, q, k, v):
            return torch.ops.ditbake.attention_8bit_dense(q, k, v, None) * 2

    graph = torch.export.export(Layer(), (q, k, v)).graph
    assert [n.target for n in graph.nodes if n.op == "call_function"].count(
        torch.ops.ditbake.attention_8bit_dense.default) == 1


def test_cpu_op_under_torch_compile_is_eager(uncached_inductor, rng_seed):
    """torch.compile inlines a triton_op's body, not its registered CPU kernel: off CUDA the body must
    call the reference (an opaque op), or the compiled graph returns uninitialized memory. Exact: the
    compiled graph calls the same reference on the same tensors. The output is the [B, H, S, D] view
    of token-major memory on every path, so the compiled graph's layout (the fake's) is eager's."""
    q, k, v = peaky_qkv(2, 3, 130, 64)

    def layer(q, k, v):
        return torch.ops.ditbake.attention_8bit_dense(q, k, v, 0.1)

    eager = layer(q, k, v)
    compiled = torch.compile(layer, fullgraph=True)(q, k, v)
    torch.testing.assert_close(compiled, eager, rtol=0, atol=0)
    assert eager.transpose(1, 2).is_contiguous() and compiled.stride() == eager.stride()


def test_kernel_supports_is_false_off_the_gpu():
    assert not dense.kernel_supports(torch.randn(1, 2, 40, 128, dtype=torch.bfloat16))


# ------------------------------------------------------------------ GPU

needs_sm90 = pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.get_device_capability()[0] < 9,
                                reason="the dense kernel needs an sm_90+ GPU")

# lengths around the 128-key tile: a full last tile, one real key in it, one padded key
GPU_LENGTHS = [(1, 12, 32760, 128), (2, 3, 4096, 128), (1, 2, 4097, 128), (1, 2, 4223, 128), (1, 24, 16896, 128)]


@pytest.mark.gpu
@needs_sm90
@pytest.mark.parametrize("batch,heads,seq_len,head_dim", GPU_LENGTHS)
def test_gpu_kernel_matches_reference_and_general_kernel(batch, heads, seq_len, head_dim, rng_seed):
    q, k, v = peaky_qkv(batch, heads, seq_len, head_dim, device="cuda")
    checked = slice(0, min(heads, 2))  # fp64 on two heads keeps the test short
    qs, ks, vs = (t[:, checked] for t in (q, k, v))
    exact = ha.head_attention_ref(qs.double(), ks.double(), vs.double(), full_table(qs.shape[1]), (0, 0))
    ref = a8.attention_8bit_ref(qs, ks, vs, full_table(qs.shape[1]), (0, 0), None, None, "int8")
    general = torch.ops.ditbake.attention_8bit(q, k, v, full_table(heads, "cuda"), 0, 0, None, None, "int8")
    for attempt in range(2):  # twice: a moving result would mean a race
        out = torch.ops.ditbake.attention_8bit_dense(q, k, v, None)
        assert not out.isnan().any(), f"seed {rng_seed}: NaN"
        kernel_err, ref_err = rel_err(out[:, checked], exact), rel_err(ref, exact)
        logger.info("S=%d: dense %.3e, reference %.3e, vs general kernel %.3e", seq_len, kernel_err, ref_err,
                    rel_err(out, general))
        assert kernel_err < 1.3 * ref_err + 0.01, f"seed {rng_seed}: {kernel_err:.3e} vs {ref_err:.3e}"
        # the same specification and buffers; the kernels differ in where p is rounded (the running
        # max of a 128- vs 64/128-key tile), one FP8 step on a few p: far below the 8-bit error itself
        assert rel_err(out, general) < 5e-3, f"seed {rng_seed}"


@pytest.mark.gpu
@needs_sm90
def test_gpu_padded_keys_are_taken_out_exactly(rng_seed):
    """Peaky rows whose whole mass sits on one key: a wrong row-sum correction for the padded keys of
    the last tile (127 of them at S = 4097) would scale those rows visibly."""
    q, k, v = peaky_qkv(1, 2, 4097, 128, device="cuda")
    k[:, :, -1] = q[:, :, 5] * 4  # the last key (alone in its tile) dominates row 5
    out = torch.ops.ditbake.attention_8bit_dense(q, k, v, None)
    exact = ha.head_attention_ref(q.double(), k.double(), v.double(), full_table(2), (0, 0))
    assert rel_err(out[:, :, 5], exact[:, :, 5]) < 0.05, f"seed {rng_seed}"


@pytest.mark.gpu
@needs_sm90
def test_gpu_load_variants_agree_bit_for_bit(rng_seed):
    q, k, v = peaky_qkv(1, 3, 5000, 128, device="cuda")
    qz = a8.prepare_8bit(q, k, v, None, "int8", v_transposed=True)
    dense.install_allocator()
    outs = []
    for loads in dense.LOADS:
        cfg = dict(dense.DENSE_CONFIGS[128], LOADS=loads)
        outs.append(dense.launch_attention_8bit_dense(qz, 5000, torch.empty_like(q), config=cfg))
    assert all(torch.equal(outs[0], o) for o in outs[1:])


@pytest.mark.gpu
@needs_sm90
def test_gpu_op_writes_tokens_as_rows(rng_seed):
    """The op's output is the [B, H, S, D] view of a contiguous [B, S, H, D] (the output projection then
    flattens heads without a copy), with the values of a contiguous launch."""
    q, k, v = peaky_qkv(2, 3, 700, 128, device="cuda")
    out = torch.ops.ditbake.attention_8bit_dense(q, k, v, None)
    assert out.shape == q.shape and out.transpose(1, 2).is_contiguous()
    contiguous = torch.empty_like(q)
    dense.launch_attention_8bit_dense(a8.prepare_8bit(q, k, v, None, "int8", v_transposed=True), 700, contiguous)
    assert torch.equal(out, contiguous)


@pytest.mark.gpu
@needs_sm90
def test_gpu_bad_tile_is_a_typed_error():
    q, k, v = peaky_qkv(1, 1, 300, 128, device="cuda")
    qz = a8.prepare_8bit(q, k, v, None, "int8", v_transposed=True)
    with pytest.raises(HeadAttentionError):
        dense.launch_attention_8bit_dense(qz, 300, torch.empty_like(q), config=dict(dense.DENSE_CONFIGS[128], BLOCK_N=96))
    with pytest.raises(HeadAttentionError):
        dense.launch_attention_8bit_dense(qz, 300, torch.empty_like(q), config=dict(dense.DENSE_CONFIGS[128], LOADS="tmem"))
    with pytest.raises(HeadAttentionError):  # FP8 QK buffers are not this kernel's
        qz8 = a8.prepare_8bit(q, k, v, None, "fp8", v_transposed=True)
        dense.launch_attention_8bit_dense(qz8, 300, torch.empty_like(q))


AOTI_CHECK = """
import sys, torch
from ditbake.plugins import attention_8bit_dense as dense
from ditbake.plugins.native_loading import promote_libstdcxx

promote_libstdcxx()  # as the runtime does before loading an engine (else any package crashes on load)

dense.DENSE_CONFIGS[128] = dict(dense.DENSE_CONFIGS[128], LOADS=sys.argv[2])
if len(sys.argv) > 3:  # a register cap: eager launches apply it; Inductor drops it (notes, session 10)
    dense.DENSE_CONFIGS[128]["maxnreg"] = int(sys.argv[3])

class Layer(torch.nn.Module):
    def forward(self, q, k, v):
        return torch.ops.ditbake.attention_8bit_dense(q, k, v, None) * 2

torch.manual_seed(4)
args = tuple(torch.randn(1, 3, 1030, 128, device="cuda", dtype=torch.bfloat16) for _ in range(3))
with torch.no_grad():
    want = Layer()(*args)
    torch.testing.assert_close(torch.compile(Layer(), fullgraph=True)(*args), want, rtol=0, atol=0)
    ep = torch.export.export(Layer(), args)
    loaded = torch._inductor.aoti_load_package(torch._inductor.aoti_compile_and_package(ep, package_path=sys.argv[1]))
    torch.testing.assert_close(loaded(*args), want, rtol=0, atol=0)
    fresh = tuple(torch.randn_like(a) for a in args)
    torch.testing.assert_close(loaded(*fresh), Layer()(*fresh), rtol=0, atol=0)
"""


def _run_aoti_check(tmp_path, loads: str):
    import subprocess  # noqa: PLC0415
    import sys  # noqa: PLC0415

    return subprocess.run([sys.executable, "-c", AOTI_CHECK, str(tmp_path / "dense.pt2"), *loads.split()],
                          capture_output=True, text=True, timeout=600)


@pytest.mark.gpu
@needs_sm90
@pytest.mark.parametrize("loads", ["block_ptr", "block_ptr 168"])
def test_gpu_op_under_compile_and_in_an_aoti_package(loads, tmp_path):
    """The runtime ships this op inside aoti engines: torch.compile and an AOTInductor package must run
    it bit for bit as eager (default loads, and with a register cap passed as a launch option, which must
    not break compilation; Inductor does not apply it to the package's cubin). A subprocess keeps the config
    change out of this session."""
    proc = _run_aoti_check(tmp_path, loads)
    assert proc.returncode == 0, proc.stderr[-3000:]


# How each TMA variant failed under Inductor on torch 2.11 + Triton 3.6 (H200, 2026-11-26)
TMA_UNDER_INDUCTOR = {"tma": "Tensor-likes are not equal",  # device-side descriptors: rows of inf
                      "host_tma": "not supported between instances of 'TensorDescriptor'"}


@pytest.mark.gpu
@needs_sm90
@pytest.mark.parametrize("loads", sorted(TMA_UNDER_INDUCTOR))
def test_gpu_tma_loads_under_inductor(loads, tmp_path):
    """TMA loads are 10 % faster eagerly (7.9 vs 8.8 ms at Wan's shape) but fail under Inductor in the
    known ways above, so the runtime uses pointer loads. The day this passes, make TMA the default;
    a failure of another kind fails the test."""
    proc = _run_aoti_check(tmp_path, loads)
    if proc.returncode != 0 and TMA_UNDER_INDUCTOR[loads] in proc.stderr:
        pytest.xfail(f"{loads} loads under Inductor: {TMA_UNDER_INDUCTOR[loads]} (torch {torch.__version__})")
    assert proc.returncode == 0, proc.stderr[-3000:]
