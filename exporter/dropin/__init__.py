"""`ditbake.diffusers`: run a compiled artifact inside the user's own diffusers pipeline.

    import ditbake.diffusers
    ditbake.diffusers.replace_transformer(pipe, "artifacts/built/wan")   # or load_transformer(...)
    video = pipe(prompt, num_inference_steps=20).frames
    pipe.transformer.report.skip_fraction
"""
from ditbake.exporter.dropin.transformer import CompiledTransformer, DropInError, load_transformer, replace_transformer

__all__ = ["CompiledTransformer", "DropInError", "load_transformer", "replace_transformer"]
