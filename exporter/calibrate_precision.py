"""Precision statistics for 6Bit-Diffusion's DMPQ, gathered in the one calibration pass, and the
fit of its predictor E_rel = α·Γ(t−1) + β.

`PrecisionObserver` hooks every per-block linear layer of the diffusers model. At each call
(prompt p, CFG branch br, step s, block b, layer l) it records

- ``erel_<fmt>`` [p, br, s, b, l, 2]: relative error ‖y_q − y‖₂ / ‖y‖₂ of the layer output when
  the layer runs the numerics the build ships for ``fmt``, against the model's own float output
  y: for nvfp4 the ``mixed_linear`` reference with the NVFP4 weight (W4A4); for int8 / fp8 the
  W8A8 reference with 8-bit per-channel weights (the build stores 8-bit weights for layers run
  in 8 bits). The last axis is (plain, block-Hadamard folded): both are measured so that the
  build can choose per layer (`choose_hadamard`) and the predictor is fitted on the variant that
  ships (8-bit layers ship plain; their Hadamard entry is measured for the ablation);
- ``outlier_ratio`` [p, br, s, b, l]: max|X| / mean|X| of the layer input (PDR's criterion).

Γ(t−1) is not measured again: `BlockResidualObserver` already stores ``gamma`` [p, br, s, b].

A layer a block does not have (Flux's single blocks lack the double blocks' text stream, SD3's
last block its text MLP; the calibration's ``absent_linears``) stays NaN in every table: `absent`
reads it back, and the fit, the report and the planners leave those cells out.

Fit pooling: one (α, β) per layer of each block, i.e. per (block, layer name), pooled over
prompts, CFG branches and steps 1…S−1 (step 0 has no Γ(t−1)). Per layer because α and β depend
on the layer's weight and its input distribution (a down projection after a GELU does not
behave like a query projection); pooled over steps because explaining the step-to-step change
is the predictor's whole job, and over prompts and branches because Γ is meant to carry what
differs between them (and the pooled fit has ≥ 4× more points than a per-branch one).
R² is reported per layer, as ``r2_within`` (the share of the within-layer variance of E_rel
that Γ explains: 1 − Σ SS_res / Σ SS_tot around each layer's mean — the honest "overall" number)
and as ``r2_global`` (around the global mean, which also credits the per-layer intercepts).
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path

import torch

from ditbake.exporter.calibrate import Observer
from ditbake.plugins.hadamard import fold_hadamard_into_weight
from ditbake.plugins.int8 import quantize_weight_per_channel
from ditbake.plugins.act_quant import act_quant_ref
from ditbake.plugins.mixed_linear import nvfp4_fake_activation, prepare_nvfp4_weight
from ditbake.plugins.nvfp4 import NVFP4Tensor, dequantize_nvfp4
from ditbake.runtime.errors import DitbakeError

log = logging.getLogger(__name__)

FORMATS = ("nvfp4", "int8", "fp8")
HADAMARD_AXIS = ("plain", "hadamard")
AUTO_CACHE_FRACTION = 0.25  # of the free CUDA memory: the base pass batches prompts in what is left


class PrecisionStatsError(DitbakeError):
    """The calibration lacks the precision statistics, or they cannot be fitted."""

    exit_code = 10


@dataclass(frozen=True)
class PrecisionObserverConfig:
    """What the precision observer measures.

    formats: activation formats to measure (W4A4 nvfp4 and W4A8 int8 by default; fp8 optional).
    max_tokens: rows (tokens) of each layer input used for E_rel, taken with a fixed stride; the
        formats quantize per token, so a strided subset estimates the same error at a fraction of
        the cost (None: all rows). The outlier ratio always uses the whole input.
    weight_cache_bytes: memory for the layers' quantized weights, made once and kept (≈ 6 bytes per
        weight element with nvfp4 + int8: the dequantized NVFP4 weight in bf16 and the 8-bit one,
        plain and Hadamard-folded; 8 with fp8 too). Layers beyond it, in block order, re-quantize
        their weight at each call (the same tensors, recomputed). None: everything on the CPU, on
        CUDA `AUTO_CACHE_FRACTION` of the memory free when the observer starts — a 12 B Flux would
        otherwise need ≈ 70 GB for these copies on top of the model.
    """

    formats: tuple[str, ...] = ("nvfp4", "int8")
    max_tokens: int | None = 1024
    weight_cache_bytes: int | None = None

    def __post_init__(self):
        if not self.formats or any(f not in FORMATS for f in self.formats):
            raise PrecisionStatsError(f"precision observer formats must be a non-empty subset of {FORMATS}, "
                                      f"got {self.formats}")
        if "nvfp4" not in self.formats:
            raise PrecisionStatsError("the DMPQ predictor is fitted on nvfp4 errors; include 'nvfp4' in formats")
        if self.max_tokens is not None and self.max_tokens < 1:
            raise PrecisionStatsError(f"max_tokens must be >= 1 or None, got {self.max_tokens}")
        if self.weight_cache_bytes is not None and (isinstance(self.weight_cache_bytes, bool)
                                                    or not isinstance(self.weight_cache_bytes, int)
                                                    or self.weight_cache_bytes < 0):
            raise PrecisionStatsError(f"weight_cache_bytes must be a byte count >= 0 or None, "
                                      f"got {self.weight_cache_bytes!r}")


def observer_factory(config: PrecisionObserverConfig | None = None):
    """For `calibrate(..., observers=[observer_factory()])`."""
    cfg = config or PrecisionObserverConfig()
    return lambda adapter, shape: PrecisionObserver(adapter, shape, cfg)


class PrecisionObserver(Observer):
    """Forward hooks on every block linear; see the module docstring for what is recorded. Batched:
    one value per prompt of the forward's batch (the formats quantize per token, so a prompt's
    error does not depend on the others in its batch). Results stay on the model's device until
    `results()`, so the hooks never wait for the host."""

    batched = True

    def __init__(self, adapter, shape: tuple[int, int, int, int], config: PrecisionObserverConfig):
        self.config = config
        self.layers = tuple(adapter.linear_layers)
        n_layers = len(self.layers)
        device = next(adapter.model.parameters()).device
        self.erel = {f: torch.full((*shape, n_layers, 2), float("nan"), device=device) for f in config.formats}
        self.outlier = torch.full((*shape, n_layers), float("nan"), device=device)
        self.where = (slice(0, 1), 0, 0)
        self.handles = []
        budget = _cache_budget(config.weight_cache_bytes, device)
        per_element = 2 * (2 + len(set(config.formats) - {"nvfp4"}))  # bf16 NVFP4 + 1-byte codes, ×2 Hadamard
        cached = total = 0
        for b, block in enumerate(adapter.block_modules()):
            have = set(adapter.block_linears(b))
            for li, name in enumerate(self.layers):
                if name not in have:
                    continue
                module = block.get_submodule(name)
                total += 1
                need = per_element * module.weight.numel()
                weights = None
                if need <= budget:
                    weights = self._quantized_weights(module)
                    budget -= need
                    cached += 1
                bias = None if module.bias is None else module.bias.detach().float()
                self.handles.append(module.register_forward_hook(self._hook(b, li, weights, bias)))
        self.cached_layers, self.total_layers = cached, total
        if cached < total:
            log.info("precision statistics: quantized weights of %d of %d layers kept, the other %d re-quantized at "
                     "each call (raise --precision-weight-cache-gb to keep more)", cached, total, total - cached)

    def _quantized_weights(self, module) -> dict:
        """NVFP4 and 8-bit weights per Hadamard setting (plain, folded): the same tensors the build
        stores, so the measured error is the shipped one."""
        weights = {}
        w = module.weight.detach().float()
        for had in (False, True):
            t = prepare_nvfp4_weight(w, hadamard=had)
            # the dequantized NVFP4 weight over its global scale (e2m1 × e4m3 block scale: ≤ 6
            # significant bits, exact in bf16 at half the memory), made once instead of at every
            # layer call; the hook multiplies the global scale into the output
            unit = NVFP4Tensor(t.packed, t.block_scales, torch.ones((), device=w.device), t.shape)
            weights["nvfp4", had] = (dequantize_nvfp4(unit, torch.bfloat16), t.global_scale.float())
            for fmt in set(self.config.formats) - {"nvfp4"}:
                weights[fmt, had] = quantize_weight_per_channel(fold_hadamard_into_weight(w) if had else w, fmt)
        return weights

    def _hook(self, block: int, layer: int, cached: dict | None, bias):
        def hook(module, args, output):
            weights = cached if cached is not None else self._quantized_weights(module)
            rows, br, s = self.where
            x = args[0].detach()
            x3 = x.reshape(x.shape[0], -1, x.shape[-1])  # [batch, tokens, in]
            absx = x3.abs()  # in the model's dtype: max is exact, the mean accumulates in fp32
            self.outlier[rows, br, s, block, layer] = (absx.amax(dim=(1, 2)).float()
                                                       / absx.mean(dim=(1, 2), dtype=torch.float32).clamp_min(1e-30))
            del absx
            tokens = x3.shape[1]
            if self.config.max_tokens is not None and tokens > self.config.max_tokens:
                x3 = x3[:, :: math.ceil(tokens / self.config.max_tokens)]
            batch = x3.shape[0]
            x2 = x3.float().reshape(-1, x3.shape[-1])
            y = torch.nn.functional.linear(x2, module.weight.float(), None if module.bias is None
                                           else module.bias.float())
            norm = y.reshape(batch, -1).norm(dim=1).clamp_min(1e-30)
            for fmt, erel in self.erel.items():
                for h in (False, True):
                    yq = _fake_quant_linear(x2, weights[fmt, h], bias, fmt, h)
                    erel[rows, br, s, block, layer, int(h)] = (yq - y).reshape(batch, -1).norm(dim=1) / norm
        return hook

    def results(self) -> dict[str, torch.Tensor]:
        out = {f"erel_{f}": t.cpu() for f, t in self.erel.items()}
        out["outlier_ratio"] = self.outlier.cpu()
        return out

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


def _cache_budget(configured: int | None, device: torch.device) -> int:
    if configured is not None:
        return configured
    if device.type != "cuda":
        return 1 << 62  # host memory: the calibrations run on the CPU are small models
    from ditbake.exporter.calibrate_memory import free_bytes  # noqa: PLC0415

    return int(AUTO_CACHE_FRACTION * free_bytes(device))


def _fake_quant_linear(x2: torch.Tensor, weight, bias, fmt: str, hadamard: bool) -> torch.Tensor:
    """The shipped numerics of `mixed_linear_ref` (nvfp4) / `linear_w8a8_ref` (int8, fp8) as one FP32
    matmul of fake-quantized operands. The references accumulate 8-bit products exactly in float64
    and dequantize the packed NVFP4 weight at every call; FP32 accumulation differs from them by
    ~1e-7 relative — five orders below the errors measured here — at a fraction of the time
    (float64 matmuls were the largest phase of a real-size GPU calibration). Tests hold the two
    within 1e-4 of each other."""
    if fmt == "nvfp4":
        unit, global_scale = weight
        out = (nvfp4_fake_activation(x2, hadamard) @ unit.float().T) * global_scale
    else:
        qw, sw = weight
        qx, sx, _ = act_quant_ref(x2, fmt, hadamard)
        out = (qx.float() @ qw.float().T) * sx.float().unsqueeze(-1) * sw.float()
    return out if bias is None else out + bias


# ---------------------------------------------------------------- choosing and fitting

def require(tensors: dict[str, torch.Tensor], *names: str) -> None:
    missing = [n for n in names if n not in tensors]
    if missing:
        raise PrecisionStatsError(f"the calibration has no {', '.join(missing)}; re-run `ditbake calibrate` "
                                  "with precision statistics on (--precision-stats)")


def absent(tensors: dict[str, torch.Tensor]) -> torch.Tensor:
    """bool [block, layer]: layers a block does not have (never measured: NaN in every cell)."""
    require(tensors, "erel_nvfp4")
    e = tensors["erel_nvfp4"]
    return torch.isnan(e).all(dim=0).all(dim=0).all(dim=0).all(dim=-1) if e.numel() else \
        torch.zeros(e.shape[3:5], dtype=torch.bool)


def choose_hadamard(tensors: dict[str, torch.Tensor]) -> torch.Tensor:
    """bool [block, layer]: fold the block Hadamard into a layer's weight iff it lowers the layer's
    mean W4A4 error over the calibration (measured, per layer)."""
    require(tensors, "erel_nvfp4")
    mean = tensors["erel_nvfp4"].double().nanmean(dim=(0, 1, 2))  # [block, layer, 2]
    return mean[..., 1] < mean[..., 0]


def chosen_erel(tensors: dict[str, torch.Tensor], fmt: str, hadamard: torch.Tensor) -> torch.Tensor:
    """E_rel [p, br, s, block, layer] of `fmt` under the chosen Hadamard setting per layer."""
    require(tensors, f"erel_{fmt}")
    e = tensors[f"erel_{fmt}"]
    return torch.where(hadamard, e[..., 1], e[..., 0])


@dataclass(frozen=True)
class PredictorFit:
    """E_rel ≈ alpha·Γ(t−1) + beta per (block, layer); r2 per (block, layer) (NaN where E_rel or Γ
    does not vary); n samples per layer."""

    alpha: torch.Tensor  # [block, layer] float64
    beta: torch.Tensor
    r2: torch.Tensor
    r2_within: float
    r2_global: float
    n: int
    missing: torch.Tensor | None = None  # [block, layer] bool: absent layers (no fit)

    def predict(self, gamma_prev: torch.Tensor) -> torch.Tensor:
        """gamma_prev [..., block] → predicted E_rel [..., block, layer]."""
        return self.alpha * gamma_prev.double().unsqueeze(-1) + self.beta

    def summary(self, layers: tuple[str, ...]) -> dict:
        def num(v):
            return None if not math.isfinite(float(v)) else float(v)

        per_layer = {f"{b}.{name}": {"alpha": num(self.alpha[b, li]), "beta": num(self.beta[b, li]),
                                            "r2": num(self.r2[b, li])}
                     for b in range(self.alpha.shape[0]) for li, name in enumerate(layers)
                     if self.missing is None or not self.missing[b, li]}
        finite = self.r2[torch.isfinite(self.r2)]
        return {"r2_within": num(self.r2_within), "r2_global": num(self.r2_global),
                "r2_median_layer": num(finite.median()) if finite.numel() else None,
                "samples_per_layer": self.n, "pooling": "per (block, layer) over prompts, branches, steps>=1",
                "layers": per_layer}


def predictor_samples(gamma: torch.Tensor, erel: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Pairs (Γ(t−1), E_rel(t)), steps ≥ 1, as [n, block, layer] float64 (Γ broadcast over layers)."""
    if gamma.shape[2] < 2:
        raise PrecisionStatsError("the predictor needs at least 2 calibrated steps (Γ of the previous step)")
    g = gamma[:, :, :-1].double()  # [p, br, s-1, block]
    e = erel[:, :, 1:].double()  # [p, br, s-1, block, layer]
    g = g.unsqueeze(-1).expand_as(e)
    return g.reshape(-1, *e.shape[-2:]), e.reshape(-1, *e.shape[-2:])


def fit_linear(x: torch.Tensor, y: torch.Tensor) -> PredictorFit:
    """Least squares y = αx + β independently per trailing index ([n, ...] inputs), closed form.
    A trailing index whose y is NaN throughout (an absent layer) gets α = β = 0, R² NaN, and is
    left out of the pooled R²s."""
    missing = torch.isnan(y).all(0)
    if missing.any():
        y = torch.where(missing, torch.zeros_like(y), y)
        x = torch.where(missing, torch.zeros_like(x), x)
    mx, my = x.mean(0), y.mean(0)
    dx, dy = x - mx, y - my
    sxx, sxy = (dx * dx).sum(0), (dx * dy).sum(0)
    alpha = torch.where(sxx > 0, sxy / sxx.clamp_min(1e-300), torch.zeros_like(sxx))
    beta = my - alpha * mx
    res = y - (alpha * x + beta)
    ss_res, ss_tot = (res * res).sum(0), (dy * dy).sum(0)
    # E_rel that does not vary (beyond float rounding of its mean) has no R²: NaN, not 0 or 1
    varies = (ss_tot > x.shape[0] * (1e-9 * my.abs()) ** 2) & ~missing
    r2 = torch.where(varies, 1 - ss_res / ss_tot.clamp_min(1e-300), torch.full_like(ss_tot, float("nan")))
    tot_within = float(ss_tot.sum())  # absent cells are 0 in every sum
    present = ~missing.expand_as(y)
    tot_global = float(((y[present] - y[present].mean()) ** 2).sum()) if present.any() else 0.0
    r2_within = 1 - float(ss_res.sum()) / tot_within if tot_within > 0 else float("nan")
    r2_global = 1 - float(ss_res.sum()) / tot_global if tot_global > 0 else float("nan")
    return PredictorFit(alpha, beta, r2, r2_within, r2_global, int(x.shape[0]), missing)


def fit_predictor(tensors: dict[str, torch.Tensor], fmt: str = "nvfp4",
                  hadamard: torch.Tensor | None = None) -> PredictorFit:
    """Fit E_rel(fmt) = α·Γ(t−1) + β per (block, layer) on the calibration (see module doc)."""
    require(tensors, "gamma", f"erel_{fmt}")
    had = choose_hadamard(tensors) if hadamard is None else hadamard
    x, y = predictor_samples(tensors["gamma"], chosen_erel(tensors, fmt, had))
    # NaN throughout a (block, layer) cell is a layer the block lacks (the planner checks that against
    # the calibration's absent_linears); NaN anywhere else is a layer that missed some calls
    if not torch.isfinite(y[:, ~absent(tensors)]).all() or not torch.isfinite(x).all():
        raise PrecisionStatsError("precision statistics contain NaN (a layer never ran during calibration); "
                                  "re-run `ditbake calibrate`")
    return fit_linear(x, y)


def precision_report(tensors: dict[str, torch.Tensor], layers: tuple[str, ...]) -> dict:
    """JSON-able summary: Hadamard choice, fits per format, outlier ratios."""
    had = choose_hadamard(tensors)
    out = {"hadamard_layers": [f"{b}.{layers[li]}" for b, li in had.nonzero().tolist()], "formats": {}}
    for key in sorted(tensors):
        if key.startswith("erel_"):
            fmt = key.removeprefix("erel_")
            fit = fit_predictor(tensors, fmt, had)
            mean = chosen_erel(tensors, fmt, had).double().nanmean()
            out["formats"][fmt] = {"mean_erel": float(mean), **fit.summary(layers)}
    ratio = tensors["outlier_ratio"].double()
    ratio = ratio[~torch.isnan(ratio)]
    out["outlier_ratio"] = {"median": float(ratio.median()), "max": float(ratio.max())}
    return out


def scatter_plot(tensors: dict[str, torch.Tensor], layers: tuple[str, ...], path: str | Path,
                 title: str = "", fmt: str = "nvfp4") -> Path:
    """Γ(t−1) against E_rel per layer type (colour), one marker per (prompt, branch, step, block),
    with each layer type's pooled fit line; like the paper's figure."""
    import matplotlib  # noqa: PLC0415

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    had = choose_hadamard(tensors)
    x, y = predictor_samples(tensors["gamma"], chosen_erel(tensors, fmt, had))
    fit = fit_linear(x, y)
    fig, ax = plt.subplots(figsize=(6.4, 4.6))
    cmap = plt.get_cmap("tab10" if len(layers) <= 10 else "tab20")  # Flux lists 17 layers: one colour each
    for li, name in enumerate(layers):
        xs, ys = x[..., li].flatten(), y[..., li].flatten()
        ax.scatter(xs.numpy(), ys.numpy(), s=5, alpha=0.45, color=cmap(li % cmap.N), label=name)
        # fit lines per block would clutter: draw this layer type's mean line over its Γ range
        has = ~torch.isnan(y[..., li]).all(0)  # the blocks that have this layer
        if not has.any():
            continue
        a, b_ = float(fit.alpha[has, li].mean()), float(fit.beta[has, li].mean())
        grid = torch.linspace(float(xs.min()), float(xs.max()), 2)
        ax.plot(grid.numpy(), (a * grid + b_).numpy(), color=cmap(li % cmap.N), lw=1)
    ax.set_xlabel("Γ(t−1): relative L1 change of the block at the previous step")
    ax.set_ylabel(f"E_rel ({fmt} activations, NVFP4 weights)")
    ax.set_title(f"{title}  R² within-layer {fit.r2_within:.2f}, median per layer "
                 f"{float(fit.r2[torch.isfinite(fit.r2)].median()):.2f}", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=6, markerscale=2, ncol=2)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
