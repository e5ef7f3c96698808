"""Block Hadamard tests (CPU): orthonormality, folding, block-size fallback."""
import pytest
import torch

from ditbake.plugins.hadamard import (
    apply_hadamard,
    fold_hadamard_into_weight,
    hadamard_block_size,
    hadamard_matrix,
    hadamard_sign_matrix,
)
from ditbake.plugins.nvfp4 import QuantFormatError


@pytest.mark.parametrize("size", [1, 2, 4, 16, 64, 128])
def test_hadamard_is_orthonormal_and_symmetric(size):
    h = hadamard_matrix(size, dtype=torch.float64)
    assert torch.allclose(h @ h.T, torch.eye(size, dtype=torch.float64), atol=1e-14)
    assert torch.equal(h, h.T)
    signs = hadamard_sign_matrix(size)
    assert set(signs.unique().tolist()) <= {-1.0, 1.0}


def test_sylvester_structure():
    h = hadamard_sign_matrix(4)
    assert h.tolist() == [[1, 1, 1, 1], [1, -1, 1, -1], [1, 1, -1, -1], [1, -1, -1, 1]]


@pytest.mark.parametrize("k", [128, 1536, 96])
def test_folded_product_equals_unfolded(k):
    x = torch.randn(5, 3, k, dtype=torch.float64)
    w = torch.randn(24, k, dtype=torch.float64)
    folded = apply_hadamard(x) @ fold_hadamard_into_weight(w).T
    assert torch.allclose(folded, x @ w.T, atol=1e-10)


def test_rotation_preserves_block_norms_and_spreads_outliers():
    x = torch.zeros(1, 256)
    x[0, 3] = 100.0  # one outlier per block
    x[0, 200] = -50.0
    y = apply_hadamard(x)
    blocks = y.reshape(2, 128)
    assert torch.allclose(blocks.norm(dim=1), torch.tensor([100.0, 50.0]))
    assert float(y.abs().max()) < 100.0 / 11  # spread evenly: 100 / sqrt(128) ~ 8.8


def test_block_size_rule():
    assert hadamard_block_size(1536) == 128
    assert hadamard_block_size(8960) == 128
    assert hadamard_block_size(96) == 32  # fallback: largest power of two dividing K
    assert hadamard_block_size(48) == 16
    with pytest.raises(QuantFormatError):
        hadamard_block_size(33)


def test_bad_input_raises_quant_format_error():
    with pytest.raises(QuantFormatError):
        apply_hadamard(torch.ones(2, 128, dtype=torch.int32))
    with pytest.raises(QuantFormatError):
        fold_hadamard_into_weight(torch.randn(2, 3, 128))
    with pytest.raises(QuantFormatError):
        hadamard_matrix(12)
    with pytest.raises(QuantFormatError):
        apply_hadamard(torch.randn(2, 96), block=64)
