"""Typed, one-line user-facing errors. Each names what is wrong and how to fix it.

The CLI maps every subclass of DitbakeError to a non-zero exit code (see EXIT_CODES).
"""


class DitbakeError(Exception):
    """Base of all user-facing ditbake errors."""

    exit_code = 1


class ArtifactError(DitbakeError):
    """The artifact is missing, malformed, of an unknown version, or fails its hash check."""

    exit_code = 3


class PlanError(DitbakeError):
    """A plan does not validate against the schema or does not fit the model."""

    exit_code = 4


class InputError(DitbakeError):
    """A request's tensors have the wrong shape, dtype or contain NaN/Inf."""

    exit_code = 5


class BackendError(DitbakeError):
    """The requested backend, precision or engine cannot run on this machine."""

    exit_code = 6


class UnsupportedModelError(DitbakeError):
    """The model class has no adapter."""

    exit_code = 7


class OutputError(DitbakeError):
    """An output path is refused (it holds something this tool did not make) or cannot be written."""

    exit_code = 11


class ResourceError(DitbakeError):
    """The machine ran out of something the command needs: disk space, memory, file handles."""

    exit_code = 12


class NumericsError(DitbakeError):
    """A generation became non-finite (NaN/Inf) part way through."""

    exit_code = 13


class ParallelError(DitbakeError):
    """A multi-GPU request that cannot run as asked (launch, layout, backend, model)."""

    exit_code = 14
