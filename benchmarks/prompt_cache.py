"""Caption embeddings computed where the text encoder is (this CPU machine) and carried to the GPU
machine, which has no MiniLM weights. One safetensors file: "embeds" [N, 16, 384] float32, the
captions in the metadata (JSON list, same order). The benchmarks look captions up by text, so one
file serves every script and every count of prompts it was written for.

    python benchmarks/prompt_cache.py --model artifacts/testbed-wan16k --out .carry/fid16k/embeds.safetensors

writes every held-out caption of the bed's rule, the training captions the scripts calibrate on
(`train_captions`, and heads.py's spread for 1-8 prompts) and the empty prompt.
"""
from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

import torch

log = logging.getLogger("prompt_cache")
TEXT_LEN = 16


def held_out_captions(spec, n: int) -> list[str]:
    """`n` held-out captions of the bed (its kind and held-out rule), spread over the held-out set."""
    from ditbake.exporter.evaluate import default_prompts  # noqa: PLC0415

    return default_prompts(n, spec)


def train_captions(kind: str, rule: str, n: int) -> list[str]:
    """`n` training captions (not held out under `rule`), every 97th: calibration data as tdc_peers.py."""
    from ditbake.exporter.testbed import data  # noqa: PLC0415

    train = [c for i, c in enumerate(data.all_captions(kind)) if not data.is_held_out(i, rule)]
    return [train[(k * 97) % len(train)] for k in range(n)]


def load(path: str | Path) -> dict[str, torch.Tensor]:
    """caption → [TEXT_LEN, D] from a file `save` wrote."""
    from safetensors import safe_open  # noqa: PLC0415

    with safe_open(str(path), framework="pt") as f:
        captions = json.loads(f.metadata()["captions"])
        embeds = f.get_tensor("embeds")
    return dict(zip(captions, embeds))


def save(path: str | Path, table: dict[str, torch.Tensor]) -> None:
    from safetensors.torch import save_file  # noqa: PLC0415

    Path(path).parent.mkdir(parents=True, exist_ok=True)
    captions = list(table)
    save_file({"embeds": torch.stack([table[c].float() for c in captions]).contiguous()}, str(path),
              metadata={"captions": json.dumps(captions)})


class Embedder:
    """Embeddings by caption: from the cache when it has them, else from the text encoder (absent on
    the GPU machine: a caption missing there is an error naming the fix)."""

    def __init__(self, cache: str | Path | None = None):
        self.table = load(cache) if cache and Path(cache).is_file() else {}
        self.cache = cache

    def __call__(self, texts: list[str]) -> torch.Tensor:
        missing = [t for t in texts if t not in self.table]
        if missing:
            try:
                from ditbake.runtime.text_encoder import TextEncoder  # noqa: PLC0415

                encoded = TextEncoder.load(max_length=TEXT_LEN).encode(missing)
            except Exception as e:  # noqa: BLE001 - the encoder package or weights are absent
                raise SystemExit(f"{len(missing)} caption(s) not in the embedding cache {self.cache} (first: "
                                 f"{missing[0]!r}) and no text encoder here ({e}); rebuild the cache with "
                                 "benchmarks/prompt_cache.py on a machine that has it") from None
            self.table.update(zip(missing, encoded))
        return torch.stack([self.table[t] for t in texts])


def captions_for(model: str, max_prompts: int = 8, max_calibration: int = 16) -> list[str]:
    """Every caption the fidelity benchmarks may ask for on `model`'s bed."""
    import heads  # noqa: PLC0415 - benchmarks/ is this script's directory

    from ditbake.exporter.testbed import data  # noqa: PLC0415
    from ditbake.exporter.testbed.models import data_spec_of  # noqa: PLC0415

    spec = data_spec_of(model)
    held = data.held_out_ids(spec.kind, spec.held_out_rule)
    out = [data.caption_from_attributes(spec.kind, data.attributes_of(spec.kind, i)) for i in held]
    out += train_captions(spec.kind, spec.held_out_rule, max_calibration)
    for n in range(1, max_prompts + 1):
        out += heads.captions(spec.kind, False, n, spec.held_out_rule) + heads.captions(spec.kind, True, n,
                                                                                     spec.held_out_rule)
    return list(dict.fromkeys(out + [""]))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="artifacts/testbed-wan16k")
    p.add_argument("--out", required=True)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO)
    captions = captions_for(args.model)
    embed = Embedder()
    table = dict(zip(captions, embed(captions)))
    save(args.out, table)
    log.info("wrote %s: %d captions (%.1f MB)", args.out, len(table), Path(args.out).stat().st_size / 1e6)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
