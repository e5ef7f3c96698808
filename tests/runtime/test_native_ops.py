"""Engines that call ditbake's C++ ops: the build reads which ones from the package itself, and the
runtime refuses a manifest whose list is malformed or names an unknown op, and loads the named ops
(a typed BackendError where one cannot be built here) before the package."""
import zipfile

import pytest

from ditbake.exporter.engine_aoti import native_ops_named
from ditbake.plugins import gemm_w8a8_cutlass
from ditbake.runtime import engines
from ditbake.runtime.errors import ArtifactError, BackendError


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
