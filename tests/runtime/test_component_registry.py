"""The component registry: every class the exporter may meet maps to a runtime module with the API."""
import pytest

from ditbake.runtime import components
from ditbake.runtime.errors import DitbakeError


def test_every_class_maps_to_a_module_with_the_api():
    for cls, kind in components.CLASS_KINDS.items():
        assert components.kind_for_class(cls) == kind
        if kind in components.TEXT_ENCODERS:
            assert callable(components.TEXT_ENCODERS[kind].encode)
        else:
            module = components.VAE_DECODERS[kind]
            for name in ("decode", "latent_channels", "scale_factors"):
                assert callable(getattr(module, name)), f"{module.__name__}.{name}"
    assert set(components.TEXT_ENCODERS) | set(components.VAE_DECODERS) == set(components.CLASS_KINDS.values())


@pytest.mark.parametrize("name", ["AutoencoderKLLTXVideo", "", "CLIPVisionModel"])
def test_unknown_class_is_a_typed_error(name):
    with pytest.raises(components.UnsupportedComponentError, match="not supported") as info:
        components.kind_for_class(name)
    assert isinstance(info.value, DitbakeError) and info.value.exit_code != 1


def test_components_import_without_the_exporter_world():
    """The component modules and the tokenizer load with diffusers/transformers blocked (as test_isolation)."""
    import subprocess
    import sys

    from tests.runtime.test_isolation import blocked_script
    script = blocked_script("""
        import ditbake.runtime.components, ditbake.runtime.tokenizer, tokenizers
    """) + 'print("OK")\n'
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and proc.stdout.strip() == "OK", proc.stderr[-2000:]
