"""What every model adapter exposes to calibration, planning and build."""
from __future__ import annotations

import json
from dataclasses import dataclass
from types import ModuleType

import torch

from ditbake.runtime import arch as runtime_arch


@dataclass(frozen=True)
class TokenLayout:
    """Where text and visual tokens sit in the sequence a compressible attention site sees."""

    text: tuple[int, int]
    visual: tuple[int, int]
    grid: tuple[int, int, int]  # frames × height × width of visual tokens after patchify


class Adapter:
    """Wraps one diffusers transformer: prologue → uniform blocks → epilogue, plus metadata.

    The compute functions are the runtime's own implementation of the architecture, run over
    this model's state dict (shared tensors, no copy), so calibration sees exactly what the
    runtime will run; tests hold them to the diffusers forward.
    """

    architecture: str = ""
    diffusers_class: str = ""

    def __init__(self, model: torch.nn.Module):
        self.model = model
        self.arch: ModuleType = runtime_arch.get(self.architecture)
        self.config = json.loads(json.dumps(dict(model.config), default=str))
        self.check_supported()

    # --- metadata -----------------------------------------------------------------------------
    def check_supported(self) -> None:
        """Raise UnsupportedModelError for config options the runtime does not implement."""

    @property
    def num_blocks(self) -> int:
        return self.arch.num_blocks(self.config)

    @property
    def heads(self) -> int:
        return self.arch.heads(self.config)

    @property
    def linear_layers(self) -> tuple[str, ...]:
        """Per-block linear layers the precision planner may quantize (names relative to a block):
        every layer some block has; `block_linears` says which a given block has."""
        return self.arch.BLOCK_LINEARS

    def block_linears(self, index: int) -> tuple[str, ...]:
        return runtime_arch.block_linears(self.arch, self.config, index)

    @property
    def absent_linears(self) -> list[tuple[int, str]]:
        """(block, layer) pairs of `linear_layers` a block does not have (Flux's two kinds, SD3's last block)."""
        return runtime_arch.absent_linears(self.arch, self.config, self.num_blocks)

    @property
    def attention_sites(self) -> dict[str, int]:
        """Per-block attention sites the head planner may compress → number of heads."""
        return {site: self.heads for site in self.arch.COMPRESSIBLE_ATTENTION}

    def block_modules(self) -> list[torch.nn.Module]:
        raise NotImplementedError

    def latent_shape(self, frames: int, height: int, width: int) -> tuple[int, ...]:
        return self.arch.latent_shape(self.config, frames, height, width)

    def token_layout(self, latent: tuple[int, ...], text_len: int) -> TokenLayout:
        raise NotImplementedError

    def profile_tensors(self, profile: dict) -> dict[str, torch.Tensor]:
        """Shape-dependent constants the runtime needs for a supported shape profile."""
        return {}

    def weights(self) -> dict[str, torch.Tensor]:
        return {k: v.detach() for k, v in self.model.state_dict().items()}

    # --- compute ------------------------------------------------------------------------------
    def diffusers_forward(self, latents, timestep, text, pooled=None, guidance=None) -> torch.Tensor:
        """The diffusers model's output. `pooled` [B, P] and `guidance` [B] matter only to
        architectures with those prologue inputs (runtime.arch.extra_inputs); others ignore them."""
        raise NotImplementedError

    def block_io(self, args, kwargs, output) -> tuple[torch.Tensor, torch.Tensor]:
        """From a forward hook on a diffusers block: (joint input, joint output) hidden tokens."""
        raise NotImplementedError
