"""Adapter for diffusers' SD3Transformer2DModel (Stable Diffusion 3 MMDiT, joint text-image attention).

The joint sequence is [image; text]: text LAST, as diffusers concatenates it in JointAttnProcessor2_0.
"""
from __future__ import annotations

import torch

from ditbake.exporter.adapters.base import Adapter, TokenLayout
from ditbake.runtime.arch_sd3 import resolve_pooled
from ditbake.runtime.errors import UnsupportedModelError


def default_pooled_source(config: dict) -> str:
    """"token_mean" where the pooled vector can be the token mean (pooled dim == joint dim, as the test
    bed trained with MiniLM); "input" otherwise (real SD3 / Flux: CLIP pooled outputs). A build from a
    pipeline with CLIP encoders sets "input" explicitly."""
    return "token_mean" if int(config["pooled_projection_dim"]) == int(config["joint_attention_dim"]) else "input"


class SD3Adapter(Adapter):
    architecture = "sd3"
    diffusers_class = "SD3Transformer2DModel"

    def __init__(self, model: torch.nn.Module):
        super().__init__(model)
        # The runtime, CLI and harness read a request's prompt width from `text_dim`; SD3 names it
        # joint_attention_dim, so the config the artifact stores carries both.
        self.config["text_dim"] = int(self.config["joint_attention_dim"])
        self.config.setdefault("pooled_source", default_pooled_source(self.config))

    def check_supported(self) -> None:
        c = self.config
        if c.get("dual_attention_layers"):
            raise UnsupportedModelError("SD3.5 dual-attention layers (dual_attention_layers) are not supported yet; "
                                        "use an SD3 checkpoint without them")
        if c.get("qk_norm") not in (None, "rms_norm"):
            raise UnsupportedModelError(f"SD3 qk_norm={c.get('qk_norm')!r} is not supported; expected None or 'rms_norm'")
        if c.get("caption_projection_dim") != int(c["num_attention_heads"]) * int(c["attention_head_dim"]):
            raise UnsupportedModelError("SD3 caption_projection_dim must equal heads × head dim (joint blocks)")

    def block_modules(self):
        return list(self.model.transformer_blocks)

    def token_layout(self, latent, text_len):
        f, h, w = self.arch.grid(self.config, latent)
        n = f * h * w
        return TokenLayout(text=(n, n + text_len), visual=(0, n), grid=(f, h, w))

    def diffusers_forward(self, latents, timestep, text, pooled=None, guidance=None):
        pooled = resolve_pooled(self.config, text, pooled)
        return self.model(hidden_states=latents, encoder_hidden_states=text, pooled_projections=pooled,
                          timestep=timestep, return_dict=False)[0]

    def block_io(self, args, kwargs, output):
        hidden = kwargs.get("hidden_states", args[0] if args else None)
        text = kwargs.get("encoder_hidden_states", args[1] if len(args) > 1 else None)
        out_text, out_hidden = output
        if out_text is None:  # the context_pre_only last block: the text passes through
            out_text = text
        return torch.cat([hidden, text], dim=1), torch.cat([out_hidden, out_text], dim=1)
