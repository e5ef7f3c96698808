"""Checks the CLI makes on its arguments before any work, and the mapping of operating-system
failures to typed errors (an exit code that says what happened, never a traceback with 1).

`check_args`: the command's `--out` may be replaced (runtime/outputs.py: absent, an earlier
ditbake output of its kind, or `--force`; never the working directory or an input), seeds fit
a 64-bit generator, counts are positive, guidance is finite, the device exists.
"""
from __future__ import annotations

import errno
import math
import os

from ditbake.runtime.devices import resolve_device
from ditbake.runtime.errors import DitbakeError, InputError, OutputError, ResourceError
from ditbake.runtime.outputs import check_output

# command → what its --out holds
OUTPUT_KINDS = {"calibrate": "calibration", "plan": "plan", "guidance": "plan", "build": "artifact", "unpack": "artifact",
                "package": "package", "run": "run", "eval": "eval"}
INPUT_ARGS = ("model", "plan", "calibration", "prompts", "artifact", "package", "reference")
SEED_ARGS = ("seed", "weights_seed")
COUNT_ARGS = ("steps", "num_prompts", "num_seeds", "frames", "height", "width", "text_len",
              "precision_max_tokens", "gptq_max_tokens", "tdc_max_run", "count")
MAX_GUIDANCE = 100.0  # far above any model's useful scale (1-15); beyond it the latents overflow


def check_args(args) -> None:
    for name in SEED_ARGS:
        value = getattr(args, name, None)
        if value is not None and not 0 <= value < 2**63:
            raise InputError(f"--{name.replace('_', '-')} {value} is outside [0, 2^63); pass a smaller seed")
    for name in COUNT_ARGS:
        value = getattr(args, name, None)
        if value is not None and not 1 <= value <= 1 << 20:
            raise InputError(f"--{name.replace('_', '-')} {value} must be a positive count (at most 2^20)")
    cache_gb = getattr(args, "precision_weight_cache_gb", None)
    if cache_gb is not None and not (math.isfinite(cache_gb) and 0 <= cache_gb <= 1 << 20):
        raise InputError(f"--precision-weight-cache-gb {cache_gb} must be a number of GB in [0, 2^20]")
    guidance = getattr(args, "guidance", None)
    if guidance is not None and not (math.isfinite(guidance) and abs(guidance) <= MAX_GUIDANCE):
        raise InputError(f"--guidance {guidance} must be a finite number within ±{MAX_GUIDANCE:g} (typical: 1-15)")
    if isinstance(getattr(args, "device", None), str):
        resolve_device(args.device)
    for name in INPUT_ARGS:  # a FIFO or device given as an input would hang or flood its reader
        value = getattr(args, name, None)
        if isinstance(value, str) and os.path.exists(value) and not (os.path.isfile(value) or os.path.isdir(value)):
            raise InputError(f"--{name} {value} is not a regular file or directory (a FIFO, device or socket); "
                             "refusing to read it")
    kind = OUTPUT_KINDS.get(args.command)
    if kind is not None and getattr(args, "out", None) is not None:
        check_output(args.out, kind, getattr(args, "force", False),
                     inputs=[getattr(args, a) for a in INPUT_ARGS if isinstance(getattr(args, a, None), str)])


def typed_os_error(exc: OSError) -> DitbakeError:
    """A typed error for an operating-system failure, naming the path and the fix."""
    where = f" ({exc.filename})" if exc.filename else ""
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return ResourceError(f"out of disk space{where}; free space or write elsewhere. Nothing was replaced")
    if exc.errno in (errno.EMFILE, errno.ENFILE, errno.ENOMEM):
        return ResourceError(f"{exc.strerror}{where}; raise the limit or free resources")
    if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return OutputError(f"permission denied{where}: {exc.strerror}; choose a path you may write")
    if exc.errno == errno.ENAMETOOLONG:
        return InputError(f"a path is too long{where}; use a shorter name")
    return OutputError(f"{exc.strerror or type(exc).__name__}{where}; check the path")
