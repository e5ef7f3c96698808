"""runtime/validate.py: which linear-layer lists a plan may carry for an architecture whose block
kinds have different linears (Flux, SD3)."""
import pytest

from ditbake.exporter import models
from ditbake.runtime import arch as runtime_arch, arch_flux, arch_sd3
from ditbake.runtime.errors import PlanError
from ditbake.runtime.plan import Plan
from ditbake.runtime.validate import _check_plan_fits


def _plan(arch, config, layers):
    n = arch.num_blocks(config)
    heads = {site: arch.heads(config) for site in arch.COMPRESSIBLE_ATTENTION}
    meta = {"architecture": arch.NAME, "num_blocks": n, "linear_layers": list(layers), "attention_sites": heads,
            "num_steps": 2, "branches": ["cond"]}
    from ditbake.exporter.planner import plan_from_calibration

    plan = plan_from_calibration(meta)
    assert isinstance(plan, Plan)
    return plan


@pytest.mark.parametrize("arch,model", [(arch_flux, "tiny-flux"), (arch_sd3, "tiny-sd3")])
def test_union_and_older_subsets_load_others_do_not(arch, model):
    config = models.load(model).config
    _check_plan_fits(arch, config, _plan(arch, config, arch.BLOCK_LINEARS))  # today's plans
    common = [n for n in arch.BLOCK_LINEARS
              if all(n in runtime_arch.block_linears(arch, config, b) for b in range(arch.num_blocks(config)))]
    assert 0 < len(common) < len(arch.BLOCK_LINEARS)
    _check_plan_fits(arch, config, _plan(arch, config, common))  # artifacts built before the union
    for bad in (list(arch.BLOCK_LINEARS) + ["attn.to_z"], ["ffn.net.2"]):
        with pytest.raises(PlanError, match="linear layers"):
            _check_plan_fits(arch, config, _plan(arch, config, bad))


def test_each_block_kind_lists_what_its_code_runs():
    config = models.load("tiny-flux").config
    kinds = {runtime_arch.block_kind(arch_flux, config, b): runtime_arch.block_linears(arch_flux, config, b)
             for b in range(arch_flux.num_blocks(config))}
    assert kinds == {"double": arch_flux.DOUBLE_BLOCK_LINEARS, "single": arch_flux.SINGLE_BLOCK_LINEARS}
    assert set(arch_flux.BLOCK_LINEARS) == set().union(*kinds.values())
    assert runtime_arch.absent_linears(arch_flux, config, 4) == [
        (b, n) for b in range(4) for n in arch_flux.BLOCK_LINEARS if n not in kinds["double" if b < 2 else "single"]]
