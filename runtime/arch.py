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


DEFAULT_BLOCK_KIND = "block"


def block_kind(module: ModuleType, config: dict, index: int) -> str:
    """The kind of block `index` (its code path and weight names): "double" / "single" for Flux,
    "joint" / "joint_pre_only" (the last, context_pre_only block) for SD3, "block" for Wan and
    CogVideoX. Compiled engines exist per (kind, variant): blocks of one kind share an engine."""
    fn = getattr(module, "block_kind", None)
    return str(fn(config, index)) if fn else DEFAULT_BLOCK_KIND


def block_linears(module: ModuleType, config: dict, index: int) -> tuple[str, ...]:
    """The linear layers block `index` has: its kind's (KIND_LINEARS: Flux's double and single
    blocks, SD3's last block), else every one of BLOCK_LINEARS, the plan's list."""
    kinds = getattr(module, "KIND_LINEARS", None)
    return tuple(kinds[block_kind(module, config, index)]) if kinds else tuple(module.BLOCK_LINEARS)


def absent_linears(module: ModuleType, config: dict, num_blocks: int) -> list[tuple[int, str]]:
    """(block, layer) pairs of BLOCK_LINEARS that a block does not have, in block order."""
    out = []
    for b in range(num_blocks):
        have = set(block_linears(module, config, b))
        out.extend((b, name) for name in module.BLOCK_LINEARS if name not in have)
    return out


def block_kinds(module: ModuleType, config: dict, num_blocks: int) -> dict[str, int]:
    """Each block kind with its first block index (the block the exporter traces for it), in block order."""
    kinds: dict[str, int] = {}
    for i in range(num_blocks):
        kinds.setdefault(block_kind(module, config, i), i)
    return kinds
