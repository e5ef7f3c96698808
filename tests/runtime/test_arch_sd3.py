"""Runtime head schemes: local3d windows, text-last arrow heads, FLOPs counting, plan tiles."""
import pytest
import torch
import torch.nn.functional as F

from ditbake.plugins.head_attention import arrow_allowed, attention_flops, invert_permutation, tile_order
from ditbake.runtime.attention import AttentionRunner
from ditbake.runtime.errors import BackendError, PlanError
from ditbake.runtime.plan import BlockVariant, HeadScheme, Plan


def _expected(q, k, v, schemes, text_range, grid, tile):
    """Per head: dense attention under an explicit [S, S] mask built from token positions."""
    seq = q.shape[2]
    start, end = text_range
    outs = []
    for h, s in enumerate(schemes):
        pos = torch.arange(seq)
        if s.kind == "local3d":
            vs, ve = (0, start) if end == seq and start > 0 else (end, seq)
            pos[vs:ve] = vs + invert_permutation(tile_order(grid, tile))
        mask = None if s.kind == "full" else arrow_allowed(pos[:, None], pos[None, :], s.left, s.right, start, end)
        outs.append(F.scaled_dot_product_attention(q[:, h:h + 1], k[:, h:h + 1], v[:, h:h + 1], attn_mask=mask))
    return torch.cat(outs, dim=1)


@pytest.mark.parametrize("text_range", [(0, 0), (64, 70), (0, 6)])
def test_local3d_and_arrow_heads_match_masked_dense(text_range, rng_seed):
    grid, tile = (4, 4, 4), (2, 2, 2)
    seq = 64 + (text_range[1] - text_range[0])
    q, k, v = (torch.randn(2, 4, seq, 8, dtype=torch.float64) for _ in range(3))
    schemes = (HeadScheme("local3d", 5, 5), HeadScheme("arrow", 3, 7), HeadScheme("full"), HeadScheme("local3d", 0, 9))
    runner = AttentionRunner(tiles={"attn1": tile})
    out = runner(("cond", 0, "attn1"), q, k, v, schemes, text_range, grid)
    torch.testing.assert_close(out, _expected(q, k, v, schemes, text_range, grid, tile))
    # FLOPs: the local3d band holds as many pairs as the same arrow band
    t = text_range[1] - text_range[0]
    table = torch.tensor([[0 if s.kind == "full" else 1, s.left, s.right] for s in schemes], dtype=torch.int32)
    assert runner.flops_done == attention_flops(table, t, 64, 8, batch=2)
    assert runner.flops_dense == 4 * 2 * 4 * seq * seq * 8


def test_cached_heads_reuse_previous_output_and_cost_nothing():
    q, k, v = (torch.randn(1, 2, 16, 4) for _ in range(3))
    runner = AttentionRunner()
    key = ("cond", 0, "attn")
    first = runner(key, q, k, v, (HeadScheme("full"), HeadScheme("full")), (12, 16))
    q2, k2, v2 = (torch.randn(1, 2, 16, 4) for _ in range(3))
    second = runner(key, q2, k2, v2, (HeadScheme("cached"), HeadScheme("full")), (12, 16))
    torch.testing.assert_close(second[:, 0], first[:, 0])
    torch.testing.assert_close(second[:, 1], F.scaled_dot_product_attention(q2, k2, v2)[:, 1])
    dense = 4 * 2 * 16 * 16 * 4
    assert runner.flops_dense == 2 * dense and runner.flops_done == dense + dense / 2


def test_local3d_needs_tile_and_grid():
    q = torch.randn(1, 1, 8, 4)
    with pytest.raises(BackendError, match="no tile"):
        AttentionRunner()(("cond", 0, "attn1"), q, q, q, (HeadScheme("local3d", 1, 1),), (0, 0), (2, 2, 2))
    with pytest.raises(BackendError, match="no token grid"):
        AttentionRunner({"attn1": (1, 2, 2)})(("cond", 0, "attn1"), q, q, q, (HeadScheme("local3d", 1, 1),), (0, 0))


def _plan(schemes, tiles=()):
    return Plan(architecture="sd3", num_blocks=1, linear_layers=(), attention_sites=(("attn", 2),),
                variants=(BlockVariant(), BlockVariant(heads=(("attn", schemes),))),
                steps=({"cond": (0,)}, {"cond": (1,)}), tiles=tiles)


def test_plan_tiles_round_trip_and_validation():
    plan = _plan((HeadScheme("local3d", 2, 2), HeadScheme("cached")), tiles=(("attn", (1, 2, 2)),))
    assert Plan.from_json(plan.to_json()) == plan
    with pytest.raises(PlanError, match="no tile for attn"):
        _plan((HeadScheme("local3d", 2, 2), HeadScheme("full")))
    with pytest.raises(PlanError, match="three positive ints"):
        _plan((HeadScheme("full"), HeadScheme("full")), tiles=(("attn", (0, 2, 2)),))
    with pytest.raises(PlanError, match="unknown attention site"):
        _plan((HeadScheme("full"), HeadScheme("full")), tiles=(("attn9", (1, 2, 2)),))
    with pytest.raises(PlanError, match="unknown head scheme"):
        HeadScheme("window", 1, 1)
