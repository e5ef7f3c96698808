"""The baked sampler: each step's update as fixed linear coefficients over recent samples and
model outputs, so the runtime needs no diffusers scheduler.

    x_{i+1} = Σ_k a[i][k] · x_{i-k}  +  Σ_k b[i][k] · m_{i-k}

x_i is the sample the model saw at step i, m_i its (guided) output. The exporter extracts a and b
from the real diffusers scheduler (see exporter/sampler.py) and checks them exactly.
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass

import torch

from ditbake.runtime.errors import ArtifactError


@dataclass(frozen=True)
class SamplerTable:
    name: str
    timesteps: tuple[float, ...]
    init_noise_sigma: float
    sample_coeffs: tuple[tuple[float, ...], ...]
    output_coeffs: tuple[tuple[float, ...], ...]

    def __post_init__(self):
        n = len(self.timesteps)
        if n == 0 or len(self.sample_coeffs) != n or len(self.output_coeffs) != n:
            raise ArtifactError(f"sampler table {self.name!r} is inconsistent: {n} timesteps, "
                                f"{len(self.sample_coeffs)}/{len(self.output_coeffs)} coefficient rows")

    @property
    def num_steps(self) -> int:
        return len(self.timesteps)

    @property
    def window(self) -> int:
        return max(max(len(r) for r in self.sample_coeffs), max(len(r) for r in self.output_coeffs))

    def to_json(self) -> dict:
        return {"name": self.name, "timesteps": list(self.timesteps), "init_noise_sigma": self.init_noise_sigma,
                "sample_coeffs": [list(r) for r in self.sample_coeffs],
                "output_coeffs": [list(r) for r in self.output_coeffs]}

    @staticmethod
    def from_json(d: dict) -> "SamplerTable":
        try:
            return SamplerTable(str(d["name"]), tuple(float(t) for t in d["timesteps"]), float(d["init_noise_sigma"]),
                                tuple(tuple(float(c) for c in r) for r in d["sample_coeffs"]),
                                tuple(tuple(float(c) for c in r) for r in d["output_coeffs"]))
        except (KeyError, TypeError, ValueError) as exc:
            raise ArtifactError(f"malformed sampler table: {exc!r}") from exc


class BakedSampler:
    """Holds the short history the table needs and applies one step at a time."""

    def __init__(self, table: SamplerTable):
        self.table = table
        self.samples: deque[torch.Tensor] = deque(maxlen=table.window)
        self.outputs: deque[torch.Tensor] = deque(maxlen=table.window)

    def step(self, i: int, sample: torch.Tensor, output: torch.Tensor) -> torch.Tensor:
        self.samples.appendleft(sample)
        self.outputs.appendleft(output.to(sample.dtype))
        nxt = torch.zeros_like(sample)
        for coeff, x in zip(self.table.sample_coeffs[i], self.samples):
            if coeff:
                nxt.add_(x, alpha=coeff)
        for coeff, m in zip(self.table.output_coeffs[i], self.outputs):
            if coeff:
                nxt.add_(m, alpha=coeff)
        return nxt
