"""Engines whose attention the build gave to cuDNN load ditbake's C++ ops first; a malformed
`attention_kernels` entry is a typed artifact error, and an engine without cuDNN groups needs nothing."""
import pytest

from ditbake.plugins import cudnn_sdpa
from ditbake.runtime import engines
from ditbake.runtime.errors import ArtifactError, BackendError


@pytest.mark.parametrize("bad", [["full/bf16"], {"sig": "cudnn"}, {"sig": {"ms": 1.0}}, {"sig": {"kernel": 3}}, "cudnn"])
def test_malformed_attention_kernels_are_refused(bad):
    with pytest.raises(ArtifactError, match="attention_kernels"):
        engines._load_native_ops({"file": "engines/block-x.pt2", "attention_kernels": bad}, "engine")


def test_no_cudnn_group_loads_nothing(monkeypatch):
    monkeypatch.setattr(cudnn_sdpa, "load_native", lambda: pytest.fail("must not build the extension"))
    engines._load_native_ops({"file": "e.pt2"}, "engine")
    engines._load_native_ops({"file": "e.pt2", "attention_kernels": {"arrow/bf16/4-4/1x2x8x16/bfloat16/text0-0":
                                                                     {"kernel": "triton", "ms": {"triton": 1.0}}}},
                             "engine")


def test_cudnn_group_without_the_extension_is_a_backend_error(monkeypatch):
    monkeypatch.setattr(cudnn_sdpa, "load_native", lambda: False)
    monkeypatch.setattr(cudnn_sdpa, "unavailable_reason", lambda: "no CUDA device")
    entry = {"file": "e.pt2", "attention_kernels": {"full/fp8t/-/1x2x8x16/bfloat16/text0-0": {"kernel": "cudnn", "ms": None}}}
    with pytest.raises(BackendError, match="no CUDA device"):
        engines._load_native_ops(entry, "engine")
