"""Plan schema: round trip, collapse, and every validation rule with its one-line error."""
import json

import pytest

from ditbake.exporter.planner import baseline_variant, plan_from_calibration
from ditbake.runtime.errors import PlanError
from ditbake.runtime.plan import BlockVariant, HeadScheme, Plan, collapse

META = {"architecture": "wan", "num_blocks": 3, "linear_layers": ["a.q", "a.k", "ff.up"],
        "attention_sites": {"attn1": 2}, "num_steps": 4, "branches": ["cond", "uncond"]}


def _plan(**overrides) -> dict:
    d = plan_from_calibration(META).to_json()
    d.update(overrides)
    return d


def test_round_trip_and_fields(tmp_path):
    plan = plan_from_calibration(META)
    plan.save(tmp_path / "p.json")
    again = Plan.load(tmp_path / "p.json")
    assert again == plan
    assert again.num_steps == 4 and len(again.variants) == 1
    v = again.variants[0]
    assert v.compute and not v.purified
    assert v.precision_map == {"a.q": "bf16", "a.k": "bf16", "ff.up": "bf16"}
    assert [s.kind for s in v.head_map["attn1"]] == ["full", "full"]
    assert set(again.steps[0]) == {"cond", "uncond"}


def test_collapse_gives_identical_configs_one_id():
    base = baseline_variant(META["linear_layers"], META["attention_sites"])
    skip = BlockVariant(compute=False, precisions=base.precisions, heads=base.heads)
    arrow = BlockVariant(precisions=base.precisions,
                         heads=(("attn1", (HeadScheme("arrow", 4, 4), HeadScheme("full"))),))
    same_arrow = BlockVariant(precisions=base.precisions,
                              heads=(("attn1", (HeadScheme("arrow", 4, 4), HeadScheme("full"))),))
    variants, table = collapse([[[base, skip, arrow]], [[same_arrow, arrow, base]]])
    assert len(variants) == 3
    assert table == [[[0, 1, 2]], [[2, 2, 0]]]


def test_skip_and_cached_heads_plan_is_valid():
    d = _plan()
    d["variants"].append({"compute": False, "purified": False, "precisions": {}, "heads": {}})
    d["variants"].append({"compute": True, "purified": True, "precisions": {"a.q": "nvfp4", "a.k": "int8"},
                          "heads": {"attn1": [["cached", 0, 0], ["arrow", 8, 2]]}})
    d["steps"][2]["cond"] = [1, 2, 0]
    plan = Plan.from_json(d)
    assert plan.variant_for(2, "cond", 0).compute is False
    assert plan.variant_for(2, "uncond", 0).compute is True
    assert plan.skip_fraction() == pytest.approx(1 / 24)


@pytest.mark.parametrize("mutate,message", [
    (lambda d: d.update(version=3), "version 3 is not supported"),
    (lambda d: d.update(version=2, uncond_skip="cfg"), "uncond_skip must be one of"),
    (lambda d: d.update(format="other"), "not a ditbake plan"),
    (lambda d: d.update(mode="eager"), "mode"),
    (lambda d: d.update(mode="adaptive"), "adaptive"),
    (lambda d: d["steps"][1]["cond"].append(0), "4 block entries for 3 blocks"),
    (lambda d: d["steps"][1].update(cond=[0, 0, 7]), "unknown variant id 7"),
    (lambda d: d["steps"][1].update(branch3=[0, 0, 0]), "unknown branch"),
    (lambda d: d["steps"][1].pop("cond"), "no 'cond' branch"),
    (lambda d: d["variants"][0]["precisions"].update({"a.q": "int4"}), "unknown precision"),
    (lambda d: d["variants"][0]["precisions"].update({"nope": "bf16"}), "unknown layers"),
    (lambda d: d["variants"][0]["heads"].update(attn1=[["full", 0, 0]]), "1 head schemes for 2 heads"),
    (lambda d: d["variants"][0]["heads"].update(attn1=[["sparse", 0, 0]] * 2), "unknown head scheme"),
    (lambda d: d["variants"][0]["heads"].update(attn1=[["arrow", -1, 0]] * 2), "widths must be integers >= 0"),
    (lambda d: d["variants"][0]["heads"].update(attn1=[["arrow", 2.5, 0]] * 2), "head width must be an integer"),
    (lambda d: d["variants"][0]["heads"].update(attn1=[["arrow", 2, 2, "int4"]] * 2), "unknown attention precision"),
    (lambda d: d["variants"][0]["heads"].update(attn1=[["arrow", 2]] * 2), r"\[kind, left, right\]"),
    (lambda d: d["variants"][0]["heads"].update(attn1=[["arrow", 2, 2, 8]] * 2), "head precision must be"),
    (lambda d: d["variants"][0].update(compute=False, purified=True), "cannot be a purified refresh"),
    (lambda d: d["variants"][0].update(compute=False), "reuses a cache that does not exist"),
    (lambda d: d.update(num_steps=9), "num_steps=9"),
    (lambda d: d.pop("variants"), "malformed plan"),
])
def test_invalid_plans_raise_one_line_errors(mutate, message):
    d = json.loads(json.dumps(_plan()))
    mutate(d)
    with pytest.raises(PlanError, match=message) as info:
        Plan.from_json(d)
    assert "\n" not in str(info.value)


def test_plan_file_errors(tmp_path):
    with pytest.raises(PlanError, match="not found"):
        Plan.load(tmp_path / "missing.json")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(PlanError, match="not valid JSON"):
        Plan.load(tmp_path / "bad.json")


def test_head_precision_round_trips_and_old_plans_read_as_bf16():
    d = json.loads(json.dumps(_plan()))
    d["variants"][0]["heads"]["attn1"] = [["arrow", 4, 4, "int8"], ["full", 0, 0]]
    plan = Plan.from_json(d)
    schemes = plan.variants[0].head_map["attn1"]
    assert [s.precision for s in schemes] == ["int8", "bf16"]
    assert schemes[0].group == ("arrow", "int8") and schemes[1].group == ("full", "bf16")
    again = Plan.from_json(json.loads(json.dumps(plan.to_json())))
    assert again == plan
    # bf16 heads keep the 3-element form, so plans written before attention precision still read
    assert again.to_json()["variants"][0]["heads"]["attn1"][1] == ["full", 0, 0]
