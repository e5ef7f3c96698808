"""ditbake runtime: loads a baked artifact and runs the denoising loop. Depends on torch and
safetensors only; never imports the exporter, diffusers, onnx or modelopt."""
from ditbake.runtime.errors import (ArtifactError, BackendError, DitbakeError, InputError, NumericsError,
                                    OutputError, PlanError, ResourceError, UnsupportedModelError)
from ditbake.runtime.session import GenerationReport, GenerationResult, Session, load

__all__ = ["ArtifactError", "BackendError", "DitbakeError", "GenerationReport", "GenerationResult", "InputError",
           "NumericsError", "OutputError", "PlanError", "ResourceError", "Session", "UnsupportedModelError", "load"]
