"""Loading native code (AOTInductor packages, ditbake's C++ ops) into a Python process safely."""
from __future__ import annotations

import ctypes
import functools
import importlib
import logging
import os
import sys
import threading
from pathlib import Path
from typing import Callable, Optional

import torch

log = logging.getLogger(__name__)


@functools.cache
def promote_libstdcxx() -> bool:
    """Put the process's libstdc++ into the global symbol scope before loading native code
    (AOTInductor packages, plugins/csrc extensions: the cuDNN ops crashed the same way in their
    first std::ostream insertion, measured on the H200 image 2026-11-26).

    A compiled package's .so does not list libstdc++ as a dependency and carries its own weak
    copies of inline template statics (std::regex's locale facet ids among them). Python loads
    torch, and libstdc++ with it, RTLD_LOCAL, so when the loader dlopens the package the .so
    binds those statics to its own copies, which libstdc++'s locale never initialised: the
    model constructor's std::regex (parse_device_str) then crashes. Measured on the H100 image
    (torch 2.11, CUDA 13, 2026-11-24): every package, CPU or CUDA, segfaulted in
    aoti_load_package; with libstdc++ preloaded it loaded and ran. Promoting the already loaded
    library to RTLD_GLOBAL has the same effect without an environment variable.
    """
    if not sys.platform.startswith("linux"):
        return False
    for mode in (os.RTLD_NOLOAD | os.RTLD_GLOBAL, os.RTLD_GLOBAL):
        try:
            ctypes.CDLL("libstdc++.so.6", mode=mode)
            return True
        except OSError:
            continue
    log.warning("could not promote libstdc++ to the global symbol scope; AOTInductor packages and C++ ops may crash on load")
    return False


# ditbake's C++ ops that compiled engines may call through the dispatcher: the module whose
# load_native() / unavailable_reason() build and load each, and the extra that brings its headers
# (exporter.engine_aoti records which ops an engine's package names; runtime.engines loads them
# before the package; "cudnn_sdpa" covers both cuDNN ops of one library)
NATIVE_OPS = {"gemm_w8a8_cutlass": ("ditbake.plugins.gemm_w8a8_cutlass", "cutlass"),
              "cudnn_sdpa": ("ditbake.plugins.cudnn_sdpa", "cuda")}


def load_native_op(name: str) -> tuple[bool, str | None]:
    """Build/load the library of one of NATIVE_OPS: (loaded, why not)."""
    module = importlib.import_module(NATIVE_OPS[name][0])
    ok = module.load_native()
    return ok, None if ok else module.unavailable_reason()


def extension_dir() -> Path:
    """Where ditbake's C++ extensions are built and kept (``$DITBAKE_EXT_DIR``, else the user cache)."""
    return Path(os.environ.get("DITBAKE_EXT_DIR", Path.home() / ".cache" / "ditbake" / "ext"))


class NativeLibrary:
    """One of ditbake's C++ extensions, built and loaded at most once per process (thread-safe).

    ``build(verbose)`` returns why this machine cannot have it (missing headers: a sentence naming the
    extra to install) or None after building and loading it; it raises on a compiler, linker or loader
    error, which is reported as ``failed``: the last line of the error. ``reason`` says why ``load()``
    returned False (None when it has not been tried or succeeded)."""

    def __init__(self, build: Callable[[bool], Optional[str]], failed: str, unavailable: str):
        self._build, self._failed, self._unavailable = build, failed, unavailable
        self._lock = threading.Lock()
        self.loaded: Optional[bool] = None
        self.reason: Optional[str] = None

    def load(self, verbose: bool = False) -> bool:
        with self._lock:
            if self.loaded is not None:
                return self.loaded
            self.loaded, self.reason = False, None
            if not torch.cuda.is_available():
                self.reason = "no CUDA device"
                return False
            promote_libstdcxx()  # else an extension's first std::ostream use crashes (see above)
            try:
                self.reason = self._build(verbose)
            except Exception as exc:  # noqa: BLE001 - a compiler, linker or loader error is "unavailable", reported
                cause = f" ({exc.__cause__})" if exc.__cause__ is not None else ""  # load_library hides the dlopen error
                self.reason = f"{self._failed}: {str(exc).splitlines()[-1] if str(exc) else exc!r}{cause}"
                log.warning("%s: %s", self._unavailable, self.reason)
                return False
            self.loaded = self.reason is None
            return self.loaded
