"""Writing decoded samples: MP4 (H.264 through PyAV, the maintained FFmpeg binding, `av` in the
exporter extra), PNG (an image, or a video's frames side by side), the latents as safetensors
beside them, and one file per sample for a batch (numbered).

    paths = write_samples(frames, latents, "out/clip.mp4", fps=16)   # out/clip.mp4 + out/clip.latents.safetensors
"""
from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file

from ditbake.runtime.errors import DitbakeError, InputError

log = logging.getLogger(__name__)

SUFFIXES = (".mp4", ".png")


class VideoWriterError(DitbakeError):
    """The video library is missing or cannot encode."""

    exit_code = 11


def to_uint8(frames: torch.Tensor) -> np.ndarray:
    """float [F, H, W, 3] in [0, 1] → uint8 (round to nearest, as diffusers' numpy_to_pil)."""
    return (frames.detach().float().clamp(0, 1).cpu().numpy() * 255).round().astype(np.uint8)


def _even(frames: np.ndarray, min_side: int) -> np.ndarray:
    """H.264 in yuv420p needs even sizes: upscale small clips (nearest) to `min_side`, pad odd sides by edge."""
    f, h, w, _ = frames.shape
    scale = max(1, -(-min_side // min(h, w)))
    if scale > 1:
        frames = frames.repeat(scale, axis=1).repeat(scale, axis=2)
    pad_h, pad_w = frames.shape[1] % 2, frames.shape[2] % 2
    if pad_h or pad_w:
        frames = np.pad(frames, ((0, 0), (0, pad_h), (0, pad_w), (0, 0)), mode="edge")
    return frames


def write_mp4(frames: np.ndarray, path: Path, fps: int = 16, min_side: int = 0, crf: int = 18) -> Path:
    """uint8 frames [F, H, W, 3] → H.264 MP4."""
    try:
        import av  # noqa: PLC0415
    except ImportError as exc:
        raise VideoWriterError("writing MP4 needs PyAV: `pip install av` (in the `exporter` extra), or write "
                               "--output frames.png") from exc
    frames = _even(frames, min_side)
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream("libx264" if "libx264" in av.codecs_available else "mpeg4", rate=fps)
        stream.width, stream.height = frames.shape[2], frames.shape[1]
        stream.pix_fmt = "yuv420p"
        if stream.codec_context.name == "libx264":
            stream.options = {"crf": str(crf)}
        for frame in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(frame), format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


def write_png(frames: np.ndarray, path: Path) -> Path:
    """uint8 frames [F, H, W, 3] → one PNG: the image, or the frames side by side."""
    from PIL import Image  # noqa: PLC0415

    Image.fromarray(np.concatenate(list(frames), axis=1)).save(path)
    return path


def sample_paths(output: str | Path, n: int) -> list[Path]:
    """`clip.mp4` for one sample; `clip_000.mp4`, `clip_001.mp4`, … for a batch."""
    output = Path(output)
    if output.suffix.lower() not in SUFFIXES:
        raise InputError(f"--output {output} must end in {' or '.join(SUFFIXES)}")
    if n == 1:
        return [output]
    return [output.with_name(f"{output.stem}_{i:03d}{output.suffix}") for i in range(n)]


def write_samples(frames: torch.Tensor, latents: torch.Tensor, output: str | Path, fps: int = 16,
                  min_side: int = 0) -> list[Path]:
    """Every sample of frames [B, F, H, W, 3] in [0, 1] to `output` (numbered for B > 1), each with its
    latents in `<stem>.latents.safetensors`. Returns the media paths."""
    paths = sample_paths(output, frames.shape[0])
    paths[0].parent.mkdir(parents=True, exist_ok=True)
    for i, path in enumerate(paths):
        pixels = to_uint8(frames[i])
        if path.suffix.lower() == ".mp4":
            write_mp4(pixels, path, fps=fps, min_side=min_side)
        else:
            write_png(pixels, path)
        save_file({"latents": latents[i].detach().float().contiguous().cpu()},
                  str(path.with_name(path.stem + ".latents.safetensors")))
    return paths
