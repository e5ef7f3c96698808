"""Adapter for diffusers' CogVideoXTransformer3DModel (CogVideoX 2B/5B text-to-video)."""
from __future__ import annotations

import torch

from ditbake.exporter.adapters.base import Adapter, TokenLayout
from ditbake.runtime.errors import UnsupportedModelError


class CogVideoXAdapter(Adapter):
    architecture = "cogvideox"
    diffusers_class = "CogVideoXTransformer3DModel"

    def check_supported(self) -> None:
        c = self.config
        if c.get("use_rotary_positional_embeddings") or c.get("patch_size_t") or c.get("ofs_embed_dim"):
            raise UnsupportedModelError("CogVideoX 1.5 / rotary / image-to-video variants are not supported yet; "
                                        "use CogVideoX-2B or 5B text-to-video")
        if c.get("use_learned_positional_embeddings"):
            raise UnsupportedModelError("CogVideoX learned positional embeddings (5B-I2V) are not supported yet")

    def block_modules(self):
        return list(self.model.transformer_blocks)

    def token_layout(self, latent, text_len):
        f, h, w = self.arch.grid(self.config, latent)
        return TokenLayout(text=(0, text_len), visual=(text_len, text_len + f * h * w), grid=(f, h, w))

    def profile_tensors(self, profile):
        """The joint sin-cos position table for this latent size (zeros over the text positions)."""
        f, _, h, w = profile["latent_shape"]
        embed = self.model.patch_embed
        if not getattr(embed, "use_positional_embeddings", False):
            return {}
        frames = (f - 1) * embed.temporal_compression_ratio + 1
        table = embed._get_positional_embeddings(h, w, frames).to(torch.float32)
        return {f"profile.{profile['name']}.pos_embedding": table.contiguous()}

    def diffusers_forward(self, latents, timestep, text, pooled=None, guidance=None):
        return self.model(hidden_states=latents, encoder_hidden_states=text, timestep=timestep,
                          return_dict=False)[0]

    def block_io(self, args, kwargs, output):
        hidden = kwargs.get("hidden_states", args[0] if args else None)
        text = kwargs.get("encoder_hidden_states", args[1] if len(args) > 1 else None)
        out_hidden, out_text = output
        return torch.cat([text, hidden], dim=1), torch.cat([out_text, out_hidden], dim=1)
