"""8-bit head-wise attention: the reference against fp64 attention, its quantization rules, the op,
export, the error helper; the Triton kernels in the interpreter (opt-in) and on the GPU."""
import logging
import math
import os
import random

import pytest
import torch

from ditbake.plugins import attention_8bit as a8
from ditbake.plugins import head_attention as ha
from ditbake.plugins.head_attention import HeadAttentionError, HeadKind, HeadScheme

logger = logging.getLogger(__name__)

# FP8 E4M3 keeps 3 mantissa bits: a rounded value is within 2**-4 of the value, relatively, and the
# rounding error is ~uniform, rms 2**-4 / sqrt(3) = 3.6%. P and V are both rounded, independently,
# and on unstructured data the output is a sum over many keys of random sign, so its relative
# error is that of the rounded terms: ~2.6% each for P and V alone, ~3.7% together (measured at
# S=1024-2048; INT8 QK adds ~1.3% after the Hadamard rotation). Bounds keep ~1/3 margin; a wrong
# scale, mask, rotation or smoothing gives errors of order 1. FP8 QK is worse where scores are large
# (peaky): its error is relative per product, so big scores move by whole units (measured 8-9%).
FP8_STEP = 2.0 ** -4
ERROR_BOUND = {("gauss", "int8"): 0.05, ("gauss", "fp8"): 0.07, ("peaky", "int8"): 0.05, ("peaky", "fp8"): 0.13}


def rel_err(out, ref) -> float:
    return ((out.double() - ref.double()).norm() / ref.double().norm()).item()


def gaussian_qkv(batch, heads, seq_len, head_dim, dtype=torch.bfloat16, device="cpu"):
    return tuple(torch.randn(batch, heads, seq_len, head_dim, device=device).to(dtype) for _ in range(3))


def peaky_qkv(batch, heads, seq_len, head_dim, dtype=torch.bfloat16, device="cpu"):
    """Realistic trouble (SageAttention's motivation): a few outlier channels x10 in q and k and a
    large per-head offset in k, which per-block INT8 would spend its range on without smoothing."""
    q, k, v = (torch.randn(batch, heads, seq_len, head_dim, device=device) for _ in range(3))
    outliers = torch.randperm(head_dim, device=device)[:4]
    q[..., outliers] *= 10
    k[..., outliers] *= 10
    k += 3 * torch.randn(1, heads, 1, head_dim, device=device)
    return tuple(t.to(dtype) for t in (q, k, v))


INPUTS = {"gauss": gaussian_qkv, "peaky": peaky_qkv}


def text_range_for(layout, seq_len, text_tokens):
    return {"none": (0, 0), "first": (0, text_tokens), "last": (seq_len - text_tokens, seq_len)}[layout]


# ------------------------------------------------------------------ quantization rules

@pytest.mark.parametrize("qk_format", a8.QK_FORMATS)
def test_quantization_follows_the_rules(qk_format, rng_seed):
    q, k, v = peaky_qkv(2, 3, 300, 64, dtype=torch.float32)
    scale = 0.1
    qz = a8.quantize_qkv_ref(q, k, v, scale, qk_format)
    qmax = 127.0 if qk_format == "int8" else 448.0
    signs = sylvester(64)
    qr, kr = q.double() @ signs, k.double() @ signs
    torch.testing.assert_close(qz.k_mean.double(), kr.mean(dim=2), rtol=1e-5, atol=1e-4)
    ks = (kr - qz.k_mean[:, :, None]).float()
    # |x| beyond which fp32 rounds (the reference rotates and scales in fp32; k is rotated, rounded,
    # then centred, so its rounding follows |k H| <= |x| + |mean|)
    k_offset = qz.k_mean.abs()[:, :, None].float()
    for x, codes, scales, block, extra, offset in (
            (qr.float(), qz.q8, qz.q_scale, a8.QUANT_BLOCK_Q, scale * a8.LOG2E / 64, 0.0),
            (ks, qz.k8, qz.k_scale, a8.QUANT_BLOCK_K, 1.0, k_offset)):
        assert codes.dtype == (torch.int8 if qk_format == "int8" else torch.float8_e4m3fn)
        assert scales.shape == (2, 3, math.ceil(300 / block))
        step = (scales / extra).repeat_interleave(block, dim=-1)[..., :300, None]
        deq = codes.float() * step
        # every block reaches full scale (amax -> qmax) ...
        block_max = torch.nn.functional.pad(codes.float().abs(), (0, 0, 0, -300 % block)).unflatten(2, (-1, block))
        torch.testing.assert_close(block_max.amax(dim=(-1, -2)), torch.full_like(scales, qmax))
        # ... and each value is rounded to the nearest code
        if qk_format == "int8":
            # half a step, plus a few fp32 roundings (rotation, 1/step, x/step, code*step) of |x|
            assert ((deq - x).abs() <= 0.5 * step + 2.0 ** -21 * (x.abs() + offset)).all()
        else:
            assert ((deq - x).abs() <= FP8_STEP * x.abs() + step * 2.0 ** -10).all()
    v_step = (qz.v_amax / 448.0)[:, :, None]
    torch.testing.assert_close(qz.v_mean, v.mean(dim=2))
    vs = v - qz.v_mean[:, :, None]
    torch.testing.assert_close(qz.v_amax, vs.abs().amax(dim=2))
    assert ((qz.v8.float() * v_step - vs).abs() <= FP8_STEP * vs.abs() + v_step * 2.0 ** -10).all()


def test_int8_codes_round_half_to_even():
    # amax 127 makes the step exactly 1, so these values sit on ties.
    x = torch.tensor([127.0, 0.5, 1.5, 2.5, -0.5, -3.5] + [0.0] * 58).reshape(1, 1, 1, 64)
    codes, step = a8._quantize_blocks(x, a8.QUANT_BLOCK_Q, "int8")
    assert codes.flatten()[:6].tolist() == [127, 0, 2, 2, 0, -4] and step.item() == 1.0


def sylvester(n):
    """+-1 Hadamard matrix by the recursion H_2n = [[H, H], [H, -H]] (independent of the plugin's)."""
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h


def test_rotation_spreads_outlier_channels_and_keeps_scores():
    q, k, _ = peaky_qkv(1, 1, 256, 64, dtype=torch.float32)
    qr, kr = a8.rotate_ref(q), a8.rotate_ref(k)
    torch.testing.assert_close(qr.double(), q.double() @ sylvester(64), rtol=1e-6, atol=1e-5)
    torch.testing.assert_close((qr.double() @ kr.double().transpose(-1, -2)) / 64,
                               q.double() @ k.double().transpose(-1, -2), rtol=1e-5, atol=1e-3)
    # Per-channel spread: the largest channel rms over the mean channel rms shrinks.
    ratio = lambda x: (x.pow(2).mean(dim=2).sqrt().amax() / x.pow(2).mean(dim=2).sqrt().mean()).item()  # noqa: E731
    assert ratio(q) > 5 and ratio(qr) < 2


def test_k_smoothing_makes_a_key_offset_free(rng_seed):
    q, k, v = gaussian_qkv(1, 2, 256, 64, dtype=torch.float32)
    offset = 20 * torch.randn(1, 2, 1, 64)
    schemes = [HeadScheme.full(), HeadScheme.arrow(30, 10)]
    base = a8.attention_8bit_ref(q, k, v, schemes, (0, 16))
    shifted = a8.attention_8bit_ref(q, k + offset, v, schemes, (0, 16))
    exact = ha.head_attention_ref(q.double(), k.double(), v.double(), schemes, (0, 16))
    # Smoothing removes the offset up to fp32 rounding of k - mean; without it the offset would
    # take most of INT8's range (20 sigma) and the error would be of order 1.
    assert rel_err(shifted, base) < 0.25 * rel_err(base, exact)
    assert rel_err(shifted, exact) < 0.06


def test_v_smoothing_passes_a_value_offset_exactly(rng_seed):
    q, k, v = gaussian_qkv(1, 2, 256, 64, dtype=torch.float32)
    offset = 5 * torch.randn(1, 2, 1, 64)
    schemes = [HeadScheme.full(), HeadScheme.arrow(20, 30)]
    base = a8.attention_8bit_ref(q, k, v, schemes, (0, 16))
    shifted = a8.attention_8bit_ref(q, k, v + offset, schemes, (0, 16))
    # Only v - mean(v) is rounded, so the offset comes out exactly up to fp32 rounding of v + offset
    # (which can flip a rare code by one step); rounded with v, it would be off by up to 2**-4 of
    # itself, 30x this bound.
    torch.testing.assert_close(shifted - offset, base, rtol=0, atol=2e-3 * offset.abs().max().item())


# ------------------------------------------------------------------ reference vs fp64

@pytest.mark.parametrize("inputs", list(INPUTS))
@pytest.mark.parametrize("qk_format", a8.QK_FORMATS)
def test_reference_error_vs_fp64(inputs, qk_format, rng_seed):
    rng = random.Random(rng_seed)
    seq_len = 1024
    q, k, v = INPUTS[inputs](1, 3, seq_len, 64)
    cached = torch.randn_like(q)
    schemes = [HeadScheme.full(), HeadScheme.arrow(rng.randint(0, 300), rng.randint(0, 300)), HeadScheme.cached()]
    text_range = (0, 64)
    out = a8.attention_8bit_ref(q, k, v, schemes, text_range, cached, qk_format=qk_format)
    exact = ha.head_attention_ref(q.double(), k.double(), v.double(), schemes, text_range, cached.double())
    sdpa_like = ha.head_attention_ref(q, k, v, schemes, text_range, cached)  # fp32 math, bf16 output
    assert out.dtype == q.dtype and torch.equal(out[:, 2], cached[:, 2])
    for h in range(2):
        err, bf16_err = rel_err(out[:, h], exact[:, h]), rel_err(sdpa_like[:, h], exact[:, h])
        logger.info("%s %s head %d: 8-bit error %.2e, bf16 error %.2e", inputs, qk_format, h, err, bf16_err)
        assert err < ERROR_BOUND[inputs, qk_format], f"seed {rng_seed} head {h}: {err:.3e}"


def test_reference_row_sum_is_the_fp32_one():
    # Key 0 scores `scale` above 510 others (and key 1 `scale` below them): their p = 448 e^-scale
    # = 8.3e-4 is under half E4M3's smallest subnormal (2**-10), so they round to 0 in P.V, but
    # the row sum l keeps them in fp32: the output is v0 / (1 + 510 e^-scale + e^-2 scale), about
    # 0.9991 v0 -- not v0, which a row sum of the rounded P would give.
    seq_len, head_dim, scale = 512, 64, 13.2
    q, k = torch.zeros(1, 1, seq_len, head_dim), torch.zeros(1, 1, seq_len, head_dim)
    q[..., 0] = 1.0
    k[0, 0, 0, 0], k[0, 0, 1, 0] = 1.0, -1.0  # mean 0: smoothing changes nothing
    v = torch.randn(1, 1, seq_len, head_dim)
    out = a8.attention_8bit_ref(q, k, v, [HeadScheme.full()], (0, 0), scale=scale)
    qz = a8.quantize_qkv_ref(q, k, v, scale)
    v0 = qz.v8[0, 0, 0].double() * qz.v_amax[0, 0].double() / 448.0  # smoothed: v0 - mean
    expected = v0 / (1 + 510 * math.exp(-scale) + math.exp(-2 * scale)) + qz.v_mean[0, 0].double()
    torch.testing.assert_close(out[0, 0].double(), expected.expand(seq_len, -1), rtol=1e-5, atol=1e-7)


# ------------------------------------------------------------------ op, export, error helper

def test_op_cpu_matches_reference_and_exports(rng_seed):
    q, k, v, cached = (torch.randn(1, 3, 40, 64) for _ in range(4))
    table = ha.schemes_to_tensor([HeadScheme.full(), HeadScheme.arrow(3, 1), HeadScheme.cached()])
    out = torch.ops.ditbake.attention_8bit(q, k, v, table, 0, 4, cached, None, "fp8")
    torch.testing.assert_close(out, a8.attention_8bit_ref(q, k, v, table, (0, 4), cached, qk_format="fp8"))
    torch.testing.assert_close(a8.attention_8bit(q, k, v, table, (0, 4), cached, qk_format="fp8"), out)

    class Layer(torch.nn.Module):
        def forward(self, q, k, v, schemes, cached):
            return torch.ops.ditbake.attention_8bit(q, k, v, schemes, 0, 4, cached, None, "int8") * 2

    exported = torch.export.export(Layer(), (q, k, v, table, cached))
    assert "ditbake.attention_8bit" in str(exported.graph)
    torch.testing.assert_close(exported.module()(q, k, v, table, cached),
                               a8.attention_8bit_ref(q, k, v, table, (0, 4), cached) * 2)


@pytest.mark.parametrize("qk_format", a8.QK_FORMATS)
@pytest.mark.parametrize("text_range", [(0, 6), (34, 40)])
def test_op_under_torch_compile_on_cpu_is_eager(qk_format, text_range, uncached_inductor, rng_seed):
    """torch.compile inlines a triton_op's body, not its registered CPU kernel: off CUDA the body must
    call the reference (an opaque op), or the compiled graph returns uninitialized memory. Exact: the
    compiled graph calls the same reference on the same tensors, and doubling is exact in fp32."""
    q, k, v, cached = (torch.randn(2, 3, 40, 64) for _ in range(4))
    table = ha.schemes_to_tensor([HeadScheme.full(), HeadScheme.arrow(3, 1), HeadScheme.cached()])

    def layer(q, k, v, schemes, cached):
        return torch.ops.ditbake.attention_8bit(q, k, v, schemes, *text_range, cached, None, qk_format) * 2

    compiled = torch.compile(layer, fullgraph=True)(q, k, v, table, cached)
    torch.testing.assert_close(compiled, layer(q, k, v, table, cached), rtol=0, atol=0)


def test_export_keeps_one_op_node():
    """The tensorrt exporter translates the op node: export keeps it whole (the reference it calls off
    CUDA stays inside it)."""
    q, k, v = (torch.randn(1, 2, 40, 64) for _ in range(3))
    table = ha.schemes_to_tensor([HeadScheme.full(), HeadScheme.arrow(3, 1)])

    class Layer(torch.nn.Module):
        def forward(self, q, k, v, schemes):
            return torch.ops.ditbake.attention_8bit(q, k, v, schemes, 0, 4, None, None, "int8")

    targets = [n.target for n in torch.export.export(Layer(), (q, k, v, table)).graph.nodes if n.op == "call_function"]
    assert targets == [torch.ops.ditbake.attention_8bit.default]


def test_error_helper_per_head(rng_seed):
    q, k, v = peaky_qkv(2, 3, 200, 64, dtype=torch.float32)
    cached = torch.randn_like(q)
    schemes = [HeadScheme.full(), HeadScheme.cached(), HeadScheme.arrow(10, 40)]
    err = a8.attention_8bit_error(q, k, v, schemes, (0, 10), cached)
    out = a8.attention_8bit_ref(q, k, v, schemes, (0, 10), cached)
    ref = ha.head_attention_ref(q, k, v, schemes, (0, 10), cached)
    assert err.shape == (3,) and err.dtype == torch.float32 and err[1] == 0
    for h in (0, 2):
        expected = ((out[:, h] - ref[:, h]).pow(2).sum() / ref[:, h].pow(2).sum()).item()
        assert err[h].item() == pytest.approx(expected, rel=1e-4)
    given = a8.attention_8bit_error(q, k, v, schemes, (0, 10), cached, reference=ref * 1.1)
    assert given[0] > err[0]


def _qkv(shape=(1, 2, 10, 8)):
    return tuple(torch.randn(shape) for _ in range(3))


@pytest.mark.parametrize("call,fragment", [
    (lambda: a8.attention_8bit_ref(*_qkv(), [HeadScheme.full()] * 2, (0, 0), qk_format="int4"), "unknown qk_format"),
    (lambda: a8.attention_8bit_ref(*_qkv(), [HeadScheme.full()] * 3, (0, 0)), "3 head schemes for 2 heads"),
    (lambda: a8.attention_8bit_ref(*_qkv(), [HeadScheme.cached()] * 2, (0, 0)), "no cached output"),
    (lambda: a8.attention_8bit_ref(*_qkv(), [HeadScheme.full()] * 2, (2, 5)), "start or the end"),
    (lambda: a8.attention_8bit_ref(*_qkv(), [HeadScheme.full()] * 2, (0, 0), scale=0.0), "positive"),
    # the op checks its table as on CUDA on every device (its CPU path is its body, as compiled graphs run it)
    (lambda: torch.ops.ditbake.attention_8bit(*_qkv(), torch.zeros(2, 3), 0, 0), "int32 tensor [H, 3]"),
    (lambda: torch.ops.ditbake.attention_8bit(*_qkv(), torch.zeros(2, 3, dtype=torch.int32), 0, 0, None, None, "x"),
     "unknown qk_format"),
    (lambda: a8.attention_8bit_error(*_qkv(), [HeadScheme.full()] * 2, (0, 0), reference=torch.zeros(1)),
     "reference must have"),
])
def test_bad_inputs_raise_one_line_typed_errors(call, fragment):
    with pytest.raises(HeadAttentionError) as info:
        call()
    assert fragment in str(info.value) and "\n" not in str(info.value)


# ------------------------------------------------------------------ Triton interpreter (opt-in on CPU)

@pytest.fixture
def exact_interpreter():
    """The interpreter with its FP8 rounding and numpy >= 2.4 defects patched (see the module)."""
    from ditbake.plugins.triton_interpreter_fixes import exact_interpreter as fixes
    with fixes():
        yield


interpreter_only = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1" or not a8.HAS_TRITON,
                                      reason="set TRITON_INTERPRET=1 with triton installed to run the kernels on CPU")
TINY = dict(BLOCK_M=32, BLOCK_N=32, num_warps=1, num_stages=1)


@interpreter_only
@pytest.mark.parametrize("qk_format", a8.QK_FORMATS)
def test_prepare_kernel_in_interpreter_matches_reference(qk_format, exact_interpreter, rng_seed):
    q, k, v = peaky_qkv(1, 2, 200, 64, dtype=torch.float32)
    got = a8.prepare_8bit(q, k, v, None, qk_format, v_transposed=random.Random(rng_seed).random() < 0.5)
    want = a8.quantize_qkv_ref(q, k, v, None, qk_format)
    for name in ("q8", "k8", "v8"):
        g, w = getattr(got, name), getattr(want, name).float()
        assert (g[:, :, 200:].float() == 0).all(), f"{name}: padding must be zeros"
        differ = g[:, :, :200].float() != w
        # The rotation's and the means' sums run in another order than the reference's (1 ulp),
        # which can move a value across a rounding boundary.
        allowed = max(1, w.numel() // 1000)
        assert int(differ.sum()) <= allowed, f"{name}: {int(differ.sum())} codes differ"
    torch.testing.assert_close(got.q_scale[..., :2], want.q_scale, rtol=1e-6, atol=0)
    torch.testing.assert_close(got.k_scale[..., :want.k_scale.shape[-1]], want.k_scale, rtol=1e-6, atol=0)
    for name in ("v_amax", "v_mean", "k_mean"):  # fp32 sums in another order: ulps of the largest
        ref = getattr(want, name)
        torch.testing.assert_close(getattr(got, name), ref, rtol=1e-6, atol=1e-6 * ref.abs().max().item())


# Launch shapes of the prepare kernels: the first keeps the statistics' summation order (chunk, rows per
# load, warps) and must give the same bits; the others change it (means to ulps, a rare code differs).
PREPARE_VARIANTS = [dict(stats_split=True, quant_split=True, quant_warps=2),
                    dict(stats_chunk=128, stats_rows=32, stats_warps=8, stats_split=True, stats_reduce_once=True,
                         quant_split=False),
                    dict(stats_chunk=1024, stats_rows=64, stats_warps=4, stats_split=False, stats_reduce_once=False,
                         quant_split=False, quant_warps=8)]
SUM_ORDER_KEYS = ("stats_chunk", "stats_rows", "stats_warps", "stats_reduce_once")


def changes_sum_order(variant: dict) -> bool:
    return any(variant.get(key, a8.PREPARE_CONFIG[key]) != a8.PREPARE_CONFIG[key] for key in SUM_ORDER_KEYS)


def assert_prepared_agree(got, want, order_changed: bool) -> None:
    """Bit for bit (FP8 codes compared as bytes) -- unless the statistics sum in another fp32 order: then
    the means agree to ulps and a code may cross a rounding boundary."""
    for name in got._fields:
        g, w = getattr(got, name), getattr(want, name)
        if not order_changed:
            if g.dtype == torch.float8_e4m3fn:
                g, w = g.view(torch.uint8), w.view(torch.uint8)
            assert torch.equal(g, w), f"{name} differs between launch shapes"
        elif name.endswith("8"):
            differ = (g.float() != w.float()).float().mean().item()
            assert differ < 1e-3, f"{name}: {differ:.2e} of the codes differ between launch shapes"
        else:
            torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-6 * w.abs().max().item(), msg=name)


def test_prepare_rejects_unknown_config_keys():
    q = torch.randn(1, 1, 8, 64)
    with pytest.raises(HeadAttentionError, match="unknown prepare config keys"):
        a8.prepare_8bit(q, q, q, None, "int8", config={"stats_chunks": 128})


@interpreter_only
@pytest.mark.parametrize("variant", PREPARE_VARIANTS)
def test_prepare_launch_shapes_in_interpreter_agree(variant, exact_interpreter):
    q, k, v = peaky_qkv(1, 2, 300, 64, dtype=torch.float32)
    want = a8.prepare_8bit(q, k, v, None, "int8", v_transposed=True)
    got = a8.prepare_8bit(q, k, v, None, "int8", v_transposed=True, config=variant)
    assert_prepared_agree(got, want, changes_sum_order(variant))


@interpreter_only
@pytest.mark.parametrize("qk_format", a8.QK_FORMATS)
def test_kernel_in_interpreter_one_key_block_is_exact(qk_format, exact_interpreter, rng_seed):
    # With all keys in one block the online max is the final max: kernel == reference to fp32
    # (FP8 QK), or up to the rounding of the INT8 score conversion.
    q, k, v = peaky_qkv(1, 2, 60, 64, dtype=torch.float32)
    schemes = ha.schemes_to_tensor([HeadScheme.full()] * 2)
    out = torch.full_like(q, float("nan"))
    a8.attention_8bit_triton(q, k, v, schemes, 0, 0, None, None, qk_format, out,
                             config=dict(BLOCK_M=64, BLOCK_N=64, num_warps=1, num_stages=1))
    ref = a8.attention_8bit_ref(q, k, v, schemes, (0, 0), qk_format=qk_format)
    if qk_format == "fp8":
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    else:
        # INT8 scores leave the kernel through one FMA that also removes the int->float offset
        # 1.5 * 2**23: its rounding moves a score by <= 0.75 code units (the INT8 quantization
        # itself moves it by hundreds), which flips the E4M3 rounding of a few p: ~1e-3 overall.
        assert rel_err(out, ref) < 3e-3


@interpreter_only
@pytest.mark.parametrize("layout", ["none", "first", "last"])
def test_kernel_in_interpreter_mixed_heads(layout, exact_interpreter, rng_seed):
    rng = random.Random(rng_seed)
    seq_len, qk_format = rng.randint(150, 210), rng.choice(a8.QK_FORMATS)
    text_range = text_range_for(layout, seq_len, rng.randint(1, 40))
    schemes = ha.schemes_to_tensor([HeadScheme.full(), HeadScheme.cached(), HeadScheme.arrow(rng.randint(0, 60), 0),
                                    HeadScheme.arrow(rng.randint(0, 80), rng.randint(0, 80))])
    q, k, v = gaussian_qkv(1, 4, seq_len, 64, dtype=torch.float32)
    cached = torch.randn_like(q)
    out = torch.full_like(q, float("nan"))
    a8.attention_8bit_triton(q, k, v, schemes, *text_range, cached, None, qk_format, out, config=TINY)
    assert not out.isnan().any()
    assert torch.equal(out[:, 1], cached[:, 1])
    ref = a8.attention_8bit_ref(q, k, v, schemes, text_range, cached, qk_format=qk_format)
    exact = ha.head_attention_ref(q.double(), k.double(), v.double(), schemes, text_range, cached.double())
    for h in (0, 2, 3):
        # The kernel rounds p against the running max, the reference against the final one: the
        # same FP8 grid at other points, so they differ by about one rounding (<= ~3.6% rms) --
        # while a wrong mask or scale is off by tens of percent.
        kernel_err, ref_err = rel_err(out[:, h], exact[:, h]), rel_err(ref[:, h], exact[:, h])
        assert rel_err(out[:, h], ref[:, h]) < 0.04, (rng_seed, h, layout)
        assert kernel_err < 1.3 * ref_err + 0.01, (rng_seed, h, kernel_err, ref_err)


# ------------------------------------------------------------------ GPU

GPU_CASES = [  # (batch, heads, seq_len, head_dim, text layout, text tokens)
    (1, 12, 32760, 128, "none", 0),     # Wan2.1-1.3B self-attention
    (1, 4, 16896, 128, "first", 512),   # Flux 2048^2 (fewer heads to keep the fp64 check short)
    (2, 4, 4173, 64, "last", 77),       # text last, batch 2, ragged length, D=64
]


@pytest.mark.gpu
@pytest.mark.parametrize("batch,heads,seq_len,head_dim,layout,text_tokens", GPU_CASES)
@pytest.mark.parametrize("qk_format", a8.QK_FORMATS)
def test_gpu_kernel_matches_reference(batch, heads, seq_len, head_dim, layout, text_tokens, qk_format, rng_seed):
    rng = random.Random(rng_seed)
    text_range = ha.normalize_text_range(text_range_for(layout, seq_len, text_tokens), seq_len)
    visual = seq_len - (text_range[1] - text_range[0])
    schemes = [HeadScheme.full(), HeadScheme.cached(), HeadScheme.arrow(0, 0)]
    schemes += [HeadScheme.arrow(rng.randint(0, visual // 3), rng.randint(0, visual // 3)) for _ in range(heads - 3)]
    rng.shuffle(schemes)
    table = ha.schemes_to_tensor(schemes)
    q, k, v = peaky_qkv(batch, heads, seq_len, head_dim, device="cuda")
    cached = torch.randn_like(q)

    got = a8.prepare_8bit(q, k, v, None, qk_format)
    want = a8.quantize_qkv_ref(q, k, v, None, qk_format)
    for name in ("q8", "k8", "v8"):
        differ = (getattr(got, name)[:, :, :seq_len].float() != getattr(want, name).float()).float().mean().item()
        assert differ < 1e-3, f"{name}: {differ:.2e} of the codes differ from the reference"

    ref = a8.attention_8bit_ref(q, k, v, table, text_range, cached, qk_format=qk_format)
    exact = ha.head_attention_ref(q.double(), k.double(), v.double(), table, text_range, cached.double())
    for attempt in range(2):  # twice: a moving error would mean a race
        out = torch.full_like(q, float("nan"))
        out.copy_(a8.attention_8bit(q, k, v, table.cuda(), text_range, cached, qk_format=qk_format))
        assert not out.isnan().any(), f"seed {rng_seed}: NaN in the output"
        for h, s in enumerate(schemes):
            if s.kind == HeadKind.CACHED:
                assert torch.equal(out[:, h], cached[:, h])
                continue
            kernel_err, ref_err = rel_err(out[:, h], exact[:, h]), rel_err(ref[:, h], exact[:, h])
            logger.info("S=%d h=%d %s %s: kernel %.3e, reference %.3e, kernel vs reference %.3e",
                        seq_len, h, s, qk_format, kernel_err, ref_err, rel_err(out[:, h], ref[:, h]))
            assert kernel_err < 1.3 * ref_err + 0.01, f"seed {rng_seed} head {h}: {kernel_err:.3e} vs {ref_err:.3e}"


@pytest.mark.gpu
@pytest.mark.parametrize("variant", PREPARE_VARIANTS)
def test_gpu_prepare_launch_shapes_agree(variant, rng_seed):
    """Wan's layout as the forward passes it: q, k contiguous, v a [B, S, H, D] view."""
    q, k, _ = peaky_qkv(1, 12, 32760, 128, device="cuda")
    v = torch.randn(1, 32760, 12, 128, device="cuda", dtype=torch.bfloat16).transpose(1, 2)
    want = a8.prepare_8bit(q, k, v, None, "int8", v_transposed=True)
    got = a8.prepare_8bit(q, k, v, None, "int8", v_transposed=True, config=variant)
    assert_prepared_agree(got, want, changes_sum_order(variant))


@pytest.mark.gpu
def test_gpu_op_under_torch_compile_and_export(rng_seed):
    q, k, v, cached = (torch.randn(1, 3, 1030, 128, device="cuda", dtype=torch.bfloat16) for _ in range(4))
    table = ha.schemes_to_tensor([HeadScheme.full(), HeadScheme.arrow(100, 50), HeadScheme.cached()]).cuda()

    def layer(q, k, v, schemes, cached):
        return torch.ops.ditbake.attention_8bit(q, k, v, schemes, 0, 30, cached, None, "int8") * 2

    eager = layer(q, k, v, table, cached)
    compiled = torch.compile(layer, fullgraph=True)(q, k, v, table, cached)
    torch.testing.assert_close(compiled, eager)

    class Layer(torch.nn.Module):
        def forward(self, q, k, v, schemes, cached):
            return layer(q, k, v, schemes, cached)

    exported = torch.export.export(Layer(), (q, k, v, table, cached))
    assert "ditbake.attention_8bit" in str(exported.graph) or "triton_kernel_wrapper" in str(exported.graph)


@pytest.mark.gpu
def test_gpu_error_helper_runs_the_kernel(rng_seed):
    q, k, v = peaky_qkv(1, 3, 4096, 128, device="cuda")
    cached = torch.randn_like(q)
    schemes = [HeadScheme.full(), HeadScheme.cached(), HeadScheme.arrow(500, 200)]
    err = a8.attention_8bit_error(q, k, v, schemes, (0, 0), cached)
    out = a8.attention_8bit(q, k, v, schemes, (0, 0), cached).float()
    ref = ha.head_attention_ref(q.float(), k.float(), v.float(), schemes, (0, 0), cached.float())
    assert err[1] == 0
    for h in (0, 2):
        expected = ((out[:, h] - ref[:, h]).pow(2).sum() / ref[:, h].pow(2).sum()).item()
        assert err[h].item() == pytest.approx(expected, rel=1e-3)
        assert err[h].item() < 0.05 ** 2  # the INT8 bound of the CPU reference tests, squared
