"""Where the CUTLASS GELU epilogue (ditbake::gemm_w8a8_gelu_cutlass) departs from its specification:
the worst elements against fp32 tanh-GELU of the exact pre-activation, beside the plain GEMM's
pre-activation at the same place (is the product wrong, or the GELU?). Writes JSON.

    python benchmarks/diagnose_gelu_epilogue.py --out $OUT/gelu_epilogue_diag.json
"""
from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

import torch
import torch.nn.functional as F

from provenance import stamp

log = logging.getLogger("diagnose_gelu_epilogue")


@torch.no_grad()
def main(argv=None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True)
    args = p.parse_args(argv)
    import ditbake.plugins.gemm_w8a8_cutlass as gc
    from ditbake.plugins.int8 import matmul_8bit_ref, quantize_rows

    assert gc.load_native(), gc.unavailable_reason()
    g = torch.Generator().manual_seed(5)
    result = {"device": torch.cuda.get_device_name(), "cases": {}}
    for m, k, n in ((4096, 1536, 8960), (2077, 4112, 1000)):
        qx, sx = quantize_rows(torch.randn(m, k, generator=g), "int8")
        qw, sw = quantize_rows(torch.randn(n, k, generator=g) / k ** 0.5, "int8")
        bias = torch.randn(n, generator=g).to(torch.bfloat16)
        sx, sw = sx.reshape(-1), sw.reshape(-1)
        dev = [t.cuda() for t in (qx, sx, qw, sw, bias)]
        h, amax = torch.ops.ditbake.gemm_w8a8_gelu_cutlass(*dev, 0)
        plain = torch.ops.ditbake.gemm_w8a8_cutlass(*dev, 0).float().cpu()
        pre = matmul_8bit_ref(qx, sx, qw, sw, bias, torch.float32)
        want = F.gelu(pre, approximate="tanh")
        got = h.float().cpu()
        bound = want.abs() * 2 ** -7 + pre.abs() * 2 ** -11
        ratio = (got - want).abs() / bound
        worst = ratio.flatten().topk(12).indices
        rows = []
        for i in worst.tolist():
            r, c = divmod(i, n)
            rows.append({"row": r, "col": c, "pre_exact": float(pre[r, c]), "pre_plain_kernel": float(plain[r, c]),
                         "gelu_exact": float(want[r, c]), "gelu_kernel": float(got[r, c]), "ratio": float(ratio[r, c])})
            log.info("%s", rows[-1])
        bad = ratio > 1
        result["cases"][f"{m}x{k}x{n}"] = {
            "elements_over_bound": int(bad.sum()), "of": bad.numel(),
            "bad_rows": sorted({int(x) for x in bad.nonzero()[:, 0].tolist()})[:40],
            "bad_cols": sorted({int(x) for x in bad.nonzero()[:, 1].tolist()})[:40],
            "amax_max_rel_err": float(((amax.cpu() - want.abs().amax(-1)).abs() / want.abs().amax(-1)).max()),
            "worst": rows}
        log.info("%s: %d of %d over the bound", f"{m}x{k}x{n}", int(bad.sum()), bad.numel())
    Path(args.out).write_text(json.dumps(stamp(result), indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
