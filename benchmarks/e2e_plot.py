"""Plot a merged end-to-end race JSON (benchmarks/e2e.py --merge): (a) time per step of every
contender (bar: median of the CUDA-event step times; dot: mean, total / steps, which is what
skipped steps lower), (b) test-bed fidelity (PSNR vs the uncompressed model) against speed-up over
diffusers eager (total time), with the PSNR a peer had to reach as a line.

    python benchmarks/e2e_plot.py benchmarks/results/e2e_h100.json --out benchmarks/results/e2e_h100.png

Fidelity of a row: its `testbed_fidelity` (the peers' picked test-bed points; hollow markers for a
point that does not reach the bar); a ditbake row without one takes the run's `required_psnr_db`
(the bar is the ditbake plan's test-bed PSNR); diffusers eager and plain torch.compile are the
uncompressed output itself and sit on the "reference" line at the top. Without matplotlib the
script logs that and writes nothing.
"""
from __future__ import annotations

import argparse
import json
import logging
import math
from pathlib import Path

log = logging.getLogger("e2e_plot")
UNCOMPRESSED = ("diffusers eager", "diffusers torch.compile")


def points(result: dict) -> list[dict]:
    """Per row: name, median and mean ms per step, speed-up over eager (total time), test-bed PSNR
    (inf: the uncompressed output; None: unknown) and whether it reaches the bar."""
    rows = result["rows"]
    eager = rows.get("diffusers eager", {}).get("total_s")
    out = []
    for name, r in rows.items():
        fid = r.get("testbed_fidelity") or {}
        if name in UNCOMPRESSED:
            psnr = math.inf
        elif "psnr_db" in fid:
            psnr = float(fid["psnr_db"])
        elif name.startswith("ditbake") and result.get("required_psnr_db") is not None:
            psnr = float(result["required_psnr_db"])
        else:
            psnr = None
        steps = r.get("steps", result.get("steps"))  # e2e_flux.py keeps the step count once, at the top
        out.append({"name": name, "step_ms_median": r["step_ms_median"], "step_ms_mean": 1e3 * r["total_s"] / steps,
                    "speedup": r.get("speedup_vs_eager_in_call", eager / r["total_s"] if eager else None),
                    "psnr_db": psnr,
                    "reaches_required": fid.get("reaches_required", True)})
    return out


def plot(result: dict, path: str | Path) -> bool:
    """Write the two panels to `path`; False (logged) when matplotlib is absent."""
    try:
        import matplotlib
    except ImportError:
        log.warning("matplotlib is not installed: no plot written (pip install matplotlib)")
        return False
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pts = points(result)
    fig, (bars, scatter) = plt.subplots(1, 2, figsize=(13, 4.8), gridspec_kw={"width_ratios": [1.1, 1]})
    y = range(len(pts))
    colours = ["tab:orange" if p["name"].startswith("ditbake") else "tab:blue" for p in pts]
    bars.barh(list(y), [p["step_ms_median"] for p in pts], color=colours, alpha=0.8, label="median step")
    bars.scatter([p["step_ms_mean"] for p in pts], list(y), color="black", s=14, zorder=3, label="mean step (total / steps)")
    bars.set_yticks(list(y), [p["name"] for p in pts], fontsize=7)
    bars.invert_yaxis()
    forwards = result.get("cfg_forwards_per_step", result.get("forwards_per_step", 2))
    per_step = {1: "one forward", 2: "two CFG forwards"}.get(forwards, f"{forwards} forwards")
    bars.set_xlabel(f"ms per denoising step ({per_step})")
    bars.grid(axis="x", alpha=0.3)
    bars.legend(fontsize=7)

    known = [p for p in pts if p["psnr_db"] is not None and p["speedup"] is not None]
    if all(not math.isfinite(p["psnr_db"]) for p in known):  # a speed-only race (no test bed): speed-ups
        _speedup_panel(scatter, pts, result)
        return _finish(fig, plt, result, path)
    finite = [p["psnr_db"] for p in known if math.isfinite(p["psnr_db"])]
    bar = result.get("required_psnr_db")
    top = max(finite + ([bar] if bar is not None else []), default=30.0) + 6
    for p in known:
        ours = p["name"].startswith("ditbake")
        psnr = p["psnr_db"] if math.isfinite(p["psnr_db"]) else top
        scatter.scatter([p["speedup"]], [psnr], s=50, marker="*" if ours else "o",
                        facecolors=("tab:orange" if ours else "tab:blue") if p["reaches_required"] else "none",
                        edgecolors="tab:orange" if ours else "tab:blue", zorder=3)
        scatter.annotate(p["name"].replace("diffusers ", "").replace(" + torch.compile", " +tc"), (p["speedup"], psnr),
                         fontsize=6, xytext=(4, 3), textcoords="offset points")
    right = scatter.get_xlim()[1]
    scatter.axhline(top, color="grey", lw=0.8, ls=":")
    scatter.text(right, top, "reference (uncompressed) ", fontsize=7, va="top", ha="right", color="grey")
    if bar is not None:
        scatter.axhline(bar, color="tab:red", lw=0.8, ls="--")
        scatter.text(right, bar, f"required {bar:.1f} dB ", fontsize=7, va="top", ha="right", color="tab:red")
    scatter.set_ylim(top=top + 3)
    scatter.set_xlabel("speed-up over diffusers eager (total time)")
    scatter.set_ylabel("test-bed PSNR vs uncompressed (dB)")
    scatter.grid(alpha=0.3)
    return _finish(fig, plt, result, path)


def _speedup_panel(ax, pts: list[dict], result: dict) -> None:
    """Right panel of a race without fidelity: each contender's speed-up over diffusers eager."""
    timed = [p for p in pts if p["speedup"] is not None]
    y = range(len(timed))
    ax.barh(list(y), [p["speedup"] for p in timed], alpha=0.8,
            color=["tab:orange" if p["name"].startswith("ditbake") else "tab:blue" for p in timed])
    for i, p in zip(y, timed):
        ax.text(p["speedup"], i, f" {p['speedup']:.2f}×", va="center", fontsize=7)
    ax.set_yticks(list(y), [p["name"].replace("diffusers ", "").replace(" + torch.compile", " +tc") for p in timed],
                  fontsize=7)
    ax.invert_yaxis()
    ax.axvline(1.0, color="grey", lw=0.8, ls=":")
    ax.set_xlabel("speed-up over diffusers eager (total time)")
    ax.set_title("speed only: fidelity not measured (see the JSON's `fidelity`)", fontsize=8)
    ax.grid(axis="x", alpha=0.3)


def _finish(fig, plt, result: dict, path) -> bool:
    distilled = str(result.get("cfg", "")).startswith("none")  # e2e_flux.py: guidance-distilled, no CFG
    guidance = f"guidance {result.get('guidance')}, no CFG" if distilled else f"CFG {result.get('guidance')}"
    fig.suptitle(f"{result.get('model', 'e2e race')}: {result.get('steps')} steps, {guidance}, "
                 f"{result.get('device', '')}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("result", help="merged e2e JSON (benchmarks/e2e.py --merge)")
    p.add_argument("--out", help="PNG path (default: the JSON's path with .png)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    result = json.loads(Path(args.result).read_text())
    out = args.out or str(Path(args.result).with_suffix(".png"))
    if plot(result, out):
        log.info("wrote %s", out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
