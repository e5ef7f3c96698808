"""Several processes (gloo on the CPU): CFG-parallel, Ulysses and both together give the
single-process result of the same artifact, with a plan that skips single blocks and whole steps
(linear stack extrapolation) and runs arrow, local3d and cached heads.

fp32 artifacts: CFG-parallel runs each branch's forward exactly as one process does (bit-equal
expected); Ulysses runs the token-wise ops on sequence shards and attention on all tokens of
fewer heads, so only the reduction order inside matmuls changes: rounding-level differences
(tolerance 1e-5 on latents of unit scale). One spawn per world size; the processes run several
sessions each.
"""
import json
import socket

import pytest
import torch
import torch.multiprocessing as mp
from safetensors.torch import load_file, save_file

from ditbake.runtime import load
from ditbake.runtime.distributed import Layout, ParallelError, default_mode, head_assignment
from ditbake.runtime.plan import BlockVariant, Plan

STEPS = 6
# tiny Wan with 4 heads, so that 2 sequence ranks get 2 heads each and the head grouping matters
CONFIG = {"_class_name": "WanTransformer3DModel", "patch_size": [1, 2, 2], "num_attention_heads": 4,
          "attention_head_dim": 16, "in_channels": 4, "out_channels": 4, "text_dim": 32, "freq_dim": 32,
          "ffn_dim": 64, "num_layers": 3, "cross_attn_norm": True, "qk_norm": "rms_norm_across_heads",
          "eps": 1e-6, "rope_max_seq_len": 64}
LATENT = (4, 3, 8, 8)  # 3 × 4 × 4 = 48 visual tokens: 24 per rank on 2 sequence ranks


def mixed_plan(meta) -> Plan:
    """Per-block skips and whole-step skips in both branches, arrow/local3d/cached heads."""
    from ditbake.exporter.planner import plan_from_calibration

    plan = plan_from_calibration(meta).to_json()
    base = plan["variants"][0]
    # head orders by scheme history come out as (2, 0, 3, 1): a permutation that is not its own inverse
    a = base | {"heads": {"attn1": [["cached", 0, 0], ["local3d", 4, 4], ["arrow", 3, 3], ["full", 0, 0]]}}
    c = base | {"heads": {"attn1": [["arrow", 2, 5], ["local3d", 4, 4], ["arrow", 3, 3], ["cached", 0, 0]]}}
    plan["variants"] += [BlockVariant(compute=False).to_json(), a, c]  # ids 1 (skip), 2, 3
    plan["steps"] = [{"cond": [0, 0, 0], "uncond": [0, 0, 0]},
                     {"cond": [2, 2, 2], "uncond": [2, 0, 2]},
                     {"cond": [3, 2, 1], "uncond": [1, 1, 1]},  # uncond: whole step from the stack residual
                     {"cond": [2, 1, 2], "uncond": [3, 2, 0]},
                     {"cond": [1, 1, 1], "uncond": [2, 2, 2]},  # cond: whole step
                     {"cond": [0, 3, 2], "uncond": [1, 0, 0]}]
    plan["tiles"] = {"attn1": [1, 2, 2]}
    plan["stack_extrapolation"] = "linear"
    return Plan.from_json(plan)


@pytest.fixture(scope="module")
def artifact(tmp_path_factory):
    from ditbake.exporter import build as builder, models
    from ditbake.exporter.adapters import adapter_for
    from ditbake.runtime.artifact import Profile

    adapter = adapter_for(models.from_config(CONFIG))
    meta = {"architecture": "wan", "num_blocks": 3, "linear_layers": list(adapter.linear_layers),
            "attention_sites": adapter.attention_sites, "num_steps": STEPS, "branches": ["cond", "uncond"]}
    return builder.build(adapter, mixed_plan(meta), tmp_path_factory.mktemp("dist") / "wan4",
                         profiles=[Profile("p0", LATENT, 8)], samplers=["unipc"], dtype=torch.float32,
                         progress=False)


# tiny tensors: one intra-op thread is faster and does not spin against the worker processes
pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, path: str, out: str, runs: list) -> None:
    import os

    torch.set_num_threads(1)
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    inputs = load_file(f"{out}/inputs.safetensors")
    from ditbake.runtime.distributed import shutdown

    threads = len(os.listdir("/proc/self/task"))
    try:
        for name, mode, guidance, batch in runs:
            session = load(path, parallel=mode)
            res = session.generate(inputs["cond"][:batch], inputs["uncond"][:batch], seed=7, guidance_scale=guidance,
                                   keep_trajectory=True)
            save_file({"latents": res.latents, "trajectory": torch.stack(res.trajectory)},
                      f"{out}/{name}-{rank}.safetensors")
            with open(f"{out}/{name}-{rank}.json", "w") as f:
                json.dump(res.report.to_json() | {"writer": session.is_writer, "layout": list(
                    (session.layout.cfg, session.layout.sp))}, f)
        # with the last session still held, shutdown() frees the groups: no communication thread is left
        # to release tensors while the interpreter exits (that aborted this test now and then)
        shutdown()
        after = len(os.listdir("/proc/self/task"))
        try:  # the session outlives its job: a typed refusal, not a torch error from a destroyed group
            session.generate(inputs["cond"][:batch], inputs["uncond"][:batch], seed=7, guidance_scale=guidance)
            refused = None
        except ParallelError as exc:
            refused = str(exc)
        with open(f"{out}/threads-{rank}.json", "w") as f:
            json.dump([threads, after, refused], f)
    finally:
        shutdown()


def _run(artifact, tmp_path, world: int, runs: list) -> None:
    mp.spawn(_worker, args=(world, _free_port(), str(artifact), str(tmp_path), runs), nprocs=world)


def _reference(artifact, inputs, guidance, batch):
    return load(artifact).generate(inputs["cond"][:batch], inputs["uncond"][:batch], seed=7,
                                   guidance_scale=guidance, keep_trajectory=True)


def _check(tmp_path, name, world, ref, exact: bool) -> None:
    tol = dict(rtol=0, atol=0) if exact else dict(rtol=1e-5, atol=1e-5)
    want = ref.report.to_json()
    for rank in range(world):
        before, after, refused = json.loads((tmp_path / f"threads-{rank}.json").read_text())
        assert after == before, f"rank {rank}: {after - before} threads outlive shutdown()"
        assert "has been shut down" in refused
        got = load_file(tmp_path / f"{name}-{rank}.safetensors")
        torch.testing.assert_close(got["trajectory"], torch.stack(ref.trajectory), **tol)
        report = json.loads((tmp_path / f"{name}-{rank}.json").read_text())
        assert report["writer"] == (rank == 0)
        # the report covers the whole job, as one process's would
        for k in ("block_computes", "block_skips", "steps"):
            assert report[k] == want[k], (name, rank, k)
        assert report["attention_flops_fraction"] == pytest.approx(want["attention_flops_fraction"], rel=1e-9)


@pytest.fixture
def inputs(tmp_path, rng_seed):
    e = {"cond": torch.randn(2, 8, 32), "uncond": torch.randn(2, 8, 32)}
    save_file(e, tmp_path / "inputs.safetensors")
    return e


def test_two_ranks_cfg_and_ulysses(artifact, tmp_path, inputs):
    runs = [("cfg", "cfg", 5.0, 1), ("ulysses", "ulysses", 5.0, 2), ("ulysses-nocfg", "ulysses", 1.0, 1)]
    _run(artifact, tmp_path, 2, runs)
    ref = _reference(artifact, inputs, 5.0, 1)
    # the plan is exercised: skips of both kinds and every head kind ran
    assert ref.report.block_skips == 9 and ref.report.attention_flops_fraction < 0.95
    assert head_assignment(load(artifact).plan, 2)[0, "attn1"] == (2, 0, 3, 1)  # heads do move between ranks
    _check(tmp_path, "cfg", 2, ref, exact=True)
    _check(tmp_path, "ulysses", 2, _reference(artifact, inputs, 5.0, 2), exact=False)
    _check(tmp_path, "ulysses-nocfg", 2, _reference(artifact, inputs, 1.0, 1), exact=False)


def test_four_ranks_cfg_times_ulysses(artifact, tmp_path, inputs):
    _run(artifact, tmp_path, 4, [("both", "cfg+ulysses", 5.0, 1)])
    _check(tmp_path, "both", 4, _reference(artifact, inputs, 5.0, 1), exact=False)
    for rank in range(4):
        assert json.loads((tmp_path / f"both-{rank}.json").read_text())["layout"] == [2, 2]


def test_layout_and_default_mode():
    assert [(Layout.resolve("cfg+ulysses", 4, r).cfg_rank, Layout.resolve("cfg+ulysses", 4, r).sp_rank)
            for r in range(4)] == [(0, 0), (0, 1), (1, 0), (1, 1)]
    assert Layout.resolve("ulysses", 3, 2).sp_rank == 2 and Layout.resolve("cfg", 2, 1).cfg_rank == 1
    for mode, world, message in [("cfg", 4, "use 'cfg\\+ulysses'"), ("cfg+ulysses", 2, "even number ≥ 4"),
                                 ("cfg+ulysses", 5, "even number"), ("ring", 2, "unknown"),
                                 ("ulysses", 1, "at least 2 processes")]:
        with pytest.raises(ParallelError, match=message):
            Layout.resolve(mode, world, 0)
    assert default_mode(2, 5.0) == "cfg" and default_mode(4, 5.0) == "cfg+ulysses"
    assert default_mode(2, 1.0) == "ulysses" and default_mode(3, 5.0) == "ulysses"


def test_heads_of_one_scheme_history_share_a_rank():
    meta = {"architecture": "wan", "num_blocks": 2, "linear_layers": ["attn1.to_q"],
            "attention_sites": {"attn1": 4}, "num_steps": 3, "branches": ["cond", "uncond"]}
    from ditbake.exporter.planner import plan_from_calibration

    p = plan_from_calibration(meta).to_json()
    sparse = p["variants"][0] | {"heads": {"attn1": [["arrow", 1, 1], ["full", 0, 0], ["arrow", 1, 1],
                                                     ["full", 0, 0]]}}
    cached = p["variants"][0] | {"heads": {"attn1": [["full", 0, 0], ["full", 0, 0], ["cached", 0, 0],
                                                     ["cached", 0, 0]]}}
    p["variants"] += [sparse, cached]
    p["steps"] = [{"cond": [0, 0]}, {"cond": [1, 2]}, {"cond": [1, 2]}]
    order = head_assignment(Plan.from_json(p), 2)
    pairs = lambda o: {frozenset(o[:2]), frozenset(o[2:])}  # noqa: E731
    assert pairs(order[0, "attn1"]) == {frozenset({0, 2}), frozenset({1, 3})}  # the arrow heads together
    assert pairs(order[1, "attn1"]) == {frozenset({0, 1}), frozenset({2, 3})}  # the cached heads together
    assert order[0, "attn1"] == (0, 2, 1, 3) and order[1, "attn1"] == (2, 3, 0, 1)


def test_refusals(artifact, monkeypatch):
    from ditbake.runtime.artifact import load_artifact
    from ditbake.runtime.distributed import _check_ulysses

    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.delenv("RANK", raising=False)
    with pytest.raises(ParallelError, match="torchrun"):
        load(artifact, parallel="cfg")
    art = load_artifact(artifact)
    _check_ulysses(art, 2)
    with pytest.raises(ParallelError, match="4 attention heads do not split over 3"):
        _check_ulysses(art, 3)
    from ditbake.runtime.distributed import SequenceShardedEngines
    from ditbake.runtime.engines import EagerEngines

    engines = SequenceShardedEngines(EagerEngines(None, art.config, art.weights), None, 5, 0, {}, "cpu")
    with pytest.raises(ParallelError, match="48 visual tokens do not split over 5 sequence ranks"):
        engines._shard(torch.zeros(1, 48, 8))
    from ditbake.runtime.distributed import _process_group

    with pytest.raises(ParallelError, match="has been shut down"):  # a session used after shutdown()
        _process_group((0, 1))
    art.manifest["backend"] = "aoti"
    with pytest.raises(ParallelError, match="needs the eager backend"):
        _check_ulysses(art, 2)
    art.manifest["model"]["architecture"] = "sd3"
    with pytest.raises(ParallelError, match="joint text\\+visual"):
        _check_ulysses(art, 2)


def test_cli_relaunches_under_torchrun_and_rank0_writes(artifact, tmp_path):
    """`ditbake run --gpus 2` on the CPU (gloo): the same clip and report as one process, written once."""
    from ditbake.exporter.cli import main

    random = ["--random-embeddings", "--guidance", "5"]
    assert main(["run", str(artifact), "--out", str(tmp_path / "one"), "--seed", "3", *random]) == 0
    assert main(["run", str(artifact), "--out", str(tmp_path / "two"), "--seed", "3", "--gpus", "2",
                 "--parallel", "cfg", *random]) == 0
    assert (tmp_path / "one" / "strip.png").read_bytes() == (tmp_path / "two" / "strip.png").read_bytes()
    one, two = (json.loads((tmp_path / d / "report.json").read_text()) for d in ("one", "two"))
    assert {k: v for k, v in one.items() if k != "seconds"} == {k: v for k, v in two.items() if k != "seconds"}
    # what can be refused before any process starts keeps its exit code
    assert main(["run", str(artifact), "--out", str(tmp_path / "x"), "--gpus", "4", "--parallel", "cfg", *random]) == 14
    assert main(["run", str(artifact), "--out", str(tmp_path / "x"), "--parallel", "ulysses", *random]) == 14
    assert not (tmp_path / "x").exists()
