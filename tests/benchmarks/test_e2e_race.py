"""The CPU-side pieces of the end-to-end race (benchmarks/e2e.py peers phase, benchmarks/e2e_plot.py):
the PSNR bar a peer must reach, the fidelity JSON's step check, the merge's best peer, and the plot
of a merged JSON. The GPU phases themselves run on the H100 (benchmarks/gpu_e2e.sh)."""
import argparse
import json
import math
import random
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "benchmarks"))  # the scripts import their siblings as top-level modules


def _args(**kw):
    base = dict(fidelity_db=0.0, fidelity_from="", fp8_fidelity="", steps=50)
    return argparse.Namespace(**{**base, **kw})


def test_required_psnr_from_flag_or_ditbake_json(tmp_path):
    import e2e

    db = random.uniform(20, 45)
    path = tmp_path / "combined.json"
    path.write_text(json.dumps({"shipped": {"psnr_db": db, "ssim": 0.97}, "rows": {"plan a": {"psnr_db": db - 3}}}))
    assert e2e.required_psnr(_args()) is None
    assert e2e.required_psnr(_args(fidelity_db=31.5, fidelity_from=str(path))) == 31.5  # the flag wins
    assert e2e.required_psnr(_args(fidelity_from=str(path))) == db  # default key: combined.py's shipped plan
    assert e2e.required_psnr(_args(fidelity_from=f"{path}:rows/plan a/psnr_db")) == db - 3
    with pytest.raises(SystemExit, match="'psnr'"):
        e2e.required_psnr(_args(fidelity_from=f"{path}:shipped/psnr"))
    listed = tmp_path / "combined_rows.json"  # combined.py writes its rows as a list
    listed.write_text(json.dumps({"rows": [{"psnr_db": db - 1}, {"psnr_db": db - 2}]}))
    assert e2e.required_psnr(_args(fidelity_from=f"{listed}:rows/1/psnr_db")) == db - 2
    with pytest.raises(SystemExit, match="'2'"):  # past the end
        e2e.required_psnr(_args(fidelity_from=f"{listed}:rows/2/psnr_db"))


def test_fp8_fidelity_must_match_the_race(tmp_path):
    import e2e

    path = tmp_path / "ef.json"
    path.write_text(json.dumps({"steps": 20, "rows": {}}))
    with pytest.raises(SystemExit, match="20 steps.*--steps 50"):
        e2e.fp8_fidelity(_args(fp8_fidelity=str(path)), 30.0)
    path.write_text(json.dumps({"steps": 50, "rows": {}}))
    with pytest.raises(SystemExit, match="--fidelity-db"):
        e2e.fp8_fidelity(_args(fp8_fidelity=str(path)), None)
    assert e2e.fp8_fidelity(_args(fp8_fidelity=str(path)), 30.0)["steps"] == 50
    assert e2e.fp8_fidelity(_args(), 30.0) is None


def _race(rnd) -> dict:
    """A merged-race JSON with fresh numbers, as e2e.py writes it."""
    def row(total, **extra):
        return {"step_ms_median": 1e3 * total / 50 * rnd.uniform(0.8, 1.2), "total_s": total, "steps": 50,
                "weight_bytes": 10, "skip_fraction": 0.0, **extra}

    eager = rnd.uniform(50, 70)
    fp8 = {"psnr_db": rnd.uniform(35, 45), "reaches_required": True}
    mag = {"knob": 0.01, "psnr_db": rnd.uniform(30, 40), "reaches_required": True}
    taylor = {"knob": 2, "psnr_db": rnd.uniform(15, 25), "reaches_required": False}
    return {"model": "Wan2.1-1.3B architecture", "steps": 50, "guidance": 5.0, "device": "H100",
            "required_psnr_db": 30.0,
            "rows": {"diffusers eager": row(eager), "diffusers torch.compile": row(eager / 1.2),
                     "diffusers torch.compile + torchao FP8": row(eager / 1.5, testbed_fidelity=fp8),
                     "diffusers MagCache(0.01) + torch.compile + torchao FP8": row(eager / 2.0, testbed_fidelity=mag),
                     "diffusers TaylorSeerCache(2) + torch.compile + torchao FP8": row(eager / 2.5, testbed_fidelity=taylor),
                     "ditbake aoti": row(eager / rnd.uniform(1.5, 3.5))}}


def test_merge_names_the_fastest_peer_and_the_best_at_equal_fidelity(rng_seed):
    import e2e

    rnd = random.Random(rng_seed)
    race = _race(rnd)
    ours = race["rows"].pop("ditbake aoti")
    out = e2e.merge([{"rows": {"ditbake aoti": ours}, "device": "H100"}, race])
    peers = {k: r["total_s"] for k, r in race["rows"].items() if k != "diffusers eager"}
    fastest = min(peers, key=peers.get)
    assert out["fastest_peer"] == fastest == "diffusers TaylorSeerCache(2) + torch.compile + torchao FP8"
    assert out["speedup_vs_fastest_peer"] == pytest.approx(peers[fastest] / ours["total_s"])
    # TaylorSeer does not reach the bar: the comparison at equal fidelity is with MagCache
    assert out["best_peer"] == "diffusers MagCache(0.01) + torch.compile + torchao FP8"
    assert out["speedup_vs_best_peer"] == pytest.approx(peers[out["best_peer"]] / ours["total_s"])
    assert out["required_psnr_db"] == 30.0 and len(out["rows"]) == 6  # keys of every part kept


def test_merge_takes_ratios_through_each_calls_own_eager_baseline(rng_seed):
    import e2e

    rnd = random.Random(rng_seed)
    race = _race(rnd)
    ours = race["rows"].pop("ditbake aoti")
    slower_call = rnd.uniform(1.05, 1.3)  # the ditbake phase ran on a slower machine state
    own_eager = dict(race["rows"]["diffusers eager"], total_s=race["rows"]["diffusers eager"]["total_s"] * slower_call)
    ours = dict(ours, total_s=ours["total_s"] * slower_call)
    out = e2e.merge([{"rows": {e2e.BASELINE_IN_DITBAKE_CALL: own_eager, "ditbake aoti": ours}}, race])
    comp = race["rows"]["diffusers torch.compile"]["total_s"]
    assert out["speedup_vs_torch_compile"] == pytest.approx(comp / (ours["total_s"] / slower_call))
    assert out["speedup_vs_diffusers_eager"] == pytest.approx(own_eager["total_s"] / ours["total_s"])


def test_plot_points_and_png(tmp_path, rng_seed):
    import e2e_plot

    rnd = random.Random(rng_seed)
    race = _race(rnd)
    rows = race["rows"]
    pts = {p["name"]: p for p in e2e_plot.points(race)}
    eager = rows["diffusers eager"]["total_s"]
    for name, r in rows.items():
        assert pts[name]["speedup"] == pytest.approx(eager / r["total_s"])
        assert pts[name]["step_ms_mean"] == pytest.approx(1e3 * r["total_s"] / 50)
        assert pts[name]["step_ms_median"] == r["step_ms_median"]
    assert math.isinf(pts["diffusers eager"]["psnr_db"]) and math.isinf(pts["diffusers torch.compile"]["psnr_db"])
    assert pts["ditbake aoti"]["psnr_db"] == 30.0  # no own number: the bar (its plan's test-bed PSNR)
    taylor = pts["diffusers TaylorSeerCache(2) + torch.compile + torchao FP8"]
    assert taylor["psnr_db"] == rows["diffusers TaylorSeerCache(2) + torch.compile + torchao FP8"]["testbed_fidelity"]["psnr_db"]
    assert taylor["reaches_required"] is False
    race.pop("required_psnr_db")
    assert e2e_plot.points(race)[-1]["psnr_db"] is None  # unknown stays unknown

    pytest.importorskip("matplotlib")
    import matplotlib.image

    (tmp_path / "race.json").write_text(json.dumps(_race(rnd)))
    assert e2e_plot.main([str(tmp_path / "race.json")]) == 0
    image = matplotlib.image.imread(tmp_path / "race.png")
    assert image.shape[0] > 300 and image.shape[1] > 1000 and image.std() > 0.05  # two panels drawn


def test_plot_of_a_speed_only_race(tmp_path, rng_seed):
    """e2e_flux.py's JSON: the step count once at the top, one forward per step, no fidelity for anyone:
    the points take the top-level steps and the right panel shows speed-ups instead of an empty scatter."""
    import e2e_plot

    rnd = random.Random(rng_seed)
    rows = {name: {"step_ms_median": rnd.uniform(300, 900), "total_s": rnd.uniform(10, 45)}
            for name in ("ditbake aoti", "diffusers eager", "diffusers torch.compile",
                         "diffusers MagCache(0.06) + torch.compile")}
    race = {"rows": rows, "steps": 40, "forwards_per_step": 1, "guidance": 3.5, "cfg": "none (guidance-distilled)",
            "fidelity": "not measured", "model": "FLUX", "device": "GPU"}
    pts = {p["name"]: p for p in e2e_plot.points(race)}
    for name, r in rows.items():
        assert pts[name]["step_ms_mean"] == pytest.approx(1e3 * r["total_s"] / 40)
        assert pts[name]["speedup"] == pytest.approx(rows["diffusers eager"]["total_s"] / r["total_s"])
    assert pts["ditbake aoti"]["psnr_db"] is None  # no test bed: unknown, not the bar

    pytest.importorskip("matplotlib")
    import matplotlib.image

    (tmp_path / "flux.json").write_text(json.dumps(race))
    assert e2e_plot.main([str(tmp_path / "flux.json")]) == 0
    image = matplotlib.image.imread(tmp_path / "flux.png")
    assert image.shape[1] > 1000 and image.std() > 0.05


def test_plot_without_matplotlib_logs_and_writes_nothing(tmp_path, monkeypatch, caplog):
    import e2e_plot

    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib now raises ImportError
    assert e2e_plot.plot(_race(random.Random(0)), tmp_path / "x.png") is False
    assert not (tmp_path / "x.png").exists() and "matplotlib is not installed" in caplog.text


def test_ditbake_phase_smoke_reports_the_shipped_weight_bytes(tmp_path):
    """`--smoke --phase ditbake` on the CPU (a 4-block Wan, the bed's 50-step plan transplanted), once per
    weight storage: the row records the weight file's ratio to bf16, which NVFP4 storage raises while
    the resident 8-bit weights stay the same."""
    import e2e

    rows = {}
    for storage in ("8bit", "nvfp4"):
        out, art = tmp_path / f"{storage}.json", tmp_path / storage
        assert e2e.main(["--smoke", "--phase", "ditbake", "--backend", "eager", "--weight-storage", storage,
                         "--source-plan", str(ROOT / "benchmarks/results/e2e_source_plan16k_b05.json"),
                         "--artifact", str(art), "--out", str(out)]) == 0
        rows[storage] = row = json.loads(out.read_text())["rows"]["ditbake eager"]
        assert row["weight_storage"] == storage
        assert row["weight_file_bytes"] == (art / "weights.safetensors").stat().st_size
        manifest = json.loads((art / "manifest.json").read_text())
        assert ("weights_8bit_from_nvfp4" in manifest) == (storage == "nvfp4")
    assert rows["nvfp4"]["weight_bytes"] == rows["8bit"]["weight_bytes"]  # the same INT8 weights resident
    # the smoke model's block linears are a minority of its bytes, so the file shrinks by less than 8 / 4.5
    assert rows["nvfp4"]["weight_file_ratio_vs_bf16"] > 1.1 * rows["8bit"]["weight_file_ratio_vs_bf16"]
