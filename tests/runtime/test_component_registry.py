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
    import textwrap

    from tests.runtime.test_isolation import FORBIDDEN
    script = textwrap.dedent(f"""
        import sys
        BLOCKED = {FORBIDDEN!r}
        class Blocker:
            def find_spec(self, name, path=None, target=None):
                if any(name == b or name.startswith(b + ".") for b in BLOCKED):
                    raise ImportError(f"blocked import of {{name}}")
        sys.meta_path.insert(0, Blocker())
        import ditbake.runtime.components, ditbake.runtime.tokenizer, tokenizers
        leaked = [m for m in sys.modules if any(m == b or m.startswith(b + ".") for b in BLOCKED)]
        assert not leaked, leaked
        print("OK")
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and proc.stdout.strip() == "OK", proc.stderr[-2000:]
