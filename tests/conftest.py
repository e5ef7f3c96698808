"""Shared test configuration: GPU tests skip on machines without CUDA (CI has none)."""
import pytest
import torch


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU; run `make test-gpu` on a GPU machine")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


class CudaLookingTensor(torch.Tensor):
    """A CPU tensor that reports CUDA (`t.as_subclass(CudaLookingTensor)`): which kernel the runtime or
    the head search would pick on a GPU, decided on a machine without one."""
    @property
    def is_cuda(self):
        return True


@pytest.fixture
def rng_seed(request):
    """A fresh seed per test run so inputs are not always the same; printed on failure.
    DITBAKE_TEST_SEED=<seed> replays a failure's inputs."""
    import os
    import random
    seed = int(os.environ.get("DITBAKE_TEST_SEED") or random.randrange(2**31))
    torch.manual_seed(seed)
    request.node.user_properties.append(("rng_seed", seed))
    return seed


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    report = (yield).get_result()
    seeds = [v for k, v in item.user_properties if k == "rng_seed"]
    if report.failed and seeds and call.when == "call":
        report.sections.append(("rng_seed", f"replay with DITBAKE_TEST_SEED={seeds[0]}"))


@pytest.fixture
def uncached_inductor():
    """torch.compile without Inductor's on-disk caches: AOTAutograd's cache keys a graph by its ops'
    names, not by the Python bodies Inductor inlines, so a graph compiled before such a body changed
    would be served as compiled then (a stale pass, or a stale failure)."""
    import torch._inductor.config as inductor_config
    with inductor_config.patch(force_disable_caches=True):
        yield


@pytest.fixture(scope="module")
def one_torch_thread():
    """One intra-op thread for a module (`pytestmark = pytest.mark.usefixtures("one_torch_thread")`),
    restored after it: for tiny tensors, or for results that must not depend on the thread count."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def build_tiny_artifact(tmp_path, name="tiny-wan", steps=4, samplers=None, plan_fn=None, dtype=torch.float32,
                        latent=None, text_len=None, guidance=True, backend="eager", scheduler_config=None, profiles=None):
    """Build a tiny random-weight artifact through the exporter API (fast: no calibration run).

    Returns (artifact_path, adapter)."""
    from ditbake.exporter import build as builder, models
    from ditbake.exporter.adapters import adapter_for
    from ditbake.exporter.planner import plan_from_calibration
    from ditbake.exporter.sampler import SAMPLERS
    from ditbake.runtime.artifact import Profile

    adapter = adapter_for(models.load(name))
    if adapter.architecture == "wan":
        latent = latent or adapter.latent_shape(3, 8, 8)
        text_len = text_len or 8
    else:
        latent = latent or adapter.latent_shape(3, 8, 8)
        text_len = text_len or int(adapter.config.get("max_text_seq_length", 8))
    meta = {"architecture": adapter.architecture, "num_blocks": adapter.num_blocks,
            "linear_layers": list(adapter.linear_layers), "attention_sites": adapter.attention_sites,
            "num_steps": steps, "branches": ["cond", "uncond"] if guidance else ["cond"]}
    plan = (plan_fn or plan_from_calibration)(meta)
    out = builder.build(adapter, plan, tmp_path / name, profiles=profiles or [Profile("p0", tuple(latent), text_len)],
                        samplers=list(samplers or SAMPLERS[adapter.architecture]), dtype=dtype, progress=False,
                        backend=backend, scheduler_config=scheduler_config)
    return out, adapter


def trace_block_io(adapter, x, t, text) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(input, output) of every block, in order, from one diffusers forward through the adapter's hooks."""
    seen = []
    hooks = [m.register_forward_hook(lambda m, a, k, o: seen.append(adapter.block_io(a, k, o)), with_kwargs=True)
             for m in adapter.block_modules()]
    try:
        with torch.no_grad():
            adapter.diffusers_forward(x, t, text)
    finally:
        for h in hooks:
            h.remove()
    return seen
