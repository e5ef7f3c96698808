"""Runtime session: bad inputs get typed one-line errors; the block loop skips with cached Δ."""
import json

import pytest
import torch

from ditbake.exporter.planner import plan_from_calibration
from ditbake.runtime import BackendError, InputError, load
from ditbake.runtime.errors import PlanError
from ditbake.runtime.plan import BlockVariant, Plan

from tests.conftest import build_tiny_artifact
from tests.hand_loop import blocks_by_hand


@pytest.fixture(scope="module")
def session(tmp_path_factory):
    path, _ = build_tiny_artifact(tmp_path_factory.mktemp("s"), "tiny-wan", steps=3)
    return load(path)


def _embeds(session, batch=1):
    p = session.profile()
    return torch.randn(batch, p.text_len, 32)


@pytest.mark.parametrize("bad,message", [
    (lambda s: torch.randn(1, 5, 32), r"text_embeds has shape \[1, 5, 32\]"),
    (lambda s: torch.randn(1, 8, 31), r"expects \[batch, 8, 32\]"),
    (lambda s: torch.randn(2, 2, 8, 32), "text_embeds has shape"),
    (lambda s: torch.full((1, 8, 32), float("nan")), "NaN or Inf"),
    (lambda s: [[0.0]], "must be a torch.Tensor"),
])
def test_bad_text_embeds(session, bad, message):
    with pytest.raises(InputError, match=message) as info:
        session.generate(bad(session))
    assert "\n" not in str(info.value)


def test_bad_latents_profile_sampler(session):
    e = _embeds(session)
    with pytest.raises(InputError, match=r"latents have shape \[1, 4, 3, 8, 9\]"):
        session.generate(e, latents=torch.randn(1, 4, 3, 8, 9))
    with pytest.raises(InputError, match="NaN or Inf"):
        session.generate(e, latents=torch.full((1, 4, 3, 8, 8), float("inf")))
    with pytest.raises(InputError, match="profile 'f81' is not in this artifact; it supports p0"):
        session.generate(e, profile="f81")
    with pytest.raises(InputError, match="sampler 'ddim' is not baked"):
        session.generate(e, sampler="ddim")
    with pytest.raises(InputError, match="negative_embeds batch 2"):
        session.generate(e, _embeds(session, 2))


def test_backend_errors(tmp_path):
    path, _ = build_tiny_artifact(tmp_path, "tiny-wan", steps=2)
    with pytest.raises(BackendError, match="backend 'openvino' is not available"):
        load(path, backend="openvino")
    with pytest.raises(BackendError, match="built for backend 'eager', not 'tensorrt'"):
        load(path, backend="tensorrt")
    if not torch.cuda.is_available():
        with pytest.raises(BackendError, match="no CUDA GPU"):
            load(path, device="cuda")
    manifest = json.loads((path / "manifest.json").read_text())
    manifest["backend"] = "aoti"
    (path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(BackendError, match="built for backend 'aoti', not 'eager'"):
        load(path, backend="eager")


def test_seed_determinism_and_cfg(session):
    e, n = _embeds(session), _embeds(session)
    a = session.generate(e, n, seed=1).latents
    b = session.generate(e, n, seed=1).latents
    c = session.generate(e, n, seed=2).latents
    d = session.generate(e, n, seed=1, guidance_scale=1.0)
    assert torch.equal(a, b) and not torch.allclose(a, c)
    assert not torch.allclose(a, d.latents)
    assert d.report.block_computes == 3 * 3  # no uncond branch without guidance


def _skip_plan(meta):
    """Skip block 1 at step 2 in the cond branch only."""
    plan = plan_from_calibration(meta).to_json()
    plan["variants"].append(BlockVariant(compute=False).to_json())
    plan["steps"][2]["cond"] = [0, 1, 0]
    return Plan.from_json(plan)


@pytest.mark.parametrize("name", ["tiny-wan", "tiny-cogvideox"])
def test_skip_reuses_cached_delta_per_branch(tmp_path, name):
    path_skip, adapter = build_tiny_artifact(tmp_path / "a", name, steps=3, plan_fn=_skip_plan)
    path_full, _ = build_tiny_artifact(tmp_path / "b", name, steps=3)
    skip, full = load(path_skip), load(path_full)
    e = torch.randn(1, skip.profile().text_len, 32)
    n = torch.randn_like(e)
    res = skip.generate(e, n, seed=0, keep_trajectory=True)
    ref = full.generate(e, n, seed=0, keep_trajectory=True)
    assert res.report.block_skips == 1 and res.report.block_computes == 3 * 3 * 2 - 1
    assert res.report.skip_fraction == pytest.approx(1 / 18)
    # identical until the skipped step, different after it
    for i in range(3):
        torch.testing.assert_close(res.trajectory[i], ref.trajectory[i], rtol=0, atol=0)
    assert not torch.equal(res.trajectory[3], ref.trajectory[3])

    # Independent check of the skip rule, by hand: at step 2 the cond branch's block 1 is
    # replaced by h + Δ, where Δ = out − in of block 1 in the step-1 cond forward.
    from ditbake.runtime.attention import AttentionRunner
    from ditbake.runtime.sampler import BakedSampler

    w, cfg, arch = skip.weights, skip.config, skip.arch
    prof = skip.profile().to_json()
    table = skip.artifact.samplers[skip.artifact.default_sampler]
    text = {"cond": e, "uncond": n}

    def forward(x, step, branch, skip_delta=None):
        t = torch.full((1,), table.timesteps[step])
        h, ctx = arch.prologue(w, cfg, x, t, text[branch], prof)
        deltas = []
        for b in range(3):
            out = h + skip_delta if (skip_delta is not None and b == 1) else \
                arch.block(w, cfg, b, h, ctx, BlockVariant(), AttentionRunner(), branch)
            deltas.append(out - h)
            h = out
        return arch.epilogue(w, cfg, h, ctx), deltas

    with torch.no_grad():
        sampler, x, delta = BakedSampler(table), res.trajectory[0], None
        for i in range(3):
            cond, deltas = forward(x, i, "cond", skip_delta=delta if i == 2 else None)
            delta = deltas[1]
            uncond, _ = forward(x, i, "uncond")
            x = sampler.step(i, x, uncond + 5.0 * (cond - uncond))
    torch.testing.assert_close(x, res.latents, rtol=1e-5, atol=1e-5)


def _whole_step_plan(meta, extrapolation="none"):
    """Steps 2 and 4 skip every block in the uncond branch; step 3 skips block 0 of cond only."""
    plan = plan_from_calibration(meta).to_json()
    plan["variants"].append(BlockVariant(compute=False).to_json())
    skip = len(plan["variants"]) - 1
    plan["steps"][2]["uncond"] = [skip] * 3
    plan["steps"][4]["uncond"] = [skip] * 3
    plan["steps"][3]["cond"] = [skip, 0, 0]
    plan["stack_extrapolation"] = extrapolation
    return Plan.from_json(plan)


@pytest.mark.parametrize("extrapolation", ["none", "linear"])
def test_whole_step_skip_uses_one_stack_residual(tmp_path, extrapolation):
    path, _ = build_tiny_artifact(tmp_path, "tiny-wan", steps=5, plan_fn=lambda m: _whole_step_plan(m, extrapolation))
    session = load(path)
    assert session.plan.stack_extrapolation == extrapolation
    assert session._stack_skips == {(2, "uncond"), (4, "uncond")}
    assert session._cached_blocks == {("cond", 0)}  # only a block skipped on its own keeps its Δ
    e = torch.randn(1, session.profile().text_len, 32)
    n = torch.randn_like(e)
    res = session.generate(e, n, seed=3)
    assert res.report.block_skips == 7 and res.report.block_computes == 5 * 3 * 2 - 7

    # reference, written out: per-block Δs for single skips; for a whole skipped step the stack
    # residual R = out − in of the last computed step, or R₁ + c·(R₁ − R₀) with c in step units
    from ditbake.runtime.sampler import BakedSampler

    w, cfg, arch, plan = session.weights, session.config, session.arch, session.plan
    prof = session.profile().to_json()
    table = session.artifact.samplers[session.artifact.default_sampler]
    deltas, history = {}, {"cond": [], "uncond": []}  # history: (step, R) of computed steps
    with torch.no_grad():
        sampler = BakedSampler(table)
        x = torch.randn((1, *session.profile().latent_shape), generator=torch.Generator().manual_seed(3))
        x = x * table.init_noise_sigma
        for i in range(5):
            out = {}
            for branch, text in (("cond", e), ("uncond", n)):
                h, ctx = arch.prologue(w, cfg, x, torch.full((1,), table.timesteps[i]), text, prof)
                ids = plan.steps[i][branch]
                if not any(plan.variants[v].compute for v in ids):
                    (j0, r0), (j1, r1) = history[branch][-2:]
                    r = r1 + ((i - j1) / (j1 - j0)) * (r1 - r0) if extrapolation == "linear" else r1
                    out[branch] = arch.epilogue(w, cfg, h + r, ctx)
                    continue
                h_in = h
                h = blocks_by_hand(session, plan, ids, h, ctx, deltas, branch)
                history[branch].append((i, h - h_in))
                out[branch] = arch.epilogue(w, cfg, h, ctx)
            x = sampler.step(i, x, out["uncond"] + 5.0 * (out["cond"] - out["uncond"]))
    # fp32; the stack residual sums the same Δs in another order: rounding-level differences only
    torch.testing.assert_close(res.latents, x, rtol=1e-5, atol=1e-5)


def test_extrapolation_coefficients_follow_the_computed_steps():
    from ditbake.runtime.session import _extrapolation_coefficients

    meta = {"architecture": "wan", "num_blocks": 2, "linear_layers": ["attn1.to_q"],
            "attention_sites": {"attn1": 2}, "num_steps": 7, "branches": ["cond", "uncond"]}
    plan = plan_from_calibration(meta).to_json()
    plan["variants"].append(BlockVariant(compute=False).to_json())
    for i in (2, 4, 5):  # computed: 0, 1, 3, 6
        plan["steps"][i]["cond"] = [1, 1]
    plan["stack_extrapolation"] = "linear"
    plan = Plan.from_json(plan)
    stack = {(i, "cond") for i in (2, 4, 5)}
    assert _extrapolation_coefficients(plan, stack) == {(2, "cond"): 1.0, (4, "cond"): 0.5, (5, "cond"): 1.0}
    with pytest.raises(PlanError, match="stack_extrapolation must be one of"):
        Plan.from_json(plan.to_json() | {"stack_extrapolation": "cubic"})


def _head_plan(meta):
    """Arrow heads from step 1 and a cached head at step 2, in the cond branch."""
    plan = plan_from_calibration(meta).to_json()
    arrow = plan["variants"][0] | {"heads": {"attn1": [["arrow", 3, 3], ["full", 0, 0]]}}
    cached = plan["variants"][0] | {"heads": {"attn1": [["cached", 0, 0], ["arrow", 2, 5]]}}
    plan["variants"] += [arrow, cached]
    plan["steps"][1]["cond"] = [1, 1, 1]
    plan["steps"][2]["cond"] = [2, 1, 0]
    return Plan.from_json(plan)


@pytest.mark.parametrize("name", ["tiny-wan", "tiny-cogvideox"])
def test_head_schemes_run_and_count_flops(tmp_path, name):
    pytest.importorskip("ditbake.plugins.head_attention")
    path, _ = build_tiny_artifact(tmp_path, name, steps=3, plan_fn=_head_plan)
    full_path, _ = build_tiny_artifact(tmp_path / "full", name, steps=3)
    s, full = load(path), load(full_path)
    e = torch.randn(1, s.profile().text_len, 32)
    res = s.generate(e, seed=0, guidance_scale=1.0, keep_trajectory=True)
    ref = full.generate(e, seed=0, guidance_scale=1.0, keep_trajectory=True)
    assert torch.isfinite(res.latents).all()
    assert 0.3 < res.report.attention_flops_fraction < 1.0
    assert ref.report.attention_flops_fraction == 1.0
    torch.testing.assert_close(res.trajectory[1], ref.trajectory[1], rtol=0, atol=0)  # step 0 all full
    assert not torch.allclose(res.trajectory[2], ref.trajectory[2])
