"""Which device a command or session runs on, checked before anything is loaded or moved.

Every entry point (the session, calibration, eval, the CLI's argument check) calls
`resolve_device`, so a device this machine cannot drive gets the same error everywhere:
`BackendError` (exit 6) — the request is well formed, this machine just cannot serve it.
"""
from __future__ import annotations

import torch

from ditbake.runtime.errors import BackendError

DEVICE_TYPES = ("cpu", "cuda")


def resolve_device(name: str | torch.device) -> torch.device:
    """`name` as a torch.device that exists here: cpu, or cuda[:N] with a visible GPU N."""
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError, ValueError):
        raise BackendError(f"unknown device {name!r}; use cpu or cuda[:N]") from None
    if device.type not in DEVICE_TYPES:
        raise BackendError(f"device {name!r} is not supported; use cpu or cuda[:N]")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise BackendError(f"device {str(name)!r} requested but no CUDA GPU is visible to torch here; "
                               "use --device cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise BackendError(f"device {str(name)!r}: only {torch.cuda.device_count()} CUDA device(s) are visible")
    return device
