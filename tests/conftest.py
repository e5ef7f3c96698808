"""Shared test configuration: GPU tests skip on machines without CUDA (CI has none)."""
import pytest
import torch


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU; run `make test-gpu` on a GPU machine")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture
def rng_seed():
    """A fresh seed per test run so inputs are not always the same; printed on failure."""
    import random
    seed = random.randrange(2**31)
    torch.manual_seed(seed)
    return seed
