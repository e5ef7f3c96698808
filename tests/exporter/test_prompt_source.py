"""Where prompts come from: files, the shipped set, free text; models without a text encoder are refused."""
import pytest

from ditbake.exporter import prompt_source as ps
from ditbake.runtime.errors import InputError


def test_read_prompts(tmp_path):
    f = tmp_path / "p.txt"
    f.write_text("a cat walks\n\n# a comment\n  a dog jumps  \n")
    assert ps.read_prompts(str(f)) == ["a cat walks", "a dog jumps"]
    assert ps.read_prompts("a red fox") == ["a red fox"]
    assert ps.read_prompts(None) is None and ps.read_prompts("embeds.safetensors") is None
    shipped = ps.read_prompts("default")
    assert len(shipped) >= 30 and len(set(shipped)) == len(shipped)
    assert ps.default_prompts(8) == [shipped[(k * len(shipped)) // 8] for k in range(8)]
    (tmp_path / "empty.txt").write_text("\n# nothing\n")
    for bad in (str(tmp_path / "empty.txt"), str(tmp_path / "missing.txt"), "  "):
        with pytest.raises(InputError):
            ps.read_prompts(bad)


def test_models_without_text_encoder_are_refused():
    with pytest.raises(InputError, match="--random-embeddings"):
        ps.conditioning("tiny-wan", 32, 8, prompts_arg=None)
    with pytest.raises(InputError, match="text encoder"):
        ps.conditioning("tiny-wan", 32, 8, prompts_arg="a cat walks")
    cond = ps.conditioning("tiny-sd3", 32, 8, prompts_arg=None, random_embeddings=True, num_prompts=3, pooled_dim=24)
    assert cond.embeds.shape == (3, 8, 32) and cond.pooled.shape == (3, 24) and cond.origin == "random embeddings"


def test_testbed_prompts_are_training_captions():
    from ditbake.exporter.testbed import data

    held = {data.caption_from_attributes("video", data.attributes_of("video", i))
            for rule in data.HELD_OUT_RULES for i in data.held_out_ids("video", rule)}
    picks = ps.testbed_prompts(4)
    assert len(set(picks)) == 4 and not set(picks) & held


def test_pipeline_directory_checks(tmp_path):
    import json

    from ditbake.exporter import pipeline
    from ditbake.runtime.errors import UnsupportedModelError

    (tmp_path / "model_index.json").write_text(json.dumps({"_class_name": "FooPipeline"}))
    with pytest.raises(UnsupportedModelError, match="FooPipeline"):
        pipeline.pipeline_spec(tmp_path)
    index = {"_class_name": "WanPipeline", **{c: ["x", "y"] for c in ("text_encoder", "tokenizer", "vae",
                                                                         "transformer")}}
    (tmp_path / "model_index.json").write_text(json.dumps(index))
    for c in ("text_encoder", "tokenizer", "transformer"):
        (tmp_path / c).mkdir()
    with pytest.raises(pipeline.PipelineError, match="no vae/"):
        pipeline.pipeline_spec(tmp_path)
    (tmp_path / "vae").mkdir()
    (tmp_path / "vae" / "config.json").write_text(json.dumps({"temperal_downsample": [False, True, True]}))
    assert pipeline.pipeline_spec(tmp_path).architecture == "wan"
    assert pipeline.latent_dims(tmp_path, "wan", *pipeline.parse_pixels("480x832x81")) == (21, 60, 104)
    assert pipeline.parse_pixels("1024x768") == (1024, 768, 1)
    for bad in ("480x832x", "big", "0x8x8", "1x2x3x4"):
        with pytest.raises(InputError):
            pipeline.parse_pixels(bad)
    with pytest.raises(InputError, match="multiple of"):
        pipeline.latent_dims(tmp_path, "wan", 100, 832, 81)
