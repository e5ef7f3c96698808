"""Fixes for two Triton 3.6 interpreter defects (TRITON_INTERPRET=1 runs kernels on CPU; used by
the tests and the benchmarks' --smoke mode only, never on the GPU path):

* its FP8 E4M3 rounding drops the carry into the exponent (127.3 -> 64 instead of 128) and rounds
  ties up, so FP8 results differ from the GPU's ``cvt.rn``; conversions to and from E4M3 go
  through torch's (round to nearest even) instead;
* with numpy >= 2.4, ``int()`` of the 1-element arrays it uses for scalars fails, so any loop whose
  bounds come from loaded values raises TypeError; ``__index__`` reads the element instead.
"""
from __future__ import annotations

import contextlib

import numpy as np
import torch


@contextlib.contextmanager
def exact_interpreter():
    """Patch the interpreter for the duration of the block (no-op effects on compiled kernels)."""
    import triton.language as tl
    import triton.runtime.interpreter as interp

    as_torch = {tl.float32: (torch.float32, torch.int32, np.uint32),
                tl.float16: (torch.float16, torch.int16, np.uint16)}
    original_convert, original_patch = interp._convert_float, interp._patch_lang_tensor

    def convert(data, src, dst, rounding_mode):
        if dst == tl.float8e4nv and src in as_torch:
            ftype, _, utype = as_torch[src]
            x = torch.from_numpy(np.frombuffer(data.tobytes(), dtype=utype).copy()).view(ftype)
            return x.to(torch.float8_e4m3fn).view(torch.uint8).numpy().reshape(data.shape)
        if src == tl.float8e4nv and dst in as_torch:
            ftype, itype, utype = as_torch[dst]
            x = torch.from_numpy(np.frombuffer(data.tobytes(), dtype=np.uint8).copy()).view(torch.float8_e4m3fn)
            return x.to(ftype).view(itype).numpy().view(utype).reshape(data.shape)
        return original_convert(data, src, dst, rounding_mode)

    def patch_tensor(tensor, scope):
        original_patch(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))

    interp._convert_float, interp._patch_lang_tensor = convert, patch_tensor
    try:
        yield
    finally:
        interp._convert_float, interp._patch_lang_tensor = original_convert, original_patch
