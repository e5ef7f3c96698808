"""The head search's candidates without [S, S] masks equal the dense masked attention they replace."""
import pytest
import torch
import torch.nn.functional as F

from ditbake.exporter.calibrate_heads import CandidateRunner, HeadSearchAttention, relative_squared_error
from ditbake.exporter.plan_heads import HeadsConfig, candidates, savings
from ditbake.plugins.head_attention import (_visual_range, arrow_allowed, invert_permutation, normalize_text_range,
                                            tile_order)
from ditbake.runtime.plan import HeadScheme


def dense_mask(scheme, seq_len, text_range, grid=None, tile=None):
    """The search's former [S, S] boolean mask (True = attend) over raster-ordered tokens."""
    start, end = normalize_text_range(text_range, seq_len)
    pos = torch.arange(seq_len)
    if scheme.kind == "local3d":
        vs, ve = _visual_range(start, end, seq_len)
        pos[vs:ve] = vs + invert_permutation(tile_order(grid, tile))
    return arrow_allowed(pos[:, None], pos[None, :], scheme.left, scheme.right, start, end)


GRID, TILE = (3, 4, 6), (2, 2, 3)  # 72 visual tokens; edge tiles are partial along frames


@pytest.mark.parametrize("text", [(0, 0), (0, 5), (72, 77)])
@pytest.mark.parametrize("tile_elements", [1 << 24, 2 * 3 * 77 * 7])  # one chunk; chunks of 7 query rows
def test_chunked_candidates_equal_dense_masked_attention(text, tile_elements, rng_seed):
    seq = 72 + (text[1] - text[0])
    gen = torch.Generator().manual_seed(rng_seed)
    q, k, v = (torch.randn(2, 3, seq, 8, generator=gen) for _ in range(3))
    menu = (HeadScheme("full"), HeadScheme("arrow", 4, 4), HeadScheme("arrow", 0, 9), HeadScheme("local3d", 6, 6),
            HeadScheme("local3d", 12, 12), HeadScheme("cached"))
    got = dict(CandidateRunner(TILE, tile_elements).outputs(menu, q, k, v, text, GRID))
    assert sorted(got) == [1, 2, 3, 4]
    for c, out in got.items():
        mask = dense_mask(menu[c], seq, text, GRID, TILE)
        assert not mask.all()  # a real restriction, not full attention
        torch.testing.assert_close(out, F.scaled_dot_product_attention(q, k, v, attn_mask=mask), rtol=1e-5, atol=1e-6)


def test_layer_errors_and_choice_match_the_dense_reference(rng_seed):
    """One search call: the per-head errors equal those of dense masked attention, the returned
    output is each head's chosen candidate, and the next step offers it as the cached candidate."""
    gen = torch.Generator().manual_seed(rng_seed)
    config = HeadsConfig(delta=4.0, head_factor=1.5, arrow_fractions=(0.1, 0.25), local3d_tile=TILE,
                         local3d_fractions=(0.1,))
    menu = candidates(config, 72)
    site = {"attn": {"menu": menu, "heads": 4, "saving": savings(menu, 0, 72, 8)}}
    search = HeadSearchAttention(config, site, (1, 2, 1))
    for step in range(2):
        q, k, v = (torch.randn(2, 4, 72, 8, generator=gen) for _ in range(3))
        search.where = (0, step)
        prev = search.prev.get(("cond", 0, "attn"))
        out = search(("cond", 0, "attn"), q, k, v, None, (0, 0), GRID)
        full = F.scaled_dot_product_attention(q, k, v)
        errors = search.errors["attn"][0, step, 0]
        refs = [full] + [F.scaled_dot_product_attention(q, k, v, attn_mask=dense_mask(s, 72, (0, 0), GRID, TILE))
                         for s in menu[1:-1]] + [prev]
        for c, ref in enumerate(refs):
            if ref is None:
                assert torch.isnan(errors[:, c]).all()  # no cache at step 0
                continue
            torch.testing.assert_close(errors[:, c], relative_squared_error(ref, full), rtol=1e-4, atol=1e-7)
        choice = search.choice["attn"][0, step, 0].long()
        for h, c in enumerate(choice.tolist()):
            torch.testing.assert_close(out[:, h], refs[c][:, h], rtol=1e-5, atol=1e-6)
    assert (search.choice["attn"] > 0).any() and (search.choice["attn"] == 0).any()  # a mix of schemes
    assert search.solves == 2 and search.attention_seconds > 0
