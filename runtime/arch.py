"""Registry of the architectures the runtime implements, by the name stored in the artifact."""
from __future__ import annotations

from types import ModuleType

from ditbake.runtime import arch_cogvideox, arch_flux, arch_sd3, arch_wan
from ditbake.runtime.errors import ArtifactError

ARCHITECTURES: dict[str, ModuleType] = {m.NAME: m for m in (arch_wan, arch_cogvideox, arch_sd3, arch_flux)}


def get(name: str) -> ModuleType:
    try:
        return ARCHITECTURES[name]
    except KeyError:
        raise ArtifactError(f"architecture {name!r} is not implemented by this runtime "
                            f"(it runs {sorted(ARCHITECTURES)}); upgrade ditbake") from None


def extra_inputs(module: ModuleType, config: dict) -> tuple[str, ...]:
    """Prologue inputs beyond (latents, timestep, text): ("pooled",) for SD3, ("pooled", "guidance")
    for guidance-distilled Flux, () for Wan and CogVideoX. Engines take them positionally after text."""
    fn = getattr(module, "extra_inputs", None)
    return tuple(fn(config)) if fn else ()
