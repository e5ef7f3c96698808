"""TensorRT engines (the `tensorrt` backend): deserialised once, executed with TensorRT 10's
``execute_async_v3`` on torch's current CUDA stream, tensors bound by address.

Same interface and calling convention as AotiEngines (weights passed positionally on every
call, by the names the manifest lists). NVFP4 weights are passed as their uint8 bytes: the
engine's FP4 input [N, K] is the same memory. UNTESTED: TensorRT cannot be installed on the
project's machines; written to the TensorRT 10.x Python API documentation.
"""
from __future__ import annotations

import logging
from pathlib import Path

import torch

from ditbake.runtime.engines import AotiEngines, engine_files
from ditbake.runtime.errors import BackendError

log = logging.getLogger(__name__)


def _torch_dtype(trt, dtype) -> torch.dtype:
    table = {trt.float32: torch.float32, trt.float16: torch.float16, trt.bfloat16: torch.bfloat16,
             trt.int32: torch.int32, trt.int64: torch.int64, trt.int8: torch.int8, trt.uint8: torch.uint8,
             trt.bool: torch.bool}
    try:
        return table[dtype]
    except KeyError:
        raise BackendError(f"engine output type {dtype} has no torch equivalent; rebuild the artifact") from None


class _Engine:
    """One deserialised engine with its execution context; called like an AOTInductor package."""

    def __init__(self, trt, runtime, path: Path, input_names: list[str], output_names: list[str]):
        self.trt = trt
        self.engine = runtime.deserialize_cuda_engine(path.read_bytes())
        if self.engine is None:
            raise BackendError(f"TensorRT cannot deserialise {path.name}; rebuild the artifact with this TensorRT "
                               f"({trt.__version__}) on this GPU")
        self.context = self.engine.create_execution_context()
        names = {self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)}
        # TensorRT drops inputs the network does not use (a layer's bf16 weight in a variant that
        # reads its NVFP4 copy): those are skipped, by position, when binding.
        self.bind = [(i, n) for i, n in enumerate(input_names) if n in names]
        self.outputs = output_names

    def __call__(self, *args: torch.Tensor) -> list[torch.Tensor]:
        keep = []
        for i, name in self.bind:
            t = args[i].contiguous()
            keep.append(t)
            if -1 in tuple(self.engine.get_tensor_shape(name)):
                self.context.set_input_shape(name, tuple(t.shape))
            self.context.set_tensor_address(name, t.data_ptr())
        outs = []
        for name in self.outputs:
            out = torch.empty(tuple(self.context.get_tensor_shape(name)),
                              dtype=_torch_dtype(self.trt, self.engine.get_tensor_dtype(name)), device="cuda")
            self.context.set_tensor_address(name, out.data_ptr())
            outs.append(out)
        if not self.context.execute_async_v3(torch.cuda.current_stream().cuda_stream):
            raise BackendError("TensorRT execution failed; see the TensorRT log, rebuild the artifact on this machine")
        return outs


class TrtEngines(AotiEngines):
    """Prologue / block / epilogue exactly as AotiEngines, over TensorRT engines."""

    name = "tensorrt"

    def _load(self, artifact_path: Path, entries: list[dict]) -> None:
        if any(not e.get("file") for e in entries):
            raise BackendError("this artifact holds ONNX graphs only (built with --onnx-only where TensorRT was "
                               "missing); rebuild it with `ditbake build --backend tensorrt` on a CUDA machine with "
                               "tensorrt installed")
        if self.device.type != "cuda":
            raise BackendError("TensorRT engines run on CUDA; load with device='cuda'")
        try:
            import tensorrt as trt  # noqa: PLC0415
        except ImportError as exc:
            raise BackendError(f"the tensorrt backend needs the `tensorrt` package ({exc}); install it, or load an "
                               "artifact built with --backend aoti or eager") from exc
        import ditbake.plugins.trt_attention_8bit  # noqa: F401, PLC0415 - registers the plugins the engines use
        import ditbake.plugins.trt_plugins  # noqa: F401, PLC0415

        files = engine_files(artifact_path, entries)  # inside the artifact, indexed, hash-checked
        capability = list(torch.cuda.get_device_capability(self.device))
        runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
        for e in entries:
            built = e.get("built_for") or {}
            if built.get("tensorrt") != trt.__version__ or built.get("capability") != capability:
                raise BackendError(f"engine {e['file']} was built with TensorRT {built.get('tensorrt')} for sm "
                                   f"{built.get('capability')}, not TensorRT {trt.__version__} on sm {capability}; "
                                   "rebuild the artifact on this machine")
            self.packages[e["key"]] = _Engine(trt, runtime, files[e["file"]], e["inputs"], e["outputs"])
        log.info("loaded %d TensorRT engines", len(self.packages))
