"""Attention-locality measurement: the capture sees what Wan's attention computes, the chunked
window sums equal dense fp64 references built from the project's own mask rules, bad input is refused."""
from __future__ import annotations

import pytest
import torch

from ditbake.exporter.attention_locality import (LocalityError, Windows, band_half_width, capture_self_attention,
                                                 sample_queries, site_masses)
from ditbake.exporter.plan_heads import HeadsConfig, candidates
from ditbake.plugins.head_attention import arrow_allowed, invert_permutation, reorder_visual_tokens, tile_order

GRID = (4, 4, 6)  # frames, rows, cols of visual tokens: non-square so rows and cols cannot be swapped


def tiny_wan():
    from diffusers import WanTransformer3DModel

    torch.manual_seed(0)
    return WanTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=3, attention_head_dim=16, in_channels=3,
                                 out_channels=3, text_dim=16, freq_dim=16, ffn_dim=32, num_layers=2,
                                 cross_attn_norm=True, qk_norm="rms_norm_across_heads", rope_max_seq_len=32).double()


def run_captured(model, seed: int):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(1, 3, GRID[0], GRID[1] * 2, GRID[2] * 2, generator=g, dtype=torch.float64)
    text = torch.randn(1, 5, 16, generator=g, dtype=torch.float64)
    seen = []
    with capture_self_attention(model, lambda layer, q, k, v, out: seen.append((layer, q, k, v, out))), \
            torch.no_grad():
        model(hidden_states=x, timestep=torch.tensor([500.0], dtype=torch.float64), encoder_hidden_states=text)
    return seen


def dense_reference(q, k, windows: Windows):
    """[H, S, S] fp64 probabilities and every window's dense [S, S] mask, built independently."""
    s = q.shape[1]
    p = torch.softmax(q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5, dim=-1)
    i = torch.arange(s)[:, None]
    j = torch.arange(s)[None, :]
    masks = {}
    for f in windows.band_fractions:  # the arrow scheme: plan_heads' width rule, head_attention's mask rule
        menu = candidates(HeadsConfig(arrow_fractions=(f,), caching=False, attention_precisions=()), s)
        w = [m.left for m in menu if m.kind == "arrow"][0]
        masks[f"band_{f:g}"] = arrow_allowed(i, j, w, w, 0, 0)
    fr, rr, cc = torch.meshgrid(*(torch.arange(n) for n in windows.grid), indexing="ij")
    fr, rr, cc = fr.reshape(-1), rr.reshape(-1), cc.reshape(-1)
    for t in windows.frame_extents:
        for side in windows.side_extents:
            near_t = torch.ones(s, s, dtype=torch.bool) if t == 0 else (fr[:, None] - fr[None, :]).abs() <= t // 2
            near_s = (torch.ones(s, s, dtype=torch.bool) if side == 0 else
                      ((rr[:, None] - rr[None, :]).abs() <= side // 2) & ((cc[:, None] - cc[None, :]).abs() <= side // 2))
            masks[f"win_t{'all' if t == 0 else t}_hw{'all' if side == 0 else side}"] = near_t & near_s
    perm = tile_order(windows.grid, windows.tile)
    inverse = invert_permutation(perm)
    for f in windows.tile_fractions:  # local3d as the runtime runs it: the arrow band on tile-reordered tokens
        w = band_half_width(f, s)
        tiled = arrow_allowed(i, j, w, w, 0, 0).to(torch.float64)
        back = reorder_visual_tokens(reorder_visual_tokens(tiled, inverse, (0, 0), dim=0), inverse, (0, 0), dim=1)
        masks[f"local3d_{'x'.join(map(str, windows.tile))}_{f:g}"] = back.bool()
    distance = (fr[:, None] - fr[None, :]).abs()
    return p, masks, distance


def test_capture_is_the_attention_wan_computes_and_chunked_masses_match_dense_fp64():
    model = tiny_wan()
    seen = run_captured(model, seed=1)
    assert [layer for layer, *_ in seen] == [0, 1]  # self-attention only, one call per block
    windows = Windows(GRID, band_fractions=(0.05, 0.125, 0.25), frame_extents=(1, 3, 0), side_extents=(1, 3, 0),
                      tile=(2, 2, 4), tile_fractions=(0.0625, 0.125))
    s = windows.tokens
    for _, q, k, v, out in seen:
        q, k, v = (t[0].transpose(0, 1) for t in (q, k, v))  # [H, S, D]
        p, masks, distance = dense_reference(q, k, windows)
        torch.testing.assert_close(p @ v, out[0].transpose(0, 1), rtol=0, atol=1e-10)  # the captured q, k are used
        queries = sample_queries(s, 37, seed=3)
        got = site_masses(q, k, queries, windows, chunk=8)  # several chunks, a ragged last one
        assert set(got.mass) == set(windows.names()) | {"frame_distance"}
        rows = p[:, queries]
        for name, mask in masks.items():
            want = (rows * mask[queries]).sum(-1).mean(-1)
            torch.testing.assert_close(got.mass[name], want, rtol=0, atol=1e-6, msg=name)
            torch.testing.assert_close(got.coverage[name], mask[queries].double().mean(-1).mean(), rtol=0, atol=1e-12)
        want = torch.stack([(rows * (distance[queries] == d)).sum(-1).mean(-1) for d in range(GRID[0])], -1)
        torch.testing.assert_close(got.mass["frame_distance"], want, rtol=0, atol=1e-6)
        torch.testing.assert_close(got.mass["win_tall_hwall"], torch.ones(q.shape[0], dtype=torch.float64))
        # float32 softmax rows (the benchmark's setting) stay within float32 rounding of fp64
        f32 = site_masses(q.float(), k.float(), queries, windows, chunk=16)
        for name in masks:
            torch.testing.assert_close(f32.mass[name], got.mass[name], rtol=0, atol=1e-5)


def test_band_width_is_the_arrow_menus_width():
    for s in (96, 2048, 16384):
        for f in (0.025, 0.0625, 0.125, 0.25):
            menu = candidates(HeadsConfig(arrow_fractions=(f,), caching=False, attention_precisions=()), s)
            arrows = [m.left for m in menu if m.kind == "arrow"]
            if arrows:  # the menu drops widths that would be full attention
                assert band_half_width(f, s) == arrows[0]


@pytest.mark.parametrize("call", [
    lambda: sample_queries(96, 97),                       # more queries than tokens
    lambda: sample_queries(96, 0),
    lambda: Windows(GRID, band_fractions=(0.0,)),         # zero width
    lambda: Windows(GRID, band_fractions=(1.5,)),
    lambda: Windows(GRID, side_extents=(4,)),             # even window: no centre
    lambda: Windows(GRID, frame_extents=(-1,)),
    lambda: Windows((4, 4), tile=None),
    lambda: site_masses(torch.zeros(2, 95, 8), torch.zeros(2, 95, 8), torch.tensor([0]), Windows(GRID)),
    lambda: site_masses(torch.zeros(2, 96, 8), torch.zeros(2, 96, 8), torch.tensor([96]), Windows(GRID)),
    lambda: site_masses(torch.zeros(2, 96, 8), torch.zeros(2, 96, 4), torch.tensor([0]), Windows(GRID)),
])
def test_hostile_inputs_get_typed_errors(call):
    with pytest.raises(LocalityError):
        call()


def test_capture_refuses_other_models_and_restores_attention():
    from diffusers.models.transformers import transformer_wan

    original = transformer_wan.dispatch_attention_fn
    with pytest.raises(LocalityError):
        with capture_self_attention(torch.nn.Linear(2, 2), lambda *a: None):
            pass
    model = tiny_wan()
    with pytest.raises(RuntimeError):
        with capture_self_attention(model, lambda *a: None):
            raise RuntimeError("boom")
    assert transformer_wan.dispatch_attention_fn is original
    assert not any(b.attn1._forward_pre_hooks or b.attn1._forward_hooks for b in model.blocks)
