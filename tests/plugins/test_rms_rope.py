"""RMS norm + rotary embedding + head-major layout in one kernel: on CPU the op is its specification
(the composition Wan's block ran), malformed input gets a typed error, the op exports as one node;
on the GPU the kernel matches the composition to a few roundings of the output dtype, at Wan's head
layout (32,760 tokens) and at a ragged token count with a head count that is not a power of two."""
import pytest
import torch

from ditbake.plugins.nvfp4 import QuantFormatError
from ditbake.plugins.rms_rope import apply_rms_rope, check_rms_rope_args, rms_rope, rms_rope_ref
from ditbake.runtime.arch_wan import rope
from ditbake.runtime.nn import rms_norm, rotate_interleaved


def _gen():
    return torch.Generator().manual_seed(torch.seed() % 2**31)


def _inputs(b, latent, heads, d, g, device="cpu", dtype=torch.bfloat16):
    cos, sin = rope({"attention_head_dim": d, "patch_size": (1, 2, 2)}, latent, device)
    s = cos.shape[1]
    x = (torch.randn(b, s, heads * d, generator=g) * 3).to(dtype).to(device)
    weight = (1 + 0.3 * torch.randn(heads * d, generator=g)).to(dtype).to(device)
    return x, weight, cos, sin


def test_cpu_op_is_the_block_composition():
    x, weight, cos, sin = _inputs(2, (16, 3, 4, 6), 4, 24, _gen())
    out = apply_rms_rope(x, weight, cos, sin, 1e-6, 4)
    composed = rotate_interleaved(rms_norm(x, weight, 1e-6).unflatten(2, (4, -1)), cos, sin).transpose(1, 2)
    assert out.is_contiguous() and out.shape == (2, 4, cos.shape[1], 24)
    assert torch.equal(out, composed)


@pytest.mark.parametrize("case", ["rank", "dtype", "heads", "odd head dim", "weight", "cos dtype", "sin shape", "eps"])
def test_malformed_input_gets_a_typed_error(case):
    x, weight, cos, sin = _inputs(1, (16, 2, 4, 4), 2, 12, _gen())
    args = dict(x=x, weight=weight, cos=cos, sin=sin, eps=1e-6, heads=2)
    args.update({"rank": dict(x=x[0]), "dtype": dict(x=x.to(torch.int32)), "heads": dict(heads=5),
                 "odd head dim": dict(heads=8), "weight": dict(weight=weight[:12]), "cos dtype": dict(cos=cos.double()),
                 "sin shape": dict(sin=sin[:, :3]), "eps": dict(eps=0.0)}[case])
    with pytest.raises(QuantFormatError):
        check_rms_rope_args(*args.values())


def test_exports_as_one_node():
    x, weight, cos, sin = _inputs(1, (16, 2, 4, 4), 2, 12, _gen())

    class M(torch.nn.Module):
        def forward(self, x):
            return rms_rope(x, weight, cos, sin, 1e-6, 2)

    ep = torch.export.export(M(), (x,))
    assert sum("rms_rope" in str(n.target) for n in ep.graph.nodes) == 1
    assert torch.equal(ep.module()(x), M()(x))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("latent,heads,d", [((16, 21, 60, 104), 12, 128), ((16, 3, 10, 14), 5, 64)])
def test_gpu_kernel_matches_the_composition(latent, heads, d):
    x, weight, cos, sin = _inputs(2, latent, heads, d, _gen(), "cuda")
    got = rms_rope(x, weight, cos, sin, 1e-6, heads)
    want = rms_rope_ref(x.cpu(), weight.cpu(), cos.cpu(), sin.cpu(), 1e-6, heads)
    diff = (got.float().cpu() - want.float()).abs()
    # fp32 sums in another order: the normalized value may round to the neighbouring bf16 number
    # (2^-8 relative), which the weight and the rotation carry: a few bf16 steps of the row's scale
    scale = want.float().abs().amax(-1, keepdim=True)
    assert bool((diff <= scale * 2 ** -6).all()), float((diff / scale).max())
    assert float((diff > 0).float().mean()) < 0.05
