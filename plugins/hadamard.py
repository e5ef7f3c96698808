"""Block Hadamard rotation along the reduction axis: the specification (PyTorch, CPU).

``H`` is the Sylvester Hadamard matrix of size ``b`` divided by ``sqrt(b)``: orthonormal and
symmetric (``H = Hᵀ``, ``H Hᵀ = I``). The rotation acts on consecutive blocks of ``b`` elements
of the last axis. Activations are rotated online (``x -> x H``) and the weight offline
(``W -> W H``), so ``(x H)(W H)ᵀ = x H Hᵀ Wᵀ = x Wᵀ``: the product is unchanged while outliers
are spread over the block, which is what makes low-bit activations work.

Block size: 128. When K is not a multiple of 128 (tiny test models), the block falls back to
the largest power of two dividing K (``hadamard_block_size``), a pure function of K so that the
offline fold and the online rotation always agree. K with no power-of-two factor >= 2 raises
:class:`QuantFormatError`.
"""
from __future__ import annotations

import math

import torch

from ditbake.plugins.nvfp4 import QuantFormatError

HADAMARD_BLOCK = 128


def hadamard_block_size(k: int) -> int:
    """128, or the largest power of two dividing ``k`` when 128 does not divide it."""
    if k <= 0:
        raise QuantFormatError(f"Hadamard needs a positive reduction size, got K={k}")
    block = min(HADAMARD_BLOCK, k & -k)
    if block < 2:
        raise QuantFormatError(f"Hadamard needs K divisible by 2 (ideally by {HADAMARD_BLOCK}), got K={k}")
    return block


def _sylvester_pm1(size: int, dtype: torch.dtype, device) -> torch.Tensor:
    """Unnormalised ±1 Sylvester matrix: H[i, j] = (-1)^popcount(i & j), which is the
    recursion H_2n = [[H, H], [H, -H]] written in closed form. Built with tensor ops on the
    target device (no cached constant), so it also works under fake tensors and torch.export."""
    idx = torch.arange(size, device=device)
    both = idx[:, None] & idx[None, :]
    parity = torch.zeros_like(both)
    for bit in range(max(size.bit_length() - 1, 0)):
        parity = parity ^ ((both >> bit) & 1)
    return (1 - 2 * parity).to(dtype)


def hadamard_matrix(size: int = HADAMARD_BLOCK, dtype: torch.dtype = torch.float32, device=None) -> torch.Tensor:
    """Orthonormal Sylvester Hadamard matrix of ``size`` (a power of two)."""
    if size < 1 or size & (size - 1):
        raise QuantFormatError(f"Hadamard size must be a power of two, got {size}")
    return _sylvester_pm1(size, torch.float64, device).div(math.sqrt(size)).to(dtype)


def hadamard_sign_matrix(size: int = HADAMARD_BLOCK, dtype: torch.dtype = torch.float32, device=None) -> torch.Tensor:
    """The ±1 matrix (exact in any float dtype); kernels multiply by 1/sqrt(size) afterwards."""
    if size < 1 or size & (size - 1):
        raise QuantFormatError(f"Hadamard size must be a power of two, got {size}")
    return _sylvester_pm1(size, dtype, device)


def _rotate_blocks(t: torch.Tensor, block: int) -> torch.Tensor:
    # Sum with the exact ±1 matrix first, then one multiply by 1/sqrt(b): the same order as the
    # GPU kernels (their tensor-core dot takes ±1 exactly in bf16), so both round alike.
    signs = hadamard_sign_matrix(block, dtype=t.dtype, device=t.device)
    blocks = t.reshape(*t.shape[:-1], t.shape[-1] // block, block)
    return ((blocks @ signs) * (1.0 / math.sqrt(block))).reshape(t.shape)


def apply_hadamard(x: torch.Tensor, block: int | None = None) -> torch.Tensor:
    """Rotate activations ``x`` [..., K] blockwise: ``x H``. Computed in FP32 (FP64 stays FP64),
    returned as FP32 (or FP64)."""
    if not x.dtype.is_floating_point:
        raise QuantFormatError(f"Hadamard input must be floating point, got {x.dtype}")
    k = x.shape[-1]
    block = hadamard_block_size(k) if block is None else block
    if k % block:
        raise QuantFormatError(f"Hadamard block {block} does not divide K={k}")
    work = x if x.dtype == torch.float64 else x.to(torch.float32)
    return _rotate_blocks(work, block)


def fold_hadamard_into_weight(w: torch.Tensor, block: int | None = None) -> torch.Tensor:
    """W [N, K] -> W H blockwise (FP64 internally, returned in W's dtype) so that
    ``apply_hadamard(x) @ fold(W).T == x @ W.T``."""
    if w.dim() != 2:
        raise QuantFormatError(f"weight must be 2-D [N, K], got shape {tuple(w.shape)}")
    if not w.dtype.is_floating_point:
        raise QuantFormatError(f"weight must be floating point, got {w.dtype}")
    block = hadamard_block_size(w.shape[1]) if block is None else block
    if w.shape[1] % block:
        raise QuantFormatError(f"Hadamard block {block} does not divide K={w.shape[1]}")
    return _rotate_blocks(w.to(torch.float64), block).to(w.dtype)
