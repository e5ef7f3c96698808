"""Text → embeddings and latents → frames with the components an artifact stores (see
exporter/build_components.py for the manifest's `components` section), in plain torch.

Each pipeline class has its own recipe around the shared encoders and decoders, reproduced here
from what its `encode_prompt` and decode path do:

* Wan: prompt cleaned (HTML entities, whitespace), UMT5 with the padding mask, rows past the
  prompt's tokens zeroed; decode: latents · std + mean per channel, then the VAE.
* CogVideoX: T5 without a mask (the pipeline passes none); decode: latents / scaling_factor.
* SD3: CLIP-L and CLIP-G penultimate hidden states side by side, zero-padded to T5's width, T5
  tokens after them; pooled = both CLIPs' projected EOS vectors; decode: /scaling + shift.
* Flux: T5 tokens (no mask) and CLIP-L's pooled output; decode: /scaling + shift.

Frames come back as float [B, F, H, W, 3] in [0, 1] (images: F = 1), as the pipelines'
`output_type="np"` but a tensor.
"""
from __future__ import annotations

import html
import re
from pathlib import Path

import torch

from ditbake.runtime.errors import ArtifactError, InputError


def _clean_wan(text: str) -> str:
    """WanPipeline's prompt_clean without ftfy (ftfy is optional there too; plain text is unchanged by it)."""
    return re.sub(r"\s+", " ", html.unescape(html.unescape(text)).strip()).strip()


class Components:
    """The artifact's text encoder(s), tokenizer(s) and VAE decoder, loaded on first use."""

    def __init__(self, path: Path, section: dict, weights_loader, device: torch.device, backend: str = "eager"):
        self.path = Path(path)
        self.backend = backend  # aoti / tensorrt: the compiled engines of section["engines"] where they fit
        self.section = section
        self.pipeline = section["pipeline"]
        self.architecture = section["architecture"]
        self.device = device
        self._load_weights = weights_loader  # rel path → dict of tensors (hash already checked)
        self._encoders: dict[str, tuple] = {}
        self._vae = None
        self._engines = None

    @property
    def engines(self):
        """The compiled component engines (runtime/components_engines.py), or None (eager)."""
        if self._engines is None and self.backend != "eager" and self.section.get("engines"):
            from ditbake.runtime.components_engines import ComponentEngines  # noqa: PLC0415

            self._engines = ComponentEngines(self.path, self.section["engines"], self.backend, self.device)
        return self._engines

    @property
    def negative_prompt(self) -> str:
        return str(self.section.get("negative_prompt", ""))

    def _encoder(self, name: str):
        if name not in self._encoders:
            from ditbake.runtime.components import TEXT_ENCODERS  # noqa: PLC0415
            from ditbake.runtime.tokenizer import Tokenizer  # noqa: PLC0415

            entry = self.section["text_encoders"].get(name)
            if entry is None:
                raise ArtifactError(f"artifact components lack {name}; rebuild the artifact from the pipeline directory")
            encode = TEXT_ENCODERS[entry["kind"]].encode
            self._encoders[name] = (encode, self._load_weights(entry["weights"]), entry["config"],
                                    Tokenizer.load(self.path / entry["tokenizer"]), int(entry["max_length"]))
        return self._encoders[name]

    def _run(self, name: str, prompts: list[str], mask: bool = True, **kwargs):
        encode, weights, config, tokenizer, length = self._encoder(name)
        tokens = tokenizer(prompts, max_length=length)
        ids = tokens["input_ids"].to(self.device)
        attention = tokens["attention_mask"].to(self.device)
        attention_in = attention if mask else torch.ones_like(attention)
        out = self.engines.encode(name, weights, ids, attention_in, **kwargs) if self.engines else None
        if out is None:
            out = encode(weights, config, ids, attention_in, **kwargs)
        return out, attention

    @torch.no_grad()
    def encode(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(per-token embeddings [N, L, D], pooled [N, P] or None) as the pipeline's encode_prompt gives them."""
        if not prompts or not all(isinstance(p, str) for p in prompts):
            raise InputError("prompts must be a non-empty list of strings")
        arch = self.architecture
        if arch == "wan":
            h, mask = self._run("text_encoder", [_clean_wan(p) for p in prompts])
            return h.float() * mask[..., None].to(h.device, torch.float32), None
        if arch == "cogvideox":
            h, _ = self._run("text_encoder", prompts, mask=False)
            return h.float(), None
        if arch == "sd3":
            # the pipeline passes no attention mask to any of its three encoders
            l_out, _ = self._run("text_encoder", prompts, mask=False, hidden_state_index=-2)
            g_out, _ = self._run("text_encoder_2", prompts, mask=False, hidden_state_index=-2)
            t5, _ = self._run("text_encoder_3", prompts, mask=False)
            clip = torch.cat([_hidden(l_out), _hidden(g_out)], dim=-1).float()
            clip = torch.nn.functional.pad(clip, (0, t5.shape[-1] - clip.shape[-1]))
            pooled = torch.cat([l_out["text_embeds"], g_out["text_embeds"]], dim=-1).float()
            return torch.cat([clip, t5.float()], dim=-2), pooled
        if arch == "flux":
            clip, _ = self._run("text_encoder", prompts, mask=False)
            t5, _ = self._run("text_encoder_2", prompts, mask=False)
            return t5.float(), clip["pooled"].float()
        raise ArtifactError(f"no text recipe for {self.pipeline}")

    # ------------------------------------------------------------------ decode

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents [B, *latent_shape] (the transformer's layout) → frames [B, F, H, W, 3] in [0, 1]."""
        from ditbake.runtime.components import VAE_DECODERS  # noqa: PLC0415

        entry = self.section["vae"]
        if self._vae is None:
            self._vae = self._load_weights(entry["weights"])
        config = entry["config"]
        dtype = next(iter(v.dtype for v in self._vae.values() if v.is_floating_point()))
        z = latents.to(self.device, torch.float32)
        arch = self.architecture
        if arch == "wan":
            c = int(config["z_dim"])
            mean = torch.tensor(config["latents_mean"], device=z.device).view(1, c, 1, 1, 1)
            std = torch.tensor(config["latents_std"], device=z.device).view(1, c, 1, 1, 1)
            z = z / (1.0 / std) + mean
        elif arch == "cogvideox":
            z = z.permute(0, 2, 1, 3, 4) / float(config["scaling_factor"])  # [B, F, C, H, W] → [B, C, F, H, W]
        else:  # sd3, flux: the runtime keeps Flux latents unpacked [C, H, W]
            z = z / float(config["scaling_factor"]) + float(config.get("shift_factor") or 0.0)
        z = z.to(dtype)
        pixels = self.engines.decode(self._vae, z) if self.engines else None
        if pixels is None:
            pixels = VAE_DECODERS[entry["kind"]].decode(self._vae, config, z)
        pixels = pixels.float()
        pixels = (pixels / 2 + 0.5).clamp(0, 1)
        if pixels.ndim == 4:  # an image [B, C, H, W]
            pixels = pixels[:, :, None]
        return pixels.permute(0, 2, 3, 4, 1).contiguous()  # [B, C, F, H, W] → [B, F, H, W, C]


def _hidden(out) -> torch.Tensor:
    """The hidden state a CLIP encoder returned for `hidden_state_index`."""
    if isinstance(out, dict):
        return out["hidden_states"] if torch.is_tensor(out.get("hidden_states")) else out["last_hidden_state"]
    return out


def identity_frames(latents: torch.Tensor, architecture: str) -> torch.Tensor:
    """Pixel-space test beds: latents in [-1, 1] with 3 channels → frames [B, F, H, W, 3] in [0, 1]."""
    x = latents.float()
    if x.ndim == 4:  # images [B, C, H, W]
        x = x[:, :, None]
    elif architecture == "cogvideox":
        x = x.permute(0, 2, 1, 3, 4)
    if x.shape[1] != 3:
        raise InputError(f"latents have {x.shape[1]} channels and the artifact stores no VAE to decode them; "
                         "rebuild from the pipeline directory (with its vae/) to get frames")
    return ((x.clamp(-1, 1) + 1) / 2).permute(0, 2, 3, 4, 1).contiguous()
