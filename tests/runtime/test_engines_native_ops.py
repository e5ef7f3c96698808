"""Engines that call ditbake's C++ ops load them first: the build reads which ones from the package
itself (either spelling, across read chunks); the runtime loads those and, for engines whose attention
the build gave to cuDNN, the cuDNN ops; a malformed `native_ops` or `attention_kernels` entry is a typed
artifact error, an op that cannot load here a backend error, and an engine that names none needs nothing."""
import zipfile

import pytest

from ditbake.exporter.engine_aoti import native_ops_named
from ditbake.plugins import cudnn_sdpa, gemm_w8a8_cutlass
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


def _package(path, members):
    with zipfile.ZipFile(path, "w") as z:
        for name, data in members.items():
            z.writestr(name, data)
    return path


def test_package_names_are_found_in_either_spelling_and_across_chunks(tmp_path, monkeypatch):
    assert native_ops_named(_package(tmp_path / "none.pt2", {"a.cpp": b"aoti_torch_cuda_mm(...)"})) == []
    found = _package(tmp_path / "wrapper.pt2", {"data/x.json": b'{"target": "ditbake.gemm_w8a8_cutlass.default"}'})
    assert native_ops_named(found) == ["gemm_w8a8_cutlass"]
    # a name split by the reader's chunk boundary is still found
    monkeypatch.setattr(zipfile.ZipExtFile, "read", lambda self, n=-1, _r=zipfile.ZipExtFile.read: _r(self, min(n, 7)))
    split = _package(tmp_path / "split.pt2", {"w.cpp": b"x" * 5 + b'call("ditbake::gemm_w8a8_cutlass")'})
    assert native_ops_named(split) == ["gemm_w8a8_cutlass"]


@pytest.mark.parametrize("ops", ["gemm_w8a8_cutlass", [1], ["not_an_op"], {"gemm_w8a8_cutlass": 1}])
def test_malformed_native_ops_are_refused(ops):
    with pytest.raises(ArtifactError):
        engines._load_native_ops({"file": "engines/block-x.pt2", "native_ops": ops}, "engine")


def test_an_op_that_cannot_load_is_a_backend_error(monkeypatch):
    monkeypatch.setattr(gemm_w8a8_cutlass._NATIVE, "loaded", False)
    monkeypatch.setattr(gemm_w8a8_cutlass._NATIVE, "reason", "no CUDA device")
    with pytest.raises(BackendError, match="no CUDA device"):
        engines._load_native_ops({"file": "engines/block-x.pt2", "native_ops": ["gemm_w8a8_cutlass"]}, "engine")
    engines._load_native_ops({"file": "engines/block-x.pt2"}, "engine")  # none named: nothing to load
