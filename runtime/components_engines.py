"""Compiled component engines (text encoders, VAE decoder) of aoti / tensorrt artifacts.

The exporter (exporter/engine_components.py) traces `ComponentModule` — the runtime's own plain-torch
encoder or decoder with its weights as inputs — at batch 1: text encoders at their tokenizer length,
the VAE decoder per shape profile. Here the manifest's `components.engines` entries are loaded (each
file indexed and sha256-checked, native code only from hashed files) and called per prompt / per
sample. A call the engines were not built for (another token length, latents of no profile, another
CLIP hidden state) returns None and the caller runs the eager module, as on the eager backend.
"""
from __future__ import annotations

import logging
from pathlib import Path

import torch

from ditbake.runtime.errors import ArtifactError

log = logging.getLogger(__name__)

CLIP_HIDDEN_STATE = -2  # the hidden state SD3 conditions on; compiled as an extra CLIP output


class ComponentModule(torch.nn.Module):
    """fn(weights, config, *inputs, **kwargs) with the weights as trailing positional inputs (sorted names);
    a dict result is returned as the tuple of its `outputs` entries."""

    def __init__(self, fn, config: dict, names: list[str], n_inputs: int, outputs: tuple[str, ...] | None,
                 kwargs: dict):
        super().__init__()
        self.fn, self.config, self.names, self.n_inputs = fn, config, list(names), n_inputs
        self.outputs, self.kwargs = outputs, dict(kwargs)

    def forward(self, *args):
        inputs, weights = args[:self.n_inputs], args[self.n_inputs:]
        out = self.fn(dict(zip(self.names, weights)), self.config, *inputs, **self.kwargs)
        return tuple(out[k] for k in self.outputs) if self.outputs else out


def as_outputs(out) -> list[torch.Tensor]:
    """A loaded package returns a lone output as the tensor itself, several as a list."""
    return list(out) if isinstance(out, (list, tuple)) else [out]


def text_outputs(result) -> tuple[str, ...] | None:
    """The output names of an encoder result: a dict's tensor entries in order, None for a tensor."""
    if isinstance(result, dict):
        return tuple(k for k, v in result.items() if torch.is_tensor(v))
    return None


def vae_input_shape(architecture: str, latent_shape) -> tuple[int, ...]:
    """One sample's VAE decoder input for a profile's transformer latents: CogVideoX's [F, C, H, W]
    becomes [C, F, H, W] (runtime/components_session.py permutes it so); the others are unchanged."""
    shape = tuple(int(d) for d in latent_shape)
    if architecture == "cogvideox":
        return (shape[1], shape[0], *shape[2:])
    return shape


class ComponentEngines:
    """The loaded engines of one artifact, by key (`text_encoder…`, `vae-<profile>`)."""

    def __init__(self, path: Path, entries: list[dict], backend: str, device: torch.device):
        from ditbake.runtime.engines import engine_files, load_aoti_package  # noqa: PLC0415

        self.entries = {e["key"]: e for e in entries}
        self.engines: dict[str, object] = {}
        files = engine_files(path, entries)  # inside the artifact, listed and sha256-checked
        if backend == "tensorrt":
            self._load_trt(files, entries, device)
            return
        for e in entries:
            self.engines[e["key"]] = load_aoti_package(files[e["file"]], e, device, "component engine")

    def _load_trt(self, files: dict, entries: list[dict], device: torch.device) -> None:
        """TensorRT plans (UNTESTED: no TensorRT on the project's machines); ONNX-only entries stay eager."""
        if not any(e.get("file") for e in entries):
            return
        import tensorrt as trt  # noqa: PLC0415

        from ditbake.runtime.engines_trt import _Engine  # noqa: PLC0415

        runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
        for e in entries:
            if e.get("file"):
                self.engines[e["key"]] = _Engine(trt, runtime, files[e["file"]], e["inputs"], e["outputs"])

    def _weights(self, entry: dict, n_inputs: int, weights: dict) -> list[torch.Tensor]:
        try:
            return [weights[k] for k in entry["inputs"][n_inputs:]]
        except KeyError as exc:
            raise ArtifactError(f"component engine {entry['key']} takes weight {exc.args[0]!r}, which the artifact's "
                                "component weights lack; rebuild the artifact") from None

    def encode(self, name: str, weights: dict, input_ids: torch.Tensor, attention_mask: torch.Tensor,
               hidden_state_index: int | None = None):
        """The text encoder `name`'s result (tensor or dict, as the eager module's), or None when no
        engine fits this call."""
        entry, engine = self.entries.get(name), self.engines.get(name)
        if engine is None or list(input_ids.shape[1:]) != entry["input_shape"][1:]:
            return None
        if hidden_state_index is not None and hidden_state_index != entry.get("hidden_state_index"):
            return None
        w = self._weights(entry, 2, weights)
        rows = [as_outputs(engine(input_ids[i:i + 1], attention_mask[i:i + 1].to(input_ids.dtype), *w))
                for i in range(input_ids.shape[0])]
        outs = [torch.cat([r[j] for r in rows]) for j in range(len(entry["outputs"]))]
        if entry.get("returns") == "dict":
            return dict(zip(entry["outputs"], outs))
        return outs[0]

    def decode(self, weights: dict, z: torch.Tensor) -> torch.Tensor | None:
        """The VAE decoder's output for latents z [B, …] (per sample), or None when no profile's engine fits."""
        for key, entry in self.entries.items():
            if entry.get("component") == "vae" and list(z.shape[1:]) == entry["input_shape"][1:] \
                    and key in self.engines:
                w = self._weights(entry, 1, weights)
                return torch.cat([as_outputs(self.engines[key](z[i:i + 1], *w))[0] for i in range(z.shape[0])])
        return None
