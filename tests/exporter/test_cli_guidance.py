"""`ditbake guidance`: guidance skips placed on an artifact's plan by measurement, written as a plan the
build takes; bad requests get typed errors and leave nothing behind."""
import json

import pytest
import torch

from ditbake.exporter.cli import main
from ditbake.exporter.plan_guidance import add_guidance_skips, guidance_step_errors
from ditbake.exporter.planner import plan_from_calibration
from ditbake.runtime import load
from ditbake.runtime.plan import BlockVariant, Plan

from tests.conftest import build_tiny_artifact

STEPS = 8


def _tdc(meta):
    p = plan_from_calibration(meta).to_json()
    p["variants"].append(BlockVariant(compute=False).to_json())
    p["steps"][5] = {"cond": [1] * 3, "uncond": [1] * 3}
    return Plan.from_json(p)


@pytest.fixture(scope="module")
def artifact(tmp_path_factory):
    path, _ = build_tiny_artifact(tmp_path_factory.mktemp("g"), "tiny-wan", steps=STEPS, plan_fn=_tdc)
    return str(path)


def test_places_the_measured_cheapest_and_the_build_takes_it(artifact, tmp_path):
    out = tmp_path / "plan.json"
    assert main(["guidance", artifact, "--count", "2", "--start", "1", "--random-embeddings", "--num-prompts", "2",
                 "--seed", "7", "--out", str(out)]) == 0
    plan = Plan.load(out)
    assert plan.uncond_skip == "guidance"
    chosen = plan.predicted["guidance_skips"]
    errors = {int(k): v for k, v in plan.predicted["guidance_step_errors"].items()}
    assert sorted(errors) == [1, 2, 3, 4, 6, 7] and len(chosen) == 2
    # the same measurement through the API, with the CLI's random conditioning, gives the same errors
    session = load(artifact)
    gen = torch.Generator().manual_seed(7)
    text = torch.randn(2, session.profile().text_len, 32, generator=gen)
    negative = torch.randn(2, session.profile().text_len, 32, generator=gen)
    again = guidance_step_errors(session, session.plan, [7], start=1, text_embeds=text, negative_embeds=negative)
    assert again == pytest.approx(errors, rel=1e-6)
    cheapest = min(errors, key=errors.get)
    assert cheapest in chosen
    for i in range(STEPS):  # cond untouched, uncond skipped at the chosen steps only (and the TDC step)
        assert plan.steps[i]["cond"] == session.plan.steps[i]["cond"]
        assert plan.computes_stack(i, "uncond") == (i not in chosen and i != 5)
    # the plan builds into an artifact whose session runs the skips
    path, _ = build_tiny_artifact(tmp_path / "b", "tiny-wan", steps=STEPS, plan_fn=lambda m: Plan.load(out))
    res = load(path).generate(text, negative, seed=1)
    assert res.report.block_skips == 3 * (2 + 2)


def test_bad_requests_are_refused(artifact, tmp_path):
    out = tmp_path / "p.json"
    # more skips than fit without two in a row (6 eligible steps → at most 3): refused before any generation
    assert main(["guidance", artifact, "--count", "4", "--start", "1", "--random-embeddings", "--out", str(out)]) == 5
    assert not out.exists()
    assert main(["guidance", artifact, "--count", "0", "--random-embeddings", "--out", str(out)]) != 0
    assert main(["guidance", str(tmp_path / "missing"), "--count", "1", "--out", str(out)]) == 3
    embeds = tmp_path / "e.safetensors"
    embeds.write_bytes(b"")  # an embeddings file is not text to encode
    assert main(["guidance", artifact, "--count", "1", "--prompts", str(embeds), "--out", str(out)]) == 5
    # text prompts need the artifact's text encoder; this one stores none
    assert main(["guidance", artifact, "--count", "1", "--prompts", "a red cat", "--out", str(out)]) == 5
    assert not out.exists()
    notes = tmp_path / "notes.json"
    notes.write_text(json.dumps({"mine": 1}))  # not a plan: never replaced
    assert main(["guidance", artifact, "--count", "1", "--random-embeddings", "--out", str(notes)]) != 0
    assert json.loads(notes.read_text()) == {"mine": 1}
    # a plan that already has guidance skips is refused (place them on the plan without them)
    guided = add_guidance_skips(load(artifact).plan, start=1, at=[2])
    path, _ = build_tiny_artifact(tmp_path / "g", "tiny-wan", steps=STEPS, plan_fn=lambda m: guided)
    assert main(["guidance", str(path), "--count", "1", "--random-embeddings", "--out", str(out)]) == 5
    assert not out.exists()
