"""Head-wise arrow attention: the reference against explicit masks, helpers, errors; GPU kernel checks."""
import logging
import math
import os
import random

import pytest
import torch

from ditbake.plugins import head_attention as ha
from ditbake.plugins.head_attention import HeadAttentionError, HeadKind, HeadScheme

logger = logging.getLogger(__name__)


# ------------------------------------------------------------------ independent oracle

def explicit_mask(kind, w_left, w_right, seq_len, text_range):
    """Boolean [S, S] mask written out token by token from the rule in words (no shared code)."""
    text = set(range(*text_range))
    visual = [t for t in range(seq_len) if t not in text]
    mask = torch.zeros(seq_len, seq_len, dtype=torch.bool)
    if kind == HeadKind.FULL:
        return mask | True
    for t in text:
        mask[t, :] = True
    for t in visual:
        mask[t, sorted(text)] = True
    for i, qi in enumerate(visual):
        for j, kj in enumerate(visual):
            if i - w_left <= j <= i + w_right:
                mask[qi, kj] = True
    return mask


def masked_dense_fp64(q, k, v, masks, scale):
    q, k, v = q.double(), k.double(), v.double()
    scores = (q @ k.transpose(-1, -2)) * scale
    scores = scores.masked_fill(~masks[None], float("-inf"))
    return torch.softmax(scores, dim=-1) @ v


def random_schemes(num_heads, seq_len, rng, kinds=(0, 1, 2)):
    schemes = []
    for _ in range(num_heads):
        kind = rng.choice(kinds)
        if kind == HeadKind.ARROW:
            schemes.append(HeadScheme.arrow(rng.randint(0, seq_len + 3), rng.randint(0, seq_len + 3)))
        else:
            schemes.append(HeadScheme(HeadKind(kind)))
    return schemes


def text_range_for(layout, seq_len, text_tokens):
    return {"none": (0, 0), "first": (0, text_tokens), "last": (seq_len - text_tokens, seq_len)}[layout]


# ------------------------------------------------------------------ reference vs explicit masks

@pytest.mark.parametrize("layout", ["none", "first", "last"])
@pytest.mark.parametrize("kinds", [(0,), (1,), (2,), (0, 1), (1, 2), (0, 1, 2)])
def test_reference_matches_masked_dense(layout, kinds, rng_seed):
    rng = random.Random(rng_seed)
    batch, heads, head_dim = 2, 4, 8
    seq_len = rng.randint(9, 40)
    text_range = text_range_for(layout, seq_len, rng.randint(1, 8))
    schemes = random_schemes(heads, seq_len, rng, kinds)
    q, k, v, cached = (torch.randn(batch, heads, seq_len, head_dim) for _ in range(4))
    out = ha.head_attention_ref(q, k, v, schemes, text_range, cached)
    scale = 1 / math.sqrt(head_dim)
    for h, s in enumerate(schemes):
        if s.kind == HeadKind.CACHED:
            assert torch.equal(out[:, h], cached[:, h])
            continue
        mask = explicit_mask(s.kind, s.w_left, s.w_right, seq_len, text_range)
        expected = masked_dense_fp64(q[:, h], k[:, h], v[:, h], mask, scale)
        torch.testing.assert_close(out[:, h].double(), expected, rtol=2e-5, atol=2e-6,
                                   msg=f"seed {rng_seed} head {h} {s} text {text_range}")


def test_reference_fp64_chunked_and_bf16_dtype(rng_seed):
    q, k, v = (torch.randn(1, 2, 50, 16, dtype=torch.float64) for _ in range(3))
    schemes = [HeadScheme.arrow(3, 7), HeadScheme.full()]
    whole = ha.head_attention_ref(q, k, v, schemes, (0, 5))
    chunked = ha.head_attention_ref(q, k, v, schemes, (0, 5), query_chunk=7)
    torch.testing.assert_close(whole, chunked, rtol=1e-12, atol=1e-12)
    out = ha.head_attention_ref(q.bfloat16(), k.bfloat16(), v.bfloat16(), schemes, (0, 5))
    assert out.dtype == torch.bfloat16 and out.shape == q.shape


def test_arrow_with_wide_band_equals_full(rng_seed):
    q, k, v = (torch.randn(1, 2, 30, 8) for _ in range(3))
    wide = ha.head_attention_ref(q, k, v, [HeadScheme.arrow(30, 30)] * 2, (25, 30))
    full = ha.head_attention_ref(q, k, v, [HeadScheme.full()] * 2, (25, 30))
    torch.testing.assert_close(wide, full)


def test_op_cpu_matches_reference_and_exports(rng_seed):
    q, k, v, cached = (torch.randn(1, 3, 20, 8) for _ in range(4))
    table = ha.schemes_to_tensor([HeadScheme.full(), HeadScheme.arrow(2, 1), HeadScheme.cached()])
    out = torch.ops.ditbake.head_attention(q, k, v, table, 0, 4, cached)
    torch.testing.assert_close(out, ha.head_attention_ref(q, k, v, table, (0, 4), cached))
    torch.testing.assert_close(ha.head_attention(q, k, v, table, (0, 4), cached), out)

    class Layer(torch.nn.Module):
        def forward(self, q, k, v, schemes, cached):
            return torch.ops.ditbake.head_attention(q, k, v, schemes, 0, 4, cached) * 2

    exported = torch.export.export(Layer(), (q, k, v, table, cached))
    assert "ditbake.head_attention" in str(exported.graph)
    torch.testing.assert_close(exported.module()(q, k, v, table, cached), out * 2)


@pytest.mark.parametrize("text_range", [(0, 4), (16, 20)])
def test_op_under_torch_compile_on_cpu_is_eager(text_range, uncached_inductor, rng_seed):
    """torch.compile inlines a triton_op's body, not its registered CPU kernel: off CUDA the body must
    call the reference (an opaque op), or the compiled graph returns uninitialized memory. Exact: the
    compiled graph calls the same reference on the same tensors, and doubling is exact in fp32."""
    q, k, v, cached = (torch.randn(2, 3, 20, 8) for _ in range(4))
    table = ha.schemes_to_tensor([HeadScheme.full(), HeadScheme.arrow(2, 1), HeadScheme.cached()])

    def layer(q, k, v, schemes, cached):
        return torch.ops.ditbake.head_attention(q, k, v, schemes, *text_range, cached, None) * 2

    compiled = torch.compile(layer, fullgraph=True)(q, k, v, table, cached)
    torch.testing.assert_close(compiled, layer(q, k, v, table, cached), rtol=0, atol=0)


def test_export_keeps_one_op_node():
    """The tensorrt exporter translates the op node: export keeps it whole (the reference it calls off
    CUDA stays inside it)."""
    q, k, v = (torch.randn(1, 2, 20, 8) for _ in range(3))
    table = ha.schemes_to_tensor([HeadScheme.full(), HeadScheme.arrow(2, 1)])

    class Layer(torch.nn.Module):
        def forward(self, q, k, v, schemes):
            return torch.ops.ditbake.head_attention(q, k, v, schemes, 0, 4, None, None)

    targets = [n.target for n in torch.export.export(Layer(), (q, k, v, table)).graph.nodes if n.op == "call_function"]
    assert targets == [torch.ops.ditbake.head_attention.default]


# ------------------------------------------------------------------ helpers

@pytest.mark.parametrize("grid,tile", [((3, 4, 5), (2, 2, 2)), ((13, 30, 45), (4, 8, 8)), ((1, 7, 3), (1, 7, 3)),
                                       ((2, 5, 5), (9, 9, 9))])
def test_tile_order_is_a_permutation_and_round_trips(grid, tile):
    perm = ha.tile_order(grid, tile)
    count = grid[0] * grid[1] * grid[2]
    assert torch.equal(torch.sort(perm).values, torch.arange(count))
    text = 6
    x = torch.randn(2, text + count, 3)
    tiled = ha.reorder_visual_tokens(x, perm, (0, text), dim=1)
    assert torch.equal(tiled[:, :text], x[:, :text])
    assert torch.equal(tiled[:, text:], x[:, text:][:, perm])
    back = ha.reorder_visual_tokens(tiled, ha.invert_permutation(perm), (0, text), dim=1)
    assert torch.equal(back, x)


def test_tile_order_groups_a_tile_contiguously():
    perm = ha.tile_order((2, 4, 4), (1, 2, 2))
    first_tile = {(int(p) // 16, int(p) % 16 // 4, int(p) % 4) for p in perm[:4]}
    assert first_tile == {(0, 0, 0), (0, 0, 1), (0, 1, 0), (0, 1, 1)}


@pytest.mark.parametrize("layout", ["none", "first", "last"])
def test_flop_counter_matches_mask_nnz(layout, rng_seed):
    rng = random.Random(rng_seed)
    for _ in range(5):
        seq_len = rng.randint(1, 45)
        text_tokens = 0 if layout == "none" else rng.randint(0, seq_len)
        text_range = text_range_for(layout, seq_len, text_tokens)
        schemes = random_schemes(4, seq_len, rng) + [HeadScheme.arrow(0, 0), HeadScheme.arrow(seq_len * 3, 0)]
        expected = 0
        for s in schemes:
            if s.kind != HeadKind.CACHED:
                expected += int(explicit_mask(s.kind, s.w_left, s.w_right, seq_len, text_range).sum())
        got = ha.attention_flops(schemes, text_tokens, seq_len - text_tokens, head_dim=64, batch=2)
        assert got == 4 * 64 * expected * 2, (seq_len, text_range, schemes)


def test_flex_mask_mod_matches_explicit_mask(rng_seed):
    rng = random.Random(rng_seed)
    seq_len, text_range = 23, (0, 5)
    schemes = [HeadScheme.full(), HeadScheme.arrow(rng.randint(0, 9), rng.randint(0, 9)), HeadScheme.cached()]
    mask_mod = ha.flex_mask_mod(schemes, text_range, seq_len)
    rows, cols = torch.arange(seq_len)[:, None], torch.arange(seq_len)[None, :]
    for h, s in enumerate(schemes):
        got = mask_mod(torch.tensor(0), torch.tensor(h), rows, cols)
        if s.kind == HeadKind.CACHED:
            assert torch.equal(got, torch.eye(seq_len, dtype=torch.bool))
        else:
            assert torch.equal(got, explicit_mask(s.kind, s.w_left, s.w_right, seq_len, text_range))


# ------------------------------------------------------------------ errors

def _qkv(shape=(1, 2, 10, 8)):
    return tuple(torch.randn(shape) for _ in range(3))


@pytest.mark.parametrize("call,fragment", [
    (lambda: ha.head_attention_ref(*_qkv(), [HeadScheme.full()] * 3, (0, 0)), "3 head schemes for 2 heads"),
    (lambda: ha.head_attention_ref(torch.randn(2, 10, 8), *_qkv()[1:], [HeadScheme.full()] * 2, (0, 0)), "4-D"),
    (lambda: ha.head_attention_ref(*_qkv()[:2], torch.randn(1, 2, 11, 8), [HeadScheme.full()] * 2, (0, 0)),
     "same shape"),
    (lambda: ha.head_attention_ref(*_qkv(), [HeadScheme.arrow(-1, 2)] * 2, (0, 0)), "widths must be >= 0"),
    (lambda: ha.head_attention_ref(*_qkv(), torch.tensor([[0, 0, 0], [7, 0, 0]]), (0, 0)), "unknown kind 7"),
    (lambda: ha.head_attention_ref(*_qkv(), torch.zeros(2, 2, dtype=torch.int32), (0, 0)), "[H, 3]"),
    (lambda: ha.head_attention_ref(*_qkv(), [HeadScheme.full()] * 2, (0, 11)), "out of bounds"),
    (lambda: ha.head_attention_ref(*_qkv(), [HeadScheme.full()] * 2, (-1, 3)), "out of bounds"),
    (lambda: ha.head_attention_ref(*_qkv(), [HeadScheme.full()] * 2, (2, 5)), "start or the end"),
    (lambda: ha.head_attention_ref(*_qkv(), [HeadScheme.cached()] * 2, (0, 0)), "no cached output"),
    (lambda: ha.head_attention_ref(*_qkv(), [HeadScheme.full()] * 2, (0, 0), cached=torch.randn(1, 2, 10, 4)),
     "cached must match"),
    (lambda: ha.head_attention_ref(*(t.int() for t in _qkv()), [HeadScheme.full()] * 2, (0, 0)), "bf16"),
    (lambda: ha.head_attention_ref(*_qkv(), [HeadScheme.full()] * 2, (0, 0), scale=-1.0), "positive"),
    (lambda: ha.attention_flops([HeadScheme.full()], -1, 5, 64), "token counts"),
    (lambda: ha.tile_order((2, 0, 3), (1, 1, 1)), "positive ints"),
    (lambda: ha.reorder_visual_tokens(torch.randn(1, 10, 2), torch.arange(9), (0, 0), dim=1), "9 entries"),
    # the op checks its table as on CUDA on every device (its CPU path is its body, as compiled graphs run it)
    (lambda: torch.ops.ditbake.head_attention(*_qkv(), torch.zeros(2, 3), 0, 0), "int32 tensor [H, 3]"),
])
def test_bad_inputs_raise_one_line_typed_errors(call, fragment):
    with pytest.raises(HeadAttentionError) as info:
        call()
    assert fragment in str(info.value) and "\n" not in str(info.value)


# ------------------------------------------------------------------ Triton interpreter (opt-in on CPU)

@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1" or not ha.HAS_TRITON,
                    reason="set TRITON_INTERPRET=1 with triton installed to run the kernel on CPU")
def test_kernel_in_triton_interpreter(rng_seed):
    rng = random.Random(rng_seed)
    seq_len, heads = rng.randint(100, 200), 4
    text_range = text_range_for(rng.choice(["none", "first", "last"]), seq_len, rng.randint(1, 30))
    schemes = ha.schemes_to_tensor([HeadScheme.full(), HeadScheme.cached()]
                                   + [HeadScheme.arrow(rng.randint(0, 80), rng.randint(0, 80)) for _ in range(2)])
    q, k, v, cached = (torch.randn(1, heads, seq_len, 16) for _ in range(4))
    out = torch.full_like(q, float("nan"))
    config = dict(BLOCK_M=16, BLOCK_N=16, num_warps=1, num_stages=1)
    ha.launch_head_attention(q, k, v, schemes, *text_range, cached, None, out, config=config)
    ref = ha.head_attention_ref(q.double(), k.double(), v.double(), schemes, text_range, cached.double())
    assert not out.isnan().any()
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------ GPU

def _relative_error(out, ref):
    return ((out.double() - ref).norm() / ref.norm()).item()


def _sdpa_bf16_masked(q, k, v, table, text_range, cached, query_chunk=4096):
    """What plain bf16 SDPA gives for the same masks: the error yardstick for the kernel."""
    out = torch.empty_like(q)
    seq_len = q.shape[2]
    keys = torch.arange(seq_len, device=q.device)
    for h, (kind, w_left, w_right) in enumerate(table.tolist()):
        if kind == HeadKind.CACHED:
            out[:, h] = cached[:, h]
        elif kind == HeadKind.FULL:
            out[:, h] = torch.nn.functional.scaled_dot_product_attention(q[:, h], k[:, h], v[:, h])
        else:
            for r0 in range(0, seq_len, query_chunk):
                rows = torch.arange(r0, min(r0 + query_chunk, seq_len), device=q.device)[:, None]
                mask = ha.arrow_allowed(rows, keys[None, :], w_left, w_right, *text_range)
                out[:, h, r0:r0 + query_chunk] = torch.nn.functional.scaled_dot_product_attention(
                    q[:, h, r0:r0 + query_chunk], k[:, h], v[:, h], attn_mask=mask)
    return out


GPU_CASES = [  # (batch, heads, seq_len, head_dim, text layout, text tokens)
    (1, 12, 32760, 128, "none", 0),     # Wan2.1-1.3B self-attention
    (1, 6, 17776, 64, "first", 226),    # CogVideoX-2B joint attention (fewer heads to keep the fp64 check short)
    (2, 4, 4173, 128, "last", 77),      # text last, batch 2, ragged length
    (1, 3, 1000, 64, "first", 1000),    # text only
]


@pytest.mark.gpu
@pytest.mark.parametrize("batch,heads,seq_len,head_dim,layout,text_tokens", GPU_CASES)
def test_kernel_matches_fp64_reference(batch, heads, seq_len, head_dim, layout, text_tokens, rng_seed):
    rng = random.Random(rng_seed)
    device = "cuda"
    text_range = ha.normalize_text_range(text_range_for(layout, seq_len, text_tokens), seq_len)
    visual = seq_len - (text_range[1] - text_range[0])
    schemes = [HeadScheme.full(), HeadScheme.cached(), HeadScheme.arrow(0, 0)]
    schemes += [HeadScheme.arrow(rng.randint(0, visual // 3), rng.randint(0, visual // 3)) for _ in range(heads - 3)]
    rng.shuffle(schemes)
    table = ha.schemes_to_tensor(schemes)
    q, k, v, cached = (torch.randn(batch, heads, seq_len, head_dim, device=device, dtype=torch.bfloat16)
                       for _ in range(4))
    ref = ha.head_attention_ref(q.double(), k.double(), v.double(), table, text_range, cached.double())
    sdpa_error = _relative_error(_sdpa_bf16_masked(q, k, v, table, text_range, cached), ref)
    for attempt in range(2):  # twice: a moving error would mean a race
        out = torch.full_like(q, float("nan"))
        out.copy_(ha.head_attention(q, k, v, table.to(device), text_range, cached))
        assert not out.isnan().any(), f"seed {rng_seed}: NaN in the output (unwritten or unstable)"
        error = _relative_error(out, ref)
        logger.info("S=%d H=%d D=%d text=%s: kernel error %.2e, bf16 SDPA error %.2e",
                    seq_len, heads, head_dim, text_range, error, sdpa_error)
        assert error <= 2 * sdpa_error + 1e-4, f"seed {rng_seed}: error {error:.2e} vs bf16 SDPA {sdpa_error:.2e}"
    for h, s in enumerate(schemes):
        if s.kind == HeadKind.CACHED:
            assert torch.equal(out[:, h], cached[:, h])


@pytest.mark.gpu
@pytest.mark.parametrize("head_dim", [32, 64, 128])
def test_fp32_kernel_matches_fp64_reference(head_dim, rng_seed):
    """fp32 inputs (the test beds' fidelity runs) run the kernel with IEEE fp32 products: as close to
    the fp64 reference as fp32 summation allows (1e-5), far below the bf16 path's ~1e-3."""
    rng = random.Random(rng_seed)
    seq_len, text_range = 2053, (2000, 2053)
    schemes = [HeadScheme.full(), HeadScheme.arrow(0, 0)] + [HeadScheme.arrow(rng.randint(0, 700), rng.randint(0, 700))
                                                            for _ in range(2)]
    table = ha.schemes_to_tensor(schemes)
    q, k, v = (torch.randn(1, 4, seq_len, head_dim, device="cuda") for _ in range(3))
    ref = ha.head_attention_ref(q.double(), k.double(), v.double(), table, text_range)
    out = ha.head_attention(q, k, v, table.cuda(), text_range)
    assert out.dtype == torch.float32
    assert _relative_error(out, ref) < 1e-5


@pytest.mark.gpu
def test_kernel_writes_every_element_of_a_poisoned_output(rng_seed):
    q, k, v = (torch.randn(1, 4, 3001, 64, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    table = ha.schemes_to_tensor([HeadScheme.arrow(5, 900), HeadScheme.full(), HeadScheme.arrow(700, 0),
                                  HeadScheme.arrow(0, 0)]).cuda()
    out = torch.full_like(q, float("nan"))
    ha.launch_head_attention(q, k, v, table, 0, 100, None, None, out)
    torch.cuda.synchronize()
    assert not out.isnan().any()
    ref = ha.head_attention_ref(q.double(), k.double(), v.double(), table.cpu(), (0, 100))
    assert _relative_error(out, ref) < 1e-2


@pytest.mark.gpu
def test_op_under_torch_compile_and_export(rng_seed):
    q, k, v, cached = (torch.randn(1, 3, 1030, 128, device="cuda", dtype=torch.bfloat16) for _ in range(4))
    table = ha.schemes_to_tensor([HeadScheme.full(), HeadScheme.arrow(100, 50), HeadScheme.cached()]).cuda()

    def layer(q, k, v, schemes, cached):
        return torch.ops.ditbake.head_attention(q, k, v, schemes, 0, 30, cached) * 2

    eager = layer(q, k, v, table, cached)
    compiled = torch.compile(layer, fullgraph=True)(q, k, v, table, cached)
    torch.testing.assert_close(compiled, eager)

    class Layer(torch.nn.Module):
        def forward(self, q, k, v, schemes, cached):
            return layer(q, k, v, schemes, cached)

    exported = torch.export.export(Layer(), (q, k, v, table, cached))
    assert "ditbake.head_attention" in str(exported.graph) or "triton_kernel_wrapper" in str(exported.graph)
