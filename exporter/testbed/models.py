"""The test-bed model configurations (diffusers classes) and their data shapes.

Sized so that one Wan generation (20 steps with CFG = 40 forwards) runs in well under a minute
on 2 CPU cores through the ditbake eager runtime, and both train in a few GPU minutes.
"""
from __future__ import annotations

import json
from pathlib import Path

from ditbake.exporter.testbed.data import ClipSpec, DataError

TEXT_LEN = 16
TEXT_DIM = 384

WAN_CONFIG = {"_class_name": "WanTransformer3DModel", "patch_size": [1, 2, 2], "num_attention_heads": 6,
              "attention_head_dim": 32, "in_channels": 3, "out_channels": 3, "text_dim": TEXT_DIM,
              "freq_dim": 128, "ffn_dim": 768, "num_layers": 5, "cross_attn_norm": True,
              "qk_norm": "rms_norm_across_heads", "eps": 1e-6, "rope_max_seq_len": 64}
WAN_CLIP = ClipSpec("video", frames=8, height=32, width=32)

SD3_CONFIG = {"_class_name": "SD3Transformer2DModel", "sample_size": 32, "patch_size": 2, "in_channels": 3,
              "out_channels": 3, "num_layers": 6, "attention_head_dim": 32, "num_attention_heads": 6,
              "joint_attention_dim": TEXT_DIM, "caption_projection_dim": 192, "pooled_projection_dim": TEXT_DIM,
              "pos_embed_max_size": 16}
SD3_CLIP = ClipSpec("image", frames=1, height=32, width=32)

# The attention-dominated test bed: 16 frames × 64 × 64 pixels, patch (1, 2, 2) → 16,384 tokens at
# width 256 (tokens / width = 64; Wan2.1-1.3B at 480p: 32,760 / 1,536 ≈ 21). 5 blocks, FFN 3× so the
# bf16 weights stay under 12 MB. Motions are slower per frame than the 8-frame bed's so a 16-frame
# straight path stays in frame (quickly: 0.68 of the side), and the held-out split covers every
# attribute value (rule v2).
WAN16K_CONFIG = {**WAN_CONFIG, "num_attention_heads": 8, "attention_head_dim": 32, "ffn_dim": 768, "num_layers": 5}
WAN16K_CLIP = ClipSpec("video", frames=16, height=64, width=64, speeds=(0.025, 0.045), held_out_rule="v2")

TESTBEDS = {"wan": (WAN_CONFIG, WAN_CLIP), "sd3": (SD3_CONFIG, SD3_CLIP), "wan16k": (WAN16K_CONFIG, WAN16K_CLIP)}
DATA_FILE = "testbed.json"  # beside config.json in a shipped test bed: its data spec


def data_spec_record(spec: ClipSpec, name: str) -> dict:
    return {"testbed": name, "kind": spec.kind, "frames": spec.frames, "height": spec.height, "width": spec.width,
            "speeds": list(spec.speed_table().values()), "held_out_rule": spec.held_out_rule, "text_len": TEXT_LEN}


def data_spec_of(model_dir: str | Path) -> ClipSpec:
    """The data a shipped test-bed directory was trained on (its `testbed.json`; the first beds predate it)."""
    path = Path(model_dir) / DATA_FILE
    if not path.is_file():
        config = json.loads((Path(model_dir) / "config.json").read_text())
        return SD3_CLIP if config.get("_class_name") == "SD3Transformer2DModel" else WAN_CLIP
    try:
        r = json.loads(path.read_text())
        return ClipSpec(r["kind"], int(r["frames"]), int(r["height"]), int(r["width"]),
                        tuple(float(v) for v in r["speeds"]) if r["kind"] == "video" else None, r["held_out_rule"])
    except (KeyError, TypeError, ValueError) as e:
        raise DataError(f"{path} is not a test-bed data record ({e})") from e


def build(name: str):
    """A freshly initialised diffusers model of the test-bed `name` ('wan' or 'sd3')."""
    import diffusers  # noqa: PLC0415

    config = dict(TESTBEDS[name][0])
    return getattr(diffusers, config.pop("_class_name")).from_config(config)
