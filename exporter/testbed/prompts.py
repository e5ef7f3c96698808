"""Free-text prompts → the prompt-embedding file that `ditbake calibrate/run --prompts` read.

    python -m ditbake.exporter.testbed.prompts "a large red circle moving slowly right on a black background" \
        --out out/demo/prompts.safetensors

Writes `embeds` [N, 16, 384] (MiniLM last hidden state, rows past the prompt zeroed) and
`negative` [N, 16, 384] (the empty prompt's embedding, the test-bed models' unconditional input).
"""
from __future__ import annotations

import argparse
import logging
from pathlib import Path

from ditbake.exporter.testbed.models import TEXT_LEN

log = logging.getLogger("ditbake.testbed")


def write_prompt_embeds(prompts: list[str], out: str | Path, max_length: int = TEXT_LEN) -> Path:
    from safetensors.torch import save_file  # noqa: PLC0415

    from ditbake.runtime.text_encoder import TextEncoder  # noqa: PLC0415

    encoder = TextEncoder.load(max_length=max_length)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    save_file({"embeds": encoder.encode(prompts).contiguous(),
               "negative": encoder.encode([""] * len(prompts)).contiguous()}, str(out))
    log.info("wrote %s (%d prompts, %d tokens)", out, len(prompts), max_length)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ditbake.exporter.testbed.prompts")
    parser.add_argument("prompts", nargs="+", help="one or more prompts")
    parser.add_argument("--out", required=True)
    parser.add_argument("--max-length", type=int, default=TEXT_LEN)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    write_prompt_embeds(args.prompts, args.out, args.max_length)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
