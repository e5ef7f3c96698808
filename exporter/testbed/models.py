"""The test-bed model configurations (diffusers classes) and their data shapes.

Sized so that one Wan generation (20 steps with CFG = 40 forwards) runs in well under a minute
on 2 CPU cores through the ditbake eager runtime, and both train in a few GPU minutes.
"""
from __future__ import annotations

from ditbake.exporter.testbed.data import ClipSpec

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

TESTBEDS = {"wan": (WAN_CONFIG, WAN_CLIP), "sd3": (SD3_CONFIG, SD3_CLIP)}


def build(name: str):
    """A freshly initialised diffusers model of the test-bed `name` ('wan' or 'sd3')."""
    import diffusers  # noqa: PLC0415

    config = dict(TESTBEDS[name][0])
    return getattr(diffusers, config.pop("_class_name")).from_config(config)
