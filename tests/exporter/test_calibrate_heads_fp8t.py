"""fp8t candidates of the head search: every head of a candidate through the cuDNN FP8 composite (its
reference on CPU), banded fp8t with text tokens not offered, and the MILP choosing fp8t heads."""
import pytest
import torch
import torch.nn.functional as F

from ditbake.exporter.calibrate_heads import CandidateRunner, HeadSearchAttention, relative_squared_error
from ditbake.exporter.plan_heads import HeadsConfig, candidates, savings
from ditbake.plugins import cudnn_sdpa
from ditbake.plugins.head_attention import invert_permutation, reorder_visual_tokens, tile_order
from ditbake.runtime.plan import HeadScheme

from tests.exporter.test_calibrate_heads import GRID, TILE, dense_mask

HEAD_DIM = 32  # fp8t's error bound (tests/plugins/test_cudnn_sdpa.py) was measured at head dims 32-128
# fp8t vs exact attention, relative L2 (see test_cudnn_sdpa.FP8T_BOUND): four independent E4M3
# roundings (q/k, P, V, output), ~5.5% together on unstructured data; an op that skipped rounding
# would be below the floor, a wrong band, tiling or smoothing far above the ceiling.
FP8T_BOUND = (0.02, 0.075)


def rel_err(out, ref) -> float:
    return ((out.double() - ref.double()).norm() / ref.double().norm()).item()


def fp8t_expected(scheme, q, k, v):
    """What the search must measure for an fp8t candidate without text: the composite's reference on
    the band, in tile order for local3d (written here from the plugins' primitives)."""
    if scheme.kind == "full":
        return cudnn_sdpa.fp8t_attention_ref(q, k, v)
    if scheme.kind == "arrow":
        return cudnn_sdpa.fp8t_attention_ref(q, k, v, scheme.left, scheme.right)
    perm = tile_order(GRID, TILE)
    tiled = [reorder_visual_tokens(t, perm, (0, 0), dim=2) for t in (q, k, v)]
    out = cudnn_sdpa.fp8t_attention_ref(*tiled, scheme.left, scheme.right)
    return reorder_visual_tokens(out, invert_permutation(perm), (0, 0), dim=2)


MENU = (HeadScheme("full"), HeadScheme("arrow", 9, 9), HeadScheme("local3d", 12, 12),
        HeadScheme("full", precision="fp8t"), HeadScheme("arrow", 9, 9, "fp8t"), HeadScheme("arrow", 0, 20, "fp8t"),
        HeadScheme("local3d", 12, 12, "fp8t"), HeadScheme("cached"))


def test_fp8t_candidates_are_the_composite_on_every_head(rng_seed):
    gen = torch.Generator().manual_seed(rng_seed)
    q, k, v = (torch.randn(2, 3, 72, HEAD_DIM, generator=gen) for _ in range(3))
    got = dict(CandidateRunner(TILE).outputs(MENU, q, k, v, (0, 0), GRID))
    assert sorted(got) == [1, 2, 3, 4, 5, 6]
    for c in (3, 4, 5, 6):
        scheme = MENU[c]
        assert torch.equal(got[c], fp8t_expected(scheme, q, k, v)), scheme
        mask = None if scheme.kind == "full" else dense_mask(scheme, 72, (0, 0), GRID, TILE)
        exact = F.scaled_dot_product_attention(q.double(), k.double(), v.double(), attn_mask=mask)
        err = rel_err(got[c], exact)
        assert FP8T_BOUND[0] < err < FP8T_BOUND[1], f"seed {rng_seed} {scheme}: {err:.4f}"
        # the bf16 twin's band is the same band: fp8t differs from it by its rounding only
        twin = HeadScheme(scheme.kind, scheme.left, scheme.right)
        if scheme.kind != "full" and twin in MENU:
            assert rel_err(got[c], got[MENU.index(twin)]) < FP8T_BOUND[1]


@pytest.mark.parametrize("text", [(0, 5), (72, 77)])
def test_banded_fp8t_with_text_tokens_is_not_offered(text, rng_seed):
    """cuDNN's band has no global rows/columns: arrow/local3d fp8t with text cannot run, full can."""
    gen = torch.Generator().manual_seed(rng_seed)
    q, k, v = (torch.randn(1, 2, 77, HEAD_DIM, generator=gen) for _ in range(3))
    got = dict(CandidateRunner(TILE).outputs(MENU, q, k, v, text, GRID))
    assert sorted(got) == [1, 2, 3]  # bf16 bands (text global) and full fp8t; no banded fp8t
    assert torch.equal(got[3], cudnn_sdpa.fp8t_attention_ref(q, k, v))
    exact = F.scaled_dot_product_attention(q.double(), k.double(), v.double())
    assert FP8T_BOUND[0] < rel_err(got[3], exact) < FP8T_BOUND[1]


@pytest.mark.parametrize("text", [(0, 0), (0, 5)])
def test_search_with_fp8t_precision_measures_and_chooses_fp8t_heads(text, rng_seed):
    """A tiny progressive search with attention_precisions=("fp8t",): the fp8t twins' errors are those
    of the composite's reference, banded fp8t with text stays unavailable (NaN, never chosen), and at a
    loose δ the MILP takes fp8t heads (they save the bands' FLOPs and the 8-bit speedup)."""
    gen = torch.Generator().manual_seed(rng_seed)
    config = HeadsConfig(delta=4.0, head_factor=1.5, arrow_fractions=(0.125,), local3d_tile=TILE,
                         local3d_fractions=(0.17,), attention_precisions=("fp8t",), eight_bit_speedup=2.0)
    menu = candidates(config, 72)
    assert [(s.kind, s.precision) for s in menu] == [("full", "bf16"), ("arrow", "bf16"), ("local3d", "bf16"),
                                                    ("full", "fp8t"), ("arrow", "fp8t"), ("local3d", "fp8t"),
                                                    ("cached", "bf16")]
    seq = 72 + text[1]
    site = {"attn": {"menu": menu, "heads": 4, "saving": savings(menu, text[1], 72, HEAD_DIM, 2.0)}}
    search = HeadSearchAttention(config, site, (1, 2, 1))
    for step in range(2):
        q, k, v = (torch.randn(2, 4, seq, HEAD_DIM, generator=gen) for _ in range(3))
        search.where = (0, step)
        out = search(("cond", 0, "attn"), q, k, v, None, text, GRID)
        full = F.scaled_dot_product_attention(q, k, v)
        errors = search.errors["attn"][0, step, 0]
        torch.testing.assert_close(errors[:, 3], relative_squared_error(cudnn_sdpa.fp8t_attention_ref(q, k, v), full),
                                   rtol=1e-4, atol=1e-7)
        # full fp8t: the relative squared error of a ~5.5% relative L2 error
        assert ((errors[:, 3] > FP8T_BOUND[0] ** 2) & (errors[:, 3] < FP8T_BOUND[1] ** 2)).all(), errors[:, 3]
        choice = search.choice["attn"][0, step, 0].long()
        if text == (0, 0):
            for c in (4, 5):
                torch.testing.assert_close(errors[:, c], relative_squared_error(fp8t_expected(menu[c], q, k, v), full),
                                           rtol=1e-4, atol=1e-7)
        else:
            assert torch.isnan(errors[:, 4:6]).all()
            assert not ((choice == 4) | (choice == 5)).any()
        for h, c in enumerate(choice.tolist()):
            assert torch.isfinite(errors[h, c]) or c == 0
            if menu[c].precision == "fp8t":
                torch.testing.assert_close(out[:, h], (fp8t_expected(menu[c], q, k, v))[:, h], rtol=0, atol=0)
    chosen = [menu[c] for c in search.choice["attn"].flatten().tolist()]
    assert any(s.precision == "fp8t" for s in chosen), chosen


def test_fp8t_is_accepted_by_the_config_and_the_cli_flag():
    import argparse

    from ditbake.exporter.cli import _heads_config

    args = argparse.Namespace(heads_delta=0.1, heads_c=None, heads_widths=None, heads_no_cache=False, heads_tile=None,
                              heads_precisions="int8, fp8t", heads_8bit_speedup=None)
    config = _heads_config(args)
    assert config.attention_precisions == ("int8", "fp8t")
    assert HeadsConfig.from_json(config.to_json()) == config
    menu = candidates(HeadsConfig(arrow_fractions=(0.25,), attention_precisions=("fp8t",)), 64)
    assert HeadScheme("arrow", 16, 16, "fp8t") in menu and HeadScheme.from_json(["full", 0, 0, "fp8t"]) in menu


@pytest.mark.parametrize("name,latent,text_len", [("tiny-wan", (4, 4, 8, 8), 6), ("tiny-sd3", (4, 8, 8), 6)])
def test_calibration_plans_fp8t_heads(name, latent, text_len):
    """The whole progressive search on a tiny model with attention_precisions=("fp8t",) and the planner
    pass: Wan's self-attention has no text tokens, so every fp8t twin is measured; SD3's joint
    attention has, so its banded fp8t twins stay NaN and never reach the plan while full fp8t does."""
    from ditbake.exporter.plan_heads import heads_pass
    from ditbake.exporter.planner import plan_from_calibration
    from tests.exporter.test_plan_heads import _calibrate

    config = HeadsConfig(delta=2.0, head_factor=3.0, arrow_fractions=(0.1,), attention_precisions=("fp8t",),
                         eight_bit_speedup=2.0)
    adapter, tensors, meta, plan_meta = _calibrate(name, latent, text_len, config, steps=2)
    site = next(iter(meta["sites"]))
    menu = [HeadScheme.from_json(c) for c in meta["sites"][site]["candidates"]]
    errors = tensors[f"heads_error.{site}"]
    fp8t = [c for c, s in enumerate(menu) if s.precision == "fp8t"]
    banded = [c for c in fp8t if menu[c].kind != "full"]
    assert [menu[c].kind for c in fp8t] == ["full", "arrow"]
    full8 = errors[..., fp8t[0]]
    assert torch.isfinite(full8).all() and (full8 > 0).all() and (full8 < FP8T_BOUND[1] ** 2).all()
    has_text = meta["sites"][site]["text_tokens"] > 0
    assert has_text == (name == "tiny-sd3")
    assert torch.isnan(errors[..., banded]).all() == has_text
    assert torch.isfinite(errors[..., banded]).all() != has_text
    plan = plan_from_calibration(plan_meta, passes=[heads_pass(tensors, meta)])
    used = {s for v in plan.variants for _, schemes in v.heads for s in schemes}
    assert any(s.precision == "fp8t" for s in used), used
    assert not (has_text and any(s.precision == "fp8t" and s.kind != "full" for s in used)), used
