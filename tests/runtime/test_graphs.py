"""CUDA graphs in the baked loop: where they are allowed, and (on a GPU) that replaying captured
forwards gives what the eager loop gives, across steps and across generate calls."""
import pytest
import torch

from ditbake.exporter import build as builder
from ditbake.exporter.planner import plan_from_calibration
from ditbake.runtime import BackendError, load
from ditbake.runtime.graphs import graph_blockers
from ditbake.runtime.plan import BlockVariant, Plan

from tests.conftest import build_tiny_artifact


def _plan(meta, heads=None):
    """Skips of single blocks and of whole steps, repeated step patterns (so graphs get replayed),
    optionally a head scheme on block 1."""
    plan = plan_from_calibration(meta).to_json()
    plan["variants"].append(BlockVariant(compute=False).to_json())
    skip = len(plan["variants"]) - 1
    if heads:
        plan["variants"].append(plan["variants"][0] | {"heads": {"attn1": heads}})
        special = len(plan["variants"]) - 1
    else:
        special = 0
    for i, step in enumerate(plan["steps"]):
        if i >= 2 and i % 2 == 0:
            step["cond"] = [skip, special, 0]
            step["uncond"] = [skip] * 3
        elif i >= 2:
            step["cond"] = step["uncond"] = [0, special, 0]
    return Plan.from_json(plan)


def _meta(steps=6):
    return {"architecture": "wan", "num_blocks": 3, "linear_layers": ["attn1.to_q"],
            "attention_sites": {"attn1": 2}, "num_steps": steps, "branches": ["cond", "uncond"]}


def test_blockers_name_each_reason():
    meta = _meta()
    assert graph_blockers(torch.device("cuda"), _plan(meta), "aoti") == []
    assert any("device is cpu" in r for r in graph_blockers(torch.device("cpu"), _plan(meta), "aoti"))
    assert any("eager backend" in r for r in graph_blockers(torch.device("cuda"), _plan(meta), "eager"))
    cached = _plan(meta, heads=[["cached", 0, 0], ["full", 0, 0]])
    assert any("cached" in r for r in graph_blockers(torch.device("cuda"), cached, "aoti"))
    arrow = _plan(meta, heads=[["arrow", 2, 2], ["full", 0, 0]])
    assert graph_blockers(torch.device("cuda"), arrow, "aoti") == []


def test_required_graphs_refused_on_cpu(tmp_path):
    path, _ = build_tiny_artifact(tmp_path, "tiny-wan", steps=4)
    with pytest.raises(BackendError, match="CUDA graphs are not possible here: device is cpu"):
        load(path, cuda_graphs=True)
    assert load(path)._graphs is None  # the default quietly runs without them


@pytest.mark.gpu
def test_graph_replay_matches_eager_loop(tmp_path, monkeypatch):
    # fp32 tiny model: no arrow heads here (the GPU head kernel takes bf16/fp16 and head dims 64/128;
    # benchmarks/e2e.py runs arrow heads under graphs at Wan2.1-1.3B size)
    orig = builder.build
    monkeypatch.setattr(builder, "build", lambda *a, **k: orig(*a, **{**k, "backend": "aoti", "device": "cuda"}))
    path, _ = build_tiny_artifact(tmp_path, "tiny-wan", steps=6, plan_fn=_plan)
    graphed, plain = load(path, device="cuda", cuda_graphs=True), load(path, device="cuda", cuda_graphs=False)
    e = torch.randn(1, plain.profile().text_len, 32)
    n = torch.randn_like(e)
    ref = plain.generate(e, n, seed=4)
    # 4 step patterns (per branch): each runs eagerly at its first use (steps 0, 2), is captured at
    # its second (steps 1, 4) and replayed after (steps 3, 5)
    first = graphed.generate(e, n, seed=4)
    again = graphed.generate(torch.randn_like(e), n, seed=5)  # every forward replayed, other inputs
    second = graphed.generate(e, n, seed=4)
    assert first.report.graph_captures == 4 and first.report.graph_replays == 4
    for r in (again, second):
        assert r.report.graph_captures == 0 and r.report.graph_replays == 6 * 2
    for r in (first, second):
        # the same kernels in the same order: fp32 rounding-level differences at most
        torch.testing.assert_close(r.latents, ref.latents, rtol=1e-5, atol=1e-5)
        assert r.report.block_skips == ref.report.block_skips
        assert r.report.block_computes == ref.report.block_computes
        assert r.report.attention_flops_done == pytest.approx(ref.report.attention_flops_done)
    assert not torch.allclose(again.latents, ref.latents, atol=1e-3)  # graphs read the new inputs
