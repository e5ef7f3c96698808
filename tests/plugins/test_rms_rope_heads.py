"""Per-head RMS norm + rotary embedding + head-major layout in one kernel (Flux's q / k): on CPU the
op is its specification, equal to the composition Flux's block ran before the kernel (per-head
rms_norm of each stream, text first, then runtime.nn.rotate_interleaved); malformed input gets a
typed error; the op exports as one node. Under Triton's interpreter (where installed) and on the
GPU the kernel matches the composition to a few roundings of the output dtype, with and without a
text stream, at Flux's 2048² layout and at ragged token counts with a head count that is not a
power of two."""
import os

import pytest
import torch
import torch.nn.functional as F

from ditbake.plugins.nvfp4 import QuantFormatError
from ditbake.plugins.rms_rope_heads import (apply_rms_rope_heads, check_rms_rope_heads_args, launch_rms_rope_heads,
                                            rms_rope_heads, rms_rope_heads_ref)
from ditbake.runtime.arch_flux import rope
from ditbake.runtime.nn import rotate_interleaved

CONFIG = {"axes_dims_rope": (16, 56, 56)}


def _gen():
    return torch.Generator().manual_seed(torch.seed() % 2**31)


def _inputs(b, text, gh, gw, heads, g, device="cpu", dtype=torch.bfloat16, d=128):
    config = CONFIG if d == 128 else {"axes_dims_rope": (d // 4, d // 4 + d // 8, d // 2 - d // 8)}
    cos, sin = rope(config, text, gh, gw, device)
    n = gh * gw
    x = (torch.randn(b, n, heads * d, generator=g) * 3).to(dtype).to(device)
    weight = (1 + 0.3 * torch.randn(d, generator=g)).to(dtype).to(device)
    first = first_weight = None
    if text:
        # the text stream at another scale and with a channel outlier, as a projection's output can be
        first = (torch.randn(b, text, heads * d, generator=g) * 0.5).to(dtype)
        first[..., 5] *= 40
        first = first.to(device)
        first_weight = (1 + 0.3 * torch.randn(d, generator=g)).to(dtype).to(device)
    return x, weight, cos, sin, first, first_weight


def _composition(x, weight, cos, sin, eps, heads, first=None, first_weight=None):
    """What runtime.arch_flux.block did before the kernel: split, per-head rms_norm (fp32, rounded),
    text stream first, rotary on [B, H, S, D]."""
    def norm(t, w):
        t = t.unflatten(2, (heads, -1)).transpose(1, 2)
        return F.rms_norm(t.float(), (t.shape[-1],), w.float(), eps).to(t.dtype)

    y = norm(x, weight)
    if first is not None:
        y = torch.cat([norm(first, first_weight), y], dim=2)
    return rotate_interleaved(y, cos, sin)


@pytest.mark.parametrize("text", [0, 7, 16])
def test_cpu_op_is_the_block_composition(text):
    x, weight, cos, sin, first, first_weight = _inputs(2, text, 3, 5, 4, _gen(), d=32)
    out = apply_rms_rope_heads(x, weight, cos, sin, 1e-6, 4, first, first_weight)
    assert out.is_contiguous() and out.shape == (2, 4, text + 15, 32)
    assert torch.equal(out, _composition(x, weight, cos, sin, 1e-6, 4, first, first_weight))
    # the text tokens are normalized with their own weight: swapping the weights changes them
    if text:
        swapped = rms_rope_heads(x, weight, cos, sin, 1e-6, 4, first, weight)
        assert not torch.equal(swapped[:, :, :text], out[:, :, :text])
        assert torch.equal(swapped[:, :, text:], out[:, :, text:])


def test_rotation_keeps_each_pairs_norm():
    """A rotation: |(y0, y1)| per pair is the normalized value's (to bf16 roundings)."""
    x, weight, cos, sin, first, first_weight = _inputs(1, 5, 4, 4, 2, _gen(), dtype=torch.float32, d=32)
    out = rms_rope_heads(x, weight, cos, sin, 1e-6, 2, first, first_weight)
    plain = _composition(x, weight, torch.ones_like(cos), torch.zeros_like(sin), 1e-6, 2, first, first_weight)
    pair_norm = lambda t: t.unflatten(-1, (-1, 2)).norm(dim=-1)  # noqa: E731
    torch.testing.assert_close(pair_norm(out), pair_norm(plain), rtol=1e-5, atol=1e-6)
    assert not torch.allclose(out, plain)


CASES = ["rank", "dtype", "heads", "odd head dim", "weight", "first weight missing", "first dtype", "first width",
         "first batch", "cos dtype", "sin length", "eps"]


@pytest.mark.parametrize("case", CASES)
def test_malformed_input_gets_a_typed_error(case):
    x, weight, cos, sin, first, first_weight = _inputs(1, 3, 2, 4, 2, _gen(), d=32)
    args = dict(x=x, weight=weight, cos=cos, sin=sin, eps=1e-6, heads=2, first=first, first_weight=first_weight)
    args.update({"rank": dict(x=x[0]), "dtype": dict(x=x.to(torch.int32)), "heads": dict(heads=5),
                 "odd head dim": dict(heads=64), "weight": dict(weight=torch.ones(64)),
                 "first weight missing": dict(first_weight=None), "first dtype": dict(first=first.float()),
                 "first width": dict(first=first[..., :32]), "first batch": dict(first=first.expand(2, -1, -1)),
                 "cos dtype": dict(cos=cos.double()), "sin length": dict(sin=sin[:, :, 1:]),
                 "eps": dict(eps=0.0)}[case])
    with pytest.raises(QuantFormatError):
        check_rms_rope_heads_args(*args.values())
    check_rms_rope_heads_args(x, weight, cos, sin, 1e-6, 2, first, first_weight)  # the valid call passes


def test_exports_as_one_node():
    x, weight, cos, sin, first, first_weight = _inputs(1, 4, 2, 4, 2, _gen(), d=32)

    class M(torch.nn.Module):
        def forward(self, x, first):
            return rms_rope_heads(x, weight, cos, sin, 1e-6, 2, first, first_weight)

    ep = torch.export.export(M(), (x, first))
    assert sum("rms_rope_heads" in str(n.target) for n in ep.graph.nodes) == 1
    assert torch.equal(ep.module()(x, first), M()(x, first))


def _assert_close_to_composition(got, want):
    diff = (got.float().cpu() - want.float()).abs()
    # fp32 sums in another order: the normalized value may round to the neighbouring bf16 number
    # (2^-8 relative), which the weight and the rotation carry: a few bf16 steps of the row's scale
    scale = want.float().abs().amax(-1, keepdim=True)
    assert bool((diff <= scale * 2 ** -6).all()), float((diff / scale).max())
    assert float((diff > 0).float().mean()) < 0.05


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="kernel logic under Triton's interpreter")
@pytest.mark.parametrize("text,gh,gw,heads,per", [(0, 5, 7, 3, 8), (40, 4, 6, 2, 1), (19, 3, 5, 5, 2)])
def test_interpreted_kernel_matches_the_composition(text, gh, gw, heads, per):
    """The kernel's indexing (streams, heads, pairs, ragged tails) in fp32: the interpreter's bf16 cast
    truncates instead of rounding to nearest even, so only fp32 is a reference there; fp32 sums in
    another order leave ulps (2^-23 of the row's scale; measured 2e-7)."""
    x, weight, cos, sin, first, first_weight = _inputs(2, text, gh, gw, heads, _gen(), dtype=torch.float32)
    got = launch_rms_rope_heads(x, weight, cos, sin, 1e-6, heads, first, first_weight, tokens_per_program=8,
                                heads_per_program=per)  # ragged token blocks; a last head group cut short
    want = _composition(x, weight, cos, sin, 1e-6, heads, first, first_weight)
    assert got.shape == want.shape and got.is_contiguous()
    assert float(((got - want).abs() / want.abs().amax(-1, keepdim=True)).max()) < 2e-6


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("text,gh,gw,heads,d", [(512, 128, 128, 24, 128), (0, 128, 128, 24, 128),
                                                (77, 13, 21, 5, 64)])
def test_gpu_kernel_matches_the_composition(text, gh, gw, heads, d):
    x, weight, cos, sin, first, first_weight = _inputs(2, text, gh, gw, heads, _gen(), "cuda", d=d)
    got = rms_rope_heads(x, weight, cos, sin, 1e-6, heads, first, first_weight)
    cpu = lambda t: None if t is None else t.cpu()  # noqa: E731
    want = _composition(*(cpu(t) for t in (x, weight, cos, sin)), 1e-6, heads, cpu(first), cpu(first_weight))
    assert got.is_contiguous() and got.shape == want.shape
    _assert_close_to_composition(got, want)


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1" and not torch.cuda.is_available(),
                    reason="where the kernel would run (the interpreter or a GPU)")
def test_head_sizes_that_are_not_a_power_of_two_run_the_specification():
    """Triton tiles are powers of two: a 48-wide head takes the reference path instead of failing to compile."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    x, weight, cos, sin, first, first_weight = _inputs(1, 5, 3, 4, 2, _gen(), device, dtype=torch.float32, d=48)
    got = rms_rope_heads(x, weight, cos, sin, 1e-6, 2, first, first_weight)
    assert torch.equal(got, rms_rope_heads_ref(x, weight, cos, sin, 1e-6, 2, first, first_weight))
