"""Heads grouped by (scheme class, precision): one kernel call per group, exact against running
every head on its own."""
import pytest
import torch
import torch.nn.functional as F

from ditbake.runtime import attention as attn
from ditbake.runtime.attention import AttentionRunner, head_groups, invert_order
from ditbake.runtime.plan import HeadScheme
from tests.runtime.test_arch_sd3 import _expected


def test_groups_keep_first_appearance_order_and_inverse_restores_heads():
    schemes = (HeadScheme("arrow", 1, 1), HeadScheme("full"), HeadScheme("arrow", 2, 5), HeadScheme("cached"),
               HeadScheme("full", precision="int8"), HeadScheme("full"))
    assert head_groups(schemes) == {("arrow", "bf16"): (0, 2), ("full", "bf16"): (1, 5), ("cached", "bf16"): (3,),
                                    ("full", "int8"): (4,)}
    order = [0, 2, 1, 5, 3, 4]
    x = torch.arange(6)[order]
    assert x[invert_order(order)].tolist() == list(range(6))


def test_interleaved_groups_match_per_head_reference_with_one_call_per_group(monkeypatch, rng_seed):
    grid, tile, text_range = (2, 4, 4), (1, 2, 2), (32, 36)
    q, k, v = (torch.randn(2, 6, 36, 8, dtype=torch.float64) for _ in range(3))
    runner = AttentionRunner(tiles={"attn": tile})
    key = ("uncond", 3, "attn")
    first = runner(key, q, k, v, (HeadScheme("full"),) * 6, text_range, grid)
    schemes = (HeadScheme("arrow", 3, 3), HeadScheme("cached"), HeadScheme("local3d", 2, 2), HeadScheme("full"),
               HeadScheme("arrow", 1, 6), HeadScheme("cached"))
    calls = []
    sdpa = F.scaled_dot_product_attention
    monkeypatch.setattr(attn.F, "scaled_dot_product_attention", lambda *a, **kw: calls.append("sdpa") or sdpa(*a, **kw))
    kernel = AttentionRunner._kernel
    monkeypatch.setattr(AttentionRunner, "_kernel", staticmethod(lambda *a: calls.append(a[0]) or kernel(*a)))
    q2, k2, v2 = (torch.randn(2, 6, 36, 8, dtype=torch.float64) for _ in range(3))
    out = runner(key, q2, k2, v2, schemes, text_range, grid)
    assert sorted(calls) == ["bf16", "bf16", "sdpa"]  # arrow group, local3d group, dense group; cached: none
    live = [0, 2, 3, 4]
    expected = _expected(q2[:, live], k2[:, live], v2[:, live], tuple(schemes[h] for h in live), text_range, grid, tile)
    torch.testing.assert_close(out[:, live], expected)
    torch.testing.assert_close(out[:, [1, 5]], first[:, [1, 5]])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_fp32_head_dim_32_on_cuda_matches_cpu():
    """The 16k test bed as built for fidelity runs (float32, head dim 32) on the GPU: banded heads run
    the Triton kernel with IEEE fp32 products; the result is the CPU reference's (fp32 summation
    order: 1e-5)."""
    grid, tile, text_range = (2, 4, 4), (1, 2, 2), (32, 36)
    schemes = (HeadScheme("arrow", 3, 3), HeadScheme("full"), HeadScheme("local3d", 2, 2), HeadScheme("arrow", 1, 6))
    q, k, v = (torch.randn(2, 4, 36, 32) for _ in range(3))
    outs = []
    for device in ("cpu", "cuda"):
        runner = AttentionRunner(tiles={"attn": tile})
        outs.append(runner(("cond", 0, "attn"), q.to(device), k.to(device), v.to(device), schemes, text_range,
                           grid).cpu())
    torch.testing.assert_close(outs[1], outs[0], atol=1e-5, rtol=1e-5)
