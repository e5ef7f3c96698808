"""Adapter for diffusers' FluxTransformer2DModel (FLUX.1: double-stream then single-stream blocks).

The joint sequence is [text; image]: text FIRST, as diffusers concatenates it. The runtime sees the
double-stream `transformer_blocks` followed by the `single_transformer_blocks` as one list of
blocks (runtime/arch_flux.py explains the numbering, the weight renaming and why the plan's
linear layers are the q/k/v projections the two block kinds share).
"""
from __future__ import annotations

import torch

from ditbake.exporter.adapters.base import Adapter, TokenLayout
from ditbake.runtime import arch_flux
from ditbake.exporter.adapters.sd3 import default_pooled_source
from ditbake.runtime.errors import UnsupportedModelError


class FluxAdapter(Adapter):
    architecture = "flux"
    diffusers_class = "FluxTransformer2DModel"

    def __init__(self, model: torch.nn.Module):
        super().__init__(model)
        # The runtime, CLI and harness read a request's prompt width from `text_dim`.
        self.config["text_dim"] = int(self.config["joint_attention_dim"])
        self.config.setdefault("pooled_source", default_pooled_source(self.config))
        if self.config.get("guidance_embeds"):
            self.config.setdefault("guidance", arch_flux.DEFAULT_GUIDANCE)

    def check_supported(self) -> None:
        c = self.config
        if int(c.get("patch_size", 1)) != 1:
            raise UnsupportedModelError(f"Flux patch_size={c['patch_size']} is not supported; expected 1 "
                                        "(latents are packed 2x2 into tokens as FluxPipeline does)")
        out = c.get("out_channels") or c["in_channels"]
        if int(c["in_channels"]) % 4 or int(out) % 4:
            raise UnsupportedModelError(f"Flux in_channels/out_channels ({c['in_channels']}/{out}) must be multiples "
                                        "of 4 (2x2-packed latents)")
        if sum(int(d) for d in c.get("axes_dims_rope", (16, 56, 56))) != int(c["attention_head_dim"]):
            raise UnsupportedModelError(f"Flux axes_dims_rope {list(c['axes_dims_rope'])} must sum to "
                                        f"attention_head_dim {c['attention_head_dim']}")

    def block_modules(self):
        return list(self.model.transformer_blocks) + list(self.model.single_transformer_blocks)

    def weights(self):
        return arch_flux.uniform_weights(super().weights(), self.config)

    def token_layout(self, latent, text_len):
        f, h, w = self.arch.grid(self.config, latent)
        n = f * h * w
        return TokenLayout(text=(0, text_len), visual=(text_len, text_len + n), grid=(f, h, w))

    def diffusers_forward(self, latents, timestep, text, pooled=None, guidance=None):
        """`guidance`: the distilled guidance scale per sample [B] (guidance_embeds models; default config's)."""
        b, _, h, w = latents.shape
        gh, gw = h // 2, w // 2
        img_ids = torch.zeros(gh, gw, 3, device=latents.device)
        img_ids[..., 1] += torch.arange(gh, device=latents.device)[:, None]
        img_ids[..., 2] += torch.arange(gw, device=latents.device)[None, :]
        txt_ids = torch.zeros(text.shape[1], 3, device=latents.device)
        if not self.config.get("guidance_embeds"):
            guidance = None
        elif guidance is None:
            guidance = torch.full((b,), float(self.config["guidance"]), device=latents.device)
        out = self.model(hidden_states=arch_flux.pack_latents(latents), encoder_hidden_states=text,
                         pooled_projections=arch_flux.resolve_pooled(self.config, text, pooled), timestep=timestep / 1000,
                         img_ids=img_ids.reshape(-1, 3), txt_ids=txt_ids, guidance=guidance, return_dict=False)[0]
        return arch_flux.unpack_latents(out, gh, gw)

    def block_io(self, args, kwargs, output):
        """Both block kinds return (text, image); the joint tokens are [text; image]."""
        hidden = kwargs.get("hidden_states", args[0] if args else None)
        text = kwargs.get("encoder_hidden_states", args[1] if len(args) > 1 else None)
        out_text, out_hidden = output
        return torch.cat([text, hidden], dim=1), torch.cat([out_text, out_hidden], dim=1)
