"""Model adapters: a registry from diffusers class name to the adapter that handles it."""
from __future__ import annotations

import torch

from ditbake.exporter.adapters.base import Adapter, TokenLayout
from ditbake.exporter.adapters.cogvideox import CogVideoXAdapter
from ditbake.exporter.adapters.flux import FluxAdapter
from ditbake.exporter.adapters.sd3 import SD3Adapter
from ditbake.exporter.adapters.wan import WanAdapter
from ditbake.runtime.errors import UnsupportedModelError

ADAPTERS: dict[str, type[Adapter]] = {a.diffusers_class: a for a in (WanAdapter, CogVideoXAdapter, SD3Adapter,
                                                                      FluxAdapter)}


def adapter_for(model: torch.nn.Module) -> Adapter:
    name = type(model).__name__
    if name not in ADAPTERS:
        raise UnsupportedModelError(f"model class {name} is not supported; supported: {', '.join(sorted(ADAPTERS))}")
    return ADAPTERS[name](model)


__all__ = ["ADAPTERS", "Adapter", "TokenLayout", "adapter_for"]
