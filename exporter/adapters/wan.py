"""Adapter for diffusers' WanTransformer3DModel (Wan 2.1 text-to-video)."""
from __future__ import annotations

import torch

from ditbake.exporter.adapters.base import Adapter, TokenLayout
from ditbake.runtime.errors import UnsupportedModelError


class WanAdapter(Adapter):
    architecture = "wan"
    diffusers_class = "WanTransformer3DModel"

    def check_supported(self) -> None:
        c = self.config
        if c.get("image_dim") or c.get("added_kv_proj_dim"):
            raise UnsupportedModelError("Wan image-to-video (image_dim/added_kv_proj_dim) is not supported yet; "
                                        "use a text-to-video Wan checkpoint")
        if c.get("qk_norm") not in ("rms_norm_across_heads",):
            raise UnsupportedModelError(f"Wan qk_norm={c.get('qk_norm')!r} is not supported; "
                                        "expected 'rms_norm_across_heads'")

    def block_modules(self):
        return list(self.model.blocks)

    def token_layout(self, latent, text_len):
        f, h, w = self.arch.grid(self.config, latent)
        return TokenLayout(text=(0, 0), visual=(0, f * h * w), grid=(f, h, w))

    def diffusers_forward(self, latents, timestep, text, pooled=None, guidance=None):
        return self.model(hidden_states=latents, timestep=timestep, encoder_hidden_states=text,
                          return_dict=False)[0]

    def block_io(self, args, kwargs, output):
        inp = kwargs.get("hidden_states", args[0] if args else None)
        return inp, output
