"""Which runtime module serves which pipeline component (text encoders, VAE decoders).

Each text encoder module offers `encode(weights, config, input_ids, attention_mask, ...)`; each VAE
decoder module `decode(weights, config, latents)`, `latent_channels(config)`, `scale_factors(config)`.
`kind_for_class` maps the transformers/diffusers class name recorded at export to a kind.
"""
from __future__ import annotations

from ditbake.runtime import text_clip, text_t5, vae_cogvideox, vae_kl, vae_wan
from ditbake.runtime.errors import UnsupportedModelError

TEXT_ENCODERS = {"t5": text_t5, "umt5": text_t5, "clip": text_clip}
VAE_DECODERS = {"kl": vae_kl, "wan": vae_wan, "cogvideox": vae_cogvideox}

CLASS_KINDS = {
    "T5EncoderModel": "t5",
    "UMT5EncoderModel": "umt5",
    "CLIPTextModel": "clip",
    "CLIPTextModelWithProjection": "clip",
    "AutoencoderKL": "kl",
    "AutoencoderKLWan": "wan",
    "AutoencoderKLCogVideoX": "cogvideox",
}


DECODER_PREFIXES = ("decoder.", "post_quant_conv.")


def decoder_weights(weights: dict) -> dict:
    """The part of a VAE's state dict that `decode` reads (the encoder is not shipped)."""
    return {k: v for k, v in weights.items() if k.startswith(DECODER_PREFIXES)}


class UnsupportedComponentError(UnsupportedModelError):
    """A pipeline component whose class the runtime does not implement."""


def kind_for_class(class_name: str) -> str:
    """The component kind ('t5', 'umt5', 'clip', 'kl', 'wan', 'cogvideox') of a transformers/diffusers class."""
    kind = CLASS_KINDS.get(class_name)
    if kind is None:
        raise UnsupportedComponentError(
            f"pipeline component class {class_name or '(unnamed)'!r} is not supported; supported: "
            f"{', '.join(sorted(CLASS_KINDS))}")
    return kind
