"""benchmarks/forward_fidelity.py end to end on the CPU at a reduced shape of the 16k bed (2 frames of
16×16 px = 128 tokens, 2 steps, one held-out caption, one seed): the rows `--only` selects are scored
against the bf16 reference with the caption cache the GPU run uses (`--embeds`), and the JSON carries
what the GPU phase (`bash benchmarks/gpu_forward.sh fidelity`) reports. The kernels' CPU references
run here; the GPU numbers come from that phase."""
import json
import math
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "benchmarks"))  # the scripts import their siblings as top-level modules
BED16K = ROOT / "artifacts" / "testbed-wan16k"

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _cache(path: Path, spec, n: int, train: int = 0) -> None:
    """A caption cache as prompt_cache.py writes it, with seeded random rows: the script must take its
    embeddings from the file (the GPU machine has no encoder), whatever they are."""
    import prompt_cache

    gen = torch.Generator().manual_seed(3)
    captions = (prompt_cache.held_out_captions(spec, n) + [""]
                + prompt_cache.train_captions(spec.kind, spec.held_out_rule, train))
    prompt_cache.save(path, {c: torch.randn(prompt_cache.TEXT_LEN, 384, generator=gen) for c in captions})


def test_smoke_rows_against_the_bf16_reference(tmp_path):
    if not (BED16K / "testbed.json").is_file():
        pytest.skip("artifacts/testbed-wan16k is not present")
    import forward_fidelity
    from ditbake.exporter.testbed.models import data_spec_of

    spec = data_spec_of(BED16K)
    _cache(tmp_path / "embeds.safetensors", spec, 1)
    out = tmp_path / "ff.json"
    only = r"^\(a\) linears fp8$|^\(b\) \+ attention int8"
    assert forward_fidelity.main(["--model", str(BED16K), "--embeds", str(tmp_path / "embeds.safetensors"),
                                  "--frames", "2", "--size", "16", "--steps", "2", "--prompts", "1", "--seeds", "1234",
                                  "--only", only, "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["complete"] and result["held_out_rule"] == "v2" and result["provenance"]["commit"]
    assert result["latent_shape"] == [3, 2, 16, 16] and result["tokens"] == 2 * 8 * 8
    assert "16-bit" in result["what"] and "bfloat16" in result["reference"]
    rows = result["rows"]
    assert list(rows) == ["(a) linears fp8", "(b) + attention int8 (Triton)"]  # --only, in the race's order
    for name, row in rows.items():
        assert "error" not in row, row
        # inf would mean the 8-bit path never ran (output identical to the reference); below 20 dB a
        # broken quantizer (measured ≈ 32 / 31 dB at this shape, FP8 E4M3 keeping 3 mantissa bits)
        assert math.isfinite(row["psnr_db"]) and 20 < row["psnr_db"] < 60, (name, row)
        assert 0.5 < row["ssim"] <= 1 and row["ssim_min"] == row["ssim"]  # one sample: min is the mean
        assert row["avg_activation_bits"] == 8 and row["attention_flops_fraction"] == 1
    assert rows["(a) linears fp8"]["psnr_db"] != rows["(b) + attention int8 (Triton)"]["psnr_db"]  # attention ran 8-bit


def test_nvfp4_weight_storage_rows(tmp_path):
    """Each row also scored with the 8-bit layers stored in NVFP4 (rounded to nearest, and by GPTQ on a
    training caption): smaller files, and the 4-bit weights cost fidelity the 8-bit ones do not."""
    if not (BED16K / "testbed.json").is_file():
        pytest.skip("artifacts/testbed-wan16k is not present")
    import forward_fidelity
    from ditbake.exporter.testbed.models import data_spec_of

    _cache(tmp_path / "embeds.safetensors", data_spec_of(BED16K), 1, train=1)
    out = tmp_path / "ff.json"
    assert forward_fidelity.main(["--model", str(BED16K), "--embeds", str(tmp_path / "embeds.safetensors"),
                                  "--frames", "2", "--size", "16", "--steps", "2", "--prompts", "1", "--seeds", "1234",
                                  "--only", r"^\(a8\) linears int8$", "--weights", "8bit,nvfp4,nvfp4-gptq",
                                  "--gptq-prompts", "1", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    rows = result["rows"]
    base = "(a8) linears int8"
    assert list(rows) == [base, f"{base} [weights nvfp4]", f"{base} [weights nvfp4-gptq]"]
    assert result["weight_storages"] == ["8bit", "nvfp4", "nvfp4-gptq"]
    for name, row in rows.items():
        assert "error" not in row, row
        assert row["weight_storage"] == (name.partition("[weights ")[2].rstrip("]") or "8bit")
    # the bed's block linears are 87 % of its parameters: 4.5 instead of 8 bits per weight shrinks the
    # float32-built file by well over 10 %
    assert rows[f"{base} [weights nvfp4]"]["weight_file_bytes"] < 0.9 * rows[base]["weight_file_bytes"]
    assert rows[f"{base} [weights nvfp4-gptq]"]["weight_file_bytes"] == rows[f"{base} [weights nvfp4]"]["weight_file_bytes"]
    # NVFP4's ~10 % weight error against INT8's ~0.3 %: far lower PSNR, whatever the rounding
    for w in ("nvfp4", "nvfp4-gptq"):
        assert rows[f"{base} [weights {w}]"]["psnr_db"] < rows[base]["psnr_db"] - 3


def test_bad_arguments_are_refused(tmp_path):
    import forward_fidelity

    for argv in (["--seeds", "1,x"], ["--seeds", ","], ["--prompts", "0"], ["--dtype", "float16"],
                 ["--weights", "int4"], ["--weights", ","], ["--gptq-prompts", "0"]):
        with pytest.raises(SystemExit) as e:
            forward_fidelity.parse_args([*argv, "--out", str(tmp_path / "x.json")])
        assert e.value.code == 2, argv
