"""Turn generated latents into frames: an animated GIF and a PNG strip (exporter-side: Pillow)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw


def latents_to_frames(latents: torch.Tensor, architecture: str) -> np.ndarray:
    """One sample's latents → uint8 frames [F, H, W, 3].

    3-channel latents are pixel space in [-1, 1]; other channel counts are shown through their
    first three channels, normalised over the clip (a view for eyes, not a decode).
    """
    x = latents.detach().float().cpu()
    if x.ndim == 3:  # an image [C, H, W]: one frame
        x = x[:, None]
    if architecture == "cogvideox":
        x = x.permute(1, 0, 2, 3)  # [F, C, H, W] → [C, F, H, W]
    c = x.shape[0]
    if c == 3:
        x = (x.clamp(-1, 1) + 1) / 2
    else:
        x = x[:3] if c >= 3 else x[:1].expand(3, *x.shape[1:])
        lo, hi = x.amin(dim=(1, 2, 3), keepdim=True), x.amax(dim=(1, 2, 3), keepdim=True)
        x = (x - lo) / (hi - lo).clamp_min(1e-6)
    return (x.permute(1, 2, 3, 0).numpy() * 255).round().astype(np.uint8)


def _upscale(frame: np.ndarray, min_side: int) -> Image.Image:
    img = Image.fromarray(frame)
    scale = max(1, min_side // min(img.size))
    return img.resize((img.width * scale, img.height * scale), Image.NEAREST)


def write_gif(frames: np.ndarray, path: Path, fps: int = 8, min_side: int = 128) -> Path:
    images = [_upscale(f, min_side) for f in frames]
    images[0].save(path, save_all=True, append_images=images[1:], duration=int(1000 / fps), loop=0)
    return path


def write_strip(frames: np.ndarray, path: Path, label: str = "", min_side: int = 96) -> Path:
    """All frames side by side, with a caption line on top (e.g. 'RANDOM WEIGHTS')."""
    images = [_upscale(f, min_side) for f in frames]
    w, h = images[0].size
    caption = 14 if label else 0
    strip = Image.new("RGB", (w * len(images), h + caption), "white")
    for i, img in enumerate(images):
        strip.paste(img, (i * w, caption))
    if label:
        ImageDraw.Draw(strip).text((2, 1), label, fill="black")
    strip.save(path)
    return path
