"""benchmarks/e2e_flux.py end to end on the CPU (`--smoke`: a 2 + 2-block Flux, 12 steps): every
contender is in the JSON, the constant-time contenders are timed on the stated subset and
extrapolated, the cache / skip contenders ran every step, ditbake computed exactly the forwards its
plan's skip schedule leaves, its heads did less attention work, its weights are smaller, and the
speedups are the ratios of the recorded totals. torch.compile runs with dynamo's `eager` backend
here (graph capture and guards as on the GPU; inductor's CPU codegen alone costs ~30 s on CI).
Timing itself is the GPU run's (`bash benchmarks/gpu_e2e.sh flux`)."""
import json
import math
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "benchmarks"))  # the scripts import their siblings as top-level modules

pytestmark = pytest.mark.usefixtures("one_torch_thread")

STEPS, TIMED = 12, 4


@pytest.fixture(scope="module")
def result(tmp_path_factory):
    import e2e_flux

    tmp = tmp_path_factory.mktemp("e2e_flux")
    out = tmp / "e2e_flux.json"
    assert e2e_flux.main(["--smoke", "--steps", str(STEPS), "--timed-steps", str(TIMED), "--compile-backend", "eager",
                          "--artifact", str(tmp / "artifact"), "--out", str(out)]) == 0
    return json.loads(out.read_text())


def test_every_contender_is_timed(result):
    rows = result["rows"]
    expected = ["diffusers eager", "diffusers torch.compile", "diffusers FirstBlockCache(0.08) + torch.compile",
                "diffusers TaylorSeerCache(2) + torch.compile", "diffusers MagCache(0.06) + torch.compile",
                "ditbake eager"]
    assert sorted(rows) == sorted(expected)
    for name, row in rows.items():
        assert "error" not in row and "skipped" not in row, (name, row)
        assert row["total_s"] > 0 and row["step_ms_median"] > 0, name
    assert result["fidelity"].startswith("not measured")
    assert result["forwards_per_step"] == 1


def test_constant_contenders_extrapolate_a_stated_subset(result):
    for name in ("diffusers eager", "diffusers torch.compile"):
        row = result["rows"][name]
        assert row["timed_steps"] == len(row["step_ms"]) == TIMED
        assert row["total_s"] == pytest.approx(sum(row["step_ms"]) / TIMED * STEPS / 1e3)
        assert str(TIMED) in row["total_s_note"]
        assert row["forwards_computed"] == TIMED
    for name, row in result["rows"].items():  # cache / skip contenders: every step, no extrapolation
        if "Cache" in name or name.startswith("ditbake"):
            assert row["timed_steps"] == STEPS and "total_s_note" not in row, name
            assert row["total_s"] == pytest.approx(sum(row["step_ms"]) / 1e3)


def test_skip_counts_follow_the_plans(result):
    import e2e_flux

    rows = result["rows"]
    schedule = e2e_flux.skip_schedule(str(ROOT / "benchmarks/results/e2e_source_plan.json"), STEPS)
    for row in (rows["ditbake eager"],):
        assert row["plan"]["skipped_steps"] == [i for i, s in enumerate(schedule) if s]
        assert row["forwards_computed"] == STEPS - sum(schedule)
        assert row["skip_fraction"] == pytest.approx(sum(schedule) / STEPS)
        assert 0.3 < row["skip_fraction"] < 0.5  # the source's 0.4 budget survives the resampling
        assert 0 < row["attention_flops_fraction"] < 0.9  # the band heads did less than dense attention
    # TaylorSeer(2) computes steps 0, 1 (disable_cache_before_step=2), then every other step
    assert rows["diffusers TaylorSeerCache(2) + torch.compile"]["forwards_computed"] == 2 + math.ceil((STEPS - 2) / 2)
    for name, row in rows.items():
        assert 0 < row["forwards_computed"] <= row["timed_steps"], name
        assert row["skip_fraction"] == pytest.approx(1 - row["forwards_computed"] / row["timed_steps"]), name


def test_speedups_and_weights_come_from_the_rows(result):
    rows = result["rows"]
    eager, comp = rows["diffusers eager"]["total_s"], rows["diffusers torch.compile"]["total_s"]
    for name, row in rows.items():
        assert row["speedup_vs_eager"] == pytest.approx(eager / row["total_s"]), name
        assert row["speedup_vs_compile"] == pytest.approx(comp / row["total_s"]), name
    best = min(r["total_s"] for n, r in rows.items() if "Cache" in n)
    assert result["speedup_vs_best_cache_hook"] == pytest.approx(best / rows["ditbake eager"]["total_s"])
    ours = rows["ditbake eager"]
    # fp32 smoke model: every block linear of both kinds stored FP8 (1 byte instead of 4)
    assert ours["weight_bytes"] < rows["diffusers eager"]["weight_bytes"] / 2
    assert ours["artifact_bytes"] >= ours["weight_bytes"]
    assert ours["build_s"] > 0


@pytest.mark.parametrize("fmt", ["fp8", "int8"])
def test_plan_runs_every_block_linear_in_the_chosen_format(fmt):
    """`--linear-format`: the computed variant runs every block linear of both kinds in that W8A8 format
    (so the build stores no 16-bit copy of them), its heads in the asked precision; the other is the skip."""
    import e2e_flux
    import torch

    from ditbake.exporter.adapters import adapter_for

    adapter = adapter_for(e2e_flux.random_flux(e2e_flux.SMOKE_FLUX, torch.device("cpu"), torch.float32))
    skipped = [False, True, False, True]
    plan = e2e_flux.ditbake_plan(adapter, skipped, 0.5, "int8", 64, fmt)
    computed = plan.variants[0]
    assert dict(computed.precisions) == {n: fmt for n in adapter.linear_layers}
    assert {s.precision for _, schemes in computed.heads for s in schemes} == {"int8"}
    assert [plan.step_ids(i, "cond")[0] for i in range(4)] == [0, 1, 0, 1] and not plan.variants[1].compute
