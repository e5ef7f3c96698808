"""Guidance skips (plan.uncond_skip == "guidance"): a skipped uncond stack at a step where cond
computes is cond's fresh residual plus the gap uncond − cond of the last step both computed."""
import pytest
import torch

from ditbake.exporter.planner import plan_from_calibration
from ditbake.runtime import InputError, load
from ditbake.runtime.errors import PlanError
from ditbake.runtime.plan import BlockVariant, Plan

from tests.conftest import build_tiny_artifact
from tests.hand_loop import blocks_by_hand

STEPS = 7


def _guidance_plan(meta, uncond_skip="guidance", extrapolation="linear"):
    """uncond guidance-skipped at steps 2 and 5; step 3 skips both stacks (own extrapolation);
    step 4 skips cond's block 0 only (a partial stack still measures a residual)."""
    plan = plan_from_calibration(meta).to_json()
    plan["variants"].append(BlockVariant(compute=False).to_json())
    skip = len(plan["variants"]) - 1
    for i in (2, 5):
        plan["steps"][i]["uncond"] = [skip] * 3
    plan["steps"][3] = {"cond": [skip] * 3, "uncond": [skip] * 3}
    plan["steps"][4]["cond"] = [skip, 0, 0]
    plan["stack_extrapolation"] = extrapolation
    plan["uncond_skip"], plan["version"] = uncond_skip, 2
    return Plan.from_json(plan)


@pytest.fixture(scope="module")
def guided(tmp_path_factory):
    path, _ = build_tiny_artifact(tmp_path_factory.mktemp("g"), "tiny-wan", steps=STEPS, plan_fn=_guidance_plan)
    return load(path)


def _reference(session, e, n, seed, guidance_steps):
    """The loop written out: per-block Δs, stack residuals, the gap, linear extrapolation."""
    from ditbake.runtime.sampler import BakedSampler

    w, cfg, arch, plan = session.weights, session.config, session.arch, session.plan
    prof = session.profile().to_json()
    table = session.artifact.samplers[session.artifact.default_sampler]
    deltas, history, last = {}, {"cond": [], "uncond": []}, {}
    sampler = BakedSampler(table)
    x = torch.randn((1, *session.profile().latent_shape), generator=torch.Generator().manual_seed(seed))
    x = x * table.init_noise_sigma
    with torch.no_grad():
        for i in range(STEPS):
            out = {}
            for branch, text in (("cond", e), ("uncond", n)):
                h, ctx = arch.prologue(w, cfg, x, torch.full((1,), table.timesteps[i]), text, prof)
                ids = plan.steps[i][branch]
                if branch == "uncond" and i in guidance_steps:
                    out[branch] = arch.epilogue(w, cfg, h + last["cond"] + last["gap"], ctx)
                    continue
                if not any(plan.variants[v].compute for v in ids):
                    (j0, r0), (j1, r1) = history[branch][-2:]
                    out[branch] = arch.epilogue(w, cfg, h + r1 + ((i - j1) / (j1 - j0)) * (r1 - r0), ctx)
                    continue
                h_in = h
                h = blocks_by_hand(session, plan, ids, h, ctx, deltas, branch)
                history[branch].append((i, h - h_in))
                last[branch] = h - h_in
                if branch == "uncond":
                    last["gap"] = last["uncond"] - last["cond"]
                out[branch] = arch.epilogue(w, cfg, h, ctx)
            x = sampler.step(i, x, out["uncond"] + 5.0 * (out["cond"] - out["uncond"]))
    return x


def test_guidance_skip_matches_the_loop_written_out(guided):
    session = guided
    assert session.plan.uncond_skip == "guidance"
    assert session._guidance_steps == {2, 5}  # step 3 skips both: uncond's own extrapolation serves it
    e = torch.randn(1, session.profile().text_len, 32)
    n = torch.randn_like(e)
    res = session.generate(e, n, seed=11)
    assert res.report.block_skips == 3 * 4 + 1 and res.report.block_computes == STEPS * 3 * 2 - 13
    torch.testing.assert_close(res.latents, _reference(session, e, n, 11, {2, 5}), rtol=1e-5, atol=1e-5)
    # and it is not the residual reuse of the same steps: the two differ by more than rounding
    own = _reference(session, e, n, 11, set())
    assert (own - res.latents).abs().max() > 1e-3


def test_forward_once_needs_cond_first(guided):
    session = guided
    state = session.new_state()
    prof = session.profile()
    x = torch.randn(1, *prof.latent_shape)
    t = torch.full((1,), 500.0)
    e = torch.randn(1, prof.text_len, 32)
    with pytest.raises(InputError, match="run cond before uncond"):
        session.forward_once(state, 0, "uncond", x, t, e)
    session.forward_once(state, 0, "cond", x, t, e)
    session.forward_once(state, 0, "uncond", x, t, e)
    session.forward_once(state, 1, "cond", x, t, e)
    session.forward_once(state, 1, "uncond", x, t, e)
    with pytest.raises(InputError, match="run cond before uncond"):  # step 2's cond has not run
        session.forward_once(state, 2, "uncond", x, t, e)


def test_forward_once_equals_generate(guided):
    """The drop-in's path (forward_once per branch, the caller's CFG) gives generate's latents."""
    from ditbake.runtime.sampler import BakedSampler

    session = guided
    e = torch.randn(1, session.profile().text_len, 32)
    n = torch.randn_like(e)
    res = session.generate(e, n, seed=5)
    table = session.artifact.samplers[session.artifact.default_sampler]
    sampler, state = BakedSampler(table), session.new_state()
    x = torch.randn((1, *session.profile().latent_shape), generator=torch.Generator().manual_seed(5))
    x = x * table.init_noise_sigma
    with torch.no_grad():
        for i in range(STEPS):
            t = torch.full((1,), table.timesteps[i])
            c = session.forward_once(state, i, "cond", x, t, e)
            u = session.forward_once(state, i, "uncond", x, t, n)
            x = sampler.step(i, x, u + 5.0 * (c - u))
    torch.testing.assert_close(x, res.latents, rtol=1e-5, atol=1e-5)


def _meta():
    return {"architecture": "wan", "num_blocks": 2, "linear_layers": ["attn1.to_q"],
            "attention_sites": {"attn1": 2}, "num_steps": 4, "branches": ["cond", "uncond"]}


@pytest.mark.parametrize("edit,message", [
    (lambda p: p.update(uncond_skip="cfg"), "uncond_skip must be one of"),
    (lambda p: p.update(uncond_skip=3), "malformed plan: uncond_skip"),
    (lambda p: p.update(uncond_skip=None), "malformed plan: uncond_skip"),
    # uncond computes where cond skips: no gap can be measured there
    (lambda p: p["steps"][2].update(cond=[1, 1]), "uncond computes where cond skips"),
])
def test_bad_guidance_plans_are_refused(edit, message):
    plan = plan_from_calibration(_meta()).to_json()
    plan["variants"].append(BlockVariant(compute=False).to_json())
    plan["uncond_skip"], plan["version"] = "guidance", 2
    edit(plan)
    with pytest.raises(PlanError, match=message):
        Plan.from_json(plan)


def test_guidance_needs_a_baked_plan():
    plan = plan_from_calibration(_meta())
    with pytest.raises(PlanError, match="needs a baked plan"):
        Plan(**{**plan.__dict__, "mode": "adaptive", "adaptive": {"x": 1}, "uncond_skip": "guidance"})


def test_round_trip_and_default():
    plan = plan_from_calibration(_meta()).to_json()
    assert Plan.from_json(plan).uncond_skip == "residual"
    plan.pop("uncond_skip", None)  # plans written before the field read as residual reuse
    assert Plan.from_json(plan).uncond_skip == "residual"
    plan["uncond_skip"], plan["version"] = "guidance", 2
    again = Plan.from_json(Plan.from_json(plan).to_json())
    assert again.uncond_skip == "guidance" and again == Plan.from_json(plan)


def test_graph_keys_tell_guidance_skips_from_own_residual_skips(tmp_path):
    """A CUDA graph is replayed for every step with its key: a guidance skip and an own-residual
    skip of uncond have the same variant ids and, here (no extrapolation), the same coefficient,
    so without the flag one step's graph would replay the other's computation."""
    path, _ = build_tiny_artifact(tmp_path, "tiny-wan", steps=STEPS,
                                  plan_fn=lambda m: _guidance_plan(m, extrapolation="none"))
    session = load(path)
    keys = {i: session._graph_key(i, "uncond") for i in range(STEPS)}
    assert keys[2][:-2] == keys[3][:-2] == keys[5][:-2]  # all three skip every block
    assert keys[2][-1] and keys[5][-1] and not keys[3][-1]
    assert keys[3] not in (keys[2], keys[5])
    assert not any(session._graph_key(i, "cond")[-1] for i in range(STEPS))


def test_cfg_parallel_refuses_guidance_plans(guided, monkeypatch):
    """Guidance skips read cond's residual while computing uncond; CFG-parallel puts the branches on
    different ranks, so the session refuses before any group is made (a 2-rank job, faked)."""
    import torch.distributed as dist

    from ditbake.runtime.distributed import ParallelError, ParallelSession

    monkeypatch.setattr(dist, "get_world_size", lambda *a, **k: 2)
    monkeypatch.setattr(dist, "get_rank", lambda *a, **k: 0)
    with pytest.raises(ParallelError, match="reuse cond's residual"):
        ParallelSession(guided.artifact, torch.device("cpu"), None, parallel="cfg")


def test_guidance_plans_are_version_2_and_older_versions_refuse_them():
    """A version-1 reader ignores unknown fields and would serve guidance steps from uncond's own
    residual: guidance plans are written as version 2 (which it refuses); plans without them stay 1."""
    plan = plan_from_calibration(_meta()).to_json()
    assert plan["version"] == 1 and Plan.from_json(plan).to_json()["version"] == 1
    plan["uncond_skip"] = "guidance"
    with pytest.raises(PlanError, match="guidance skips is version 2"):
        Plan.from_json(plan)  # says 1 but uses guidance skips
    plan["version"] = 2
    written = Plan.from_json(plan).to_json()
    assert written["version"] == 2 and Plan.from_json(written).uncond_skip == "guidance"
    for bad in (3, 0, True, "2", None):
        with pytest.raises(PlanError, match="not supported"):
            Plan.from_json(plan | {"version": bad})
