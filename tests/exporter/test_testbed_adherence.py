"""The prompt-adherence score reads every caption attribute back from clips drawn by the data generator.

Ground truth (data.render of random captions and jitters, at both test-bed specs) must score right;
clips rendered with one attribute changed, reversed in time or frozen must be caught on exactly that
attribute; malformed input gets a typed error.
"""
import json

import pytest
import torch
from safetensors.torch import save_file

from ditbake.exporter.testbed import adherence, data
from ditbake.exporter.testbed.models import TESTBEDS, data_spec_record

WAN = TESTBEDS["wan"][1]
WAN16K = TESTBEDS["wan16k"][1]
ATTR = dict(data.VIDEO_ATTRIBUTES)


# the scorer runs thousands of tiny per-frame ops; on a shared 2-core CPU more threads only spin
pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _fresh_scenes(spec, n):
    g = torch.Generator().manual_seed(int(torch.randint(2**31, ())))
    return data.scenes_from_ids(spec, torch.randint(data.num_captions("video"), (n,), generator=g), g)


@pytest.mark.parametrize("spec,n", [(WAN, 24), (WAN16K, 12)], ids=["wan-8x32x32", "wan16k-16x64x64"])
def test_ground_truth_scores_every_attribute(spec, n):
    scenes = _fresh_scenes(spec, n)
    clips = data.render(spec, scenes)
    scores = adherence.score_clips(clips, scenes.caption_ids, spec)
    agg = adherence.aggregate(scores)
    wrong = [(s.caption_id, s.expected, s.predicted) for s in scores if not s.all_correct]
    assert agg["all_correct"] == 1.0, wrong
    assert agg["coherence"] == 1.0
    # the measured motion is the rendered one (image sides per frame), not just its class
    for s, d, v in zip(scores, scenes.index["direction"], scenes.index["speed"]):
        true = torch.tensor(list(data.DIRECTIONS.values()))[d] * list(spec.speed_table().values())[v]
        assert torch.allclose(torch.tensor(s.velocity), true, atol=0.25 * spec.speed_table()["slowly"])
    # uint8 (generate.py's format) reads the same as the float clip
    u8 = ((clips + 1) * 127.5).round().to(torch.uint8)
    assert [s.predicted for s in adherence.score_clips(u8, scenes.caption_ids, spec)] == [s.predicted for s in scores]


@pytest.mark.parametrize("attribute", ["shape", "colour", "size", "direction", "speed", "background"])
def test_a_changed_attribute_is_caught_on_that_attribute_only(attribute):
    spec = WAN
    scenes = _fresh_scenes(spec, 8)
    size = len(ATTR[attribute])
    shift = torch.randint(1, size, (8,))
    scenes.index[attribute] = (scenes.index[attribute] + shift) % size  # pixels disagree with the caption ids
    scores = adherence.score_clips(data.render(spec, scenes), scenes.caption_ids, spec)
    for s in scores:
        assert not s.correct[attribute], (attribute, s.expected, s.predicted)
        assert all(s.correct[a] for a in adherence.ATTRIBUTES if a != attribute), (attribute, s.expected, s.predicted)
    assert adherence.aggregate(scores)["accuracy"][attribute] == 0.0


def test_reversed_and_frozen_clips_get_the_motion_wrong():
    spec = WAN16K
    scenes = _fresh_scenes(spec, 6)
    clips = data.render(spec, scenes)
    opposite = {"left": "right", "right": "left", "up": "down", "down": "up"}
    for s in adherence.score_clips(clips.flip(2), scenes.caption_ids, spec):  # frames reversed in time
        assert s.predicted["direction"] == opposite[s.expected["direction"]]
        assert s.predicted["speed"] == s.expected["speed"] and s.correct["shape"] and s.correct["colour"]
    frozen = clips[:, :, :1].expand_as(clips)
    scores = adherence.score_clips(frozen, scenes.caption_ids, spec)
    assert all(s.predicted["direction"] == "static" and s.predicted["speed"] == "static" for s in scores)
    assert adherence.aggregate(scores)["static"] == 1.0


def test_two_objects_break_coherence_and_no_object_is_wrong():
    spec = WAN
    black, small = list(data.BACKGROUNDS).index("black"), list(data.SIZES).index("small")
    scenes = _fresh_scenes(spec, 4)
    scenes.index["background"][:] = black
    scenes.index["size"][:] = small
    scenes.caption_ids = data._encode_ids(spec, scenes.index)
    clips = data.render(spec, scenes)
    doubled = torch.maximum(clips, clips.roll(spec.width // 2, dims=-1))  # a second copy half a frame away
    assert all(s.coherence == 1.0 for s in adherence.score_clips(clips, scenes.caption_ids, spec))
    assert all(s.coherence == 0.0 for s in adherence.score_clips(doubled, scenes.caption_ids, spec))
    empty = clips[:, :, :, :1, :1].expand_as(clips)  # one background colour, no object
    for s in adherence.score_clips(empty, scenes.caption_ids, spec):
        assert s.frames_with_object == 0 and s.correct["background"]
        assert not any(s.correct[a] for a in adherence.ATTRIBUTES if a != "background")


@pytest.mark.parametrize("bad,match", [
    (torch.zeros(3, 8, 32), "rank 3"),
    (torch.zeros(4, 8, 32, 32), "3 \\(RGB\\) channels"),
    (torch.zeros(3, 0, 32, 32), "empty"),
    (torch.zeros(3, 8, 32, 32, dtype=torch.int32), "dtype"),
    (torch.full((3, 8, 32, 32), float("nan")), "NaN"),
])
def test_malformed_clips_get_typed_errors(bad, match):
    with pytest.raises(adherence.AdherenceError, match=match):
        adherence.score_clip(bad, 0, WAN)


def test_malformed_batches_get_typed_errors():
    clips = torch.zeros(2, 3, 8, 32, 32)
    with pytest.raises(adherence.AdherenceError, match="caption ids"):
        adherence.score_clips(clips, [0], WAN)
    with pytest.raises(adherence.AdherenceError, match="spec renders"):
        adherence.score_clips(clips, [0, 1], WAN16K)
    with pytest.raises(adherence.AdherenceError, match="outside"):
        adherence.score_clips(clips, [0, 10**6], WAN)
    with pytest.raises(data.DataError):  # a subclass, so callers catching DataError see it
        adherence.aggregate([])


def test_cli_scores_a_clips_file_and_merges_beds(tmp_path):
    model = tmp_path / "bed"
    model.mkdir()
    (model / "testbed.json").write_text(json.dumps(data_spec_record(WAN16K, "wan16k")))
    ids = torch.tensor(data.held_out_ids("video", "v2")[:3])
    seeds = torch.randint(1000, (3,))
    clips = adherence.reference_clips(ids, seeds, WAN16K)
    clips[1] = clips[1].flip(1)  # the second clip runs backwards: its direction must be wrong
    path = tmp_path / "clips.safetensors"
    save_file({"clips": clips, "caption_ids": ids, "seeds": seeds}, str(path))
    out = tmp_path / "adherence.json"
    assert adherence.main([str(path), "--spec-from", str(model), "--out", str(out), "--name", "a", "--reference",
                           "--ground-truth", "4"]) == 0
    assert adherence.main([str(path), "--spec-from", str(model), "--out", str(out), "--name", "b"]) == 0
    result = json.loads(out.read_text())
    assert set(result["beds"]) == {"a", "b"}
    bed = result["beds"]["a"]
    assert bed["aggregate"]["accuracy"]["direction"] == pytest.approx(2 / 3)
    assert bed["reference_aggregate"]["all_correct"] == 1.0 and bed["ground_truth"]["all_correct"] == 1.0
    assert [c["correct"]["direction"] for c in bed["per_clip"]] == [True, False, True]
    assert bed["commit"] and bed["captions_seen_in_training"] == 0
    bad = tmp_path / "bad.safetensors"
    save_file({"clips": clips}, str(bad))
    assert adherence.main([str(bad), "--spec-from", str(model), "--out", str(tmp_path / "x.json")]) == 2


def test_generate_selects_captions_of_another_rule():
    from ditbake.exporter.testbed.generate import split_ids

    v2 = data.held_out_ids("video", "v2")
    assert split_ids("video", "v2", "held_out") == v2
    assert split_ids("video", "v2", "held_out", every=3, limit=5) == v2[::3][:5]
    train = split_ids("video", "v1", "train")
    assert len(train) + len(data.held_out_ids("video", "v1")) == data.num_captions("video")
    assert not set(train) & set(data.held_out_ids("video", "v1"))
