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
            for i in range(data.num_captions("video")) if data.is_held_out(i)}
    picks = ps.testbed_prompts(4)
    assert len(set(picks)) == 4 and not set(picks) & held
