"""Automatic prompt adherence of a test-bed video model: read each attribute back from the frames.

The procedural data (`data.py`) is one flat-coloured object on a background with a soft linear
gradient, so every caption attribute can be measured from pixels with the generator's own rules:

- background: a plane fitted per channel to the pixels far from the object, read at the image
  centre (where the gradient is 1), nearest `BACKGROUNDS` entry;
- object: per pixel, the coverage α of the object colour over that background (projection of
  pixel − background on colour − background), so anti-aliased edges count fractionally; the
  largest connected blob of α > ½ (plus its one-pixel rim) is the object;
- colour: nearest `COLOURS` entry (shade-scaled, as the renderer shades it 0.9–1.1) of the median
  object colour over frames;
- shape: soft IoU of the coverage with the renderer's own circle / square / triangle
  (`data._signed_distance`) of the same area at the same centroid, summed over frames;
- size: radius from the area for the measured shape, median over frames, vs the midpoint of
  `SIZES`;
- direction and speed: a least-squares line through the centroid track; the dominant axis and
  its sign give the direction, the slope the speed vs the midpoint of the spec's (slowly,
  quickly) table; slower than half of "slowly" is 'static' (direction and speed wrong);
- coherence: the fraction of frames holding exactly one object (one blob of α > ½ bigger than a
  tenth of the largest).

A frame whose strongest pixels differ from the background by less than `MIN_CONTRAST` holds no
object; a clip with no object in any frame gets every object attribute wrong.

    python -m ditbake.exporter.testbed.adherence CLIPS.safetensors --spec-from MODEL_DIR --out scores.json
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import torch

from ditbake.exporter.testbed import data

ATTRIBUTES = ("shape", "colour", "size", "direction", "speed", "background")
MIN_CONTRAST = 0.15  # [0, 1] RGB distance; the closest object / background pair of the palette is ~0.4 apart
STATIC_FRACTION = 0.5  # slower than this fraction of "slowly" counts as not moving
# object area per radius² for each shape of `data._signed_distance`: circle π r², square (1.7 r)²,
# equilateral triangle of inradius r / 2: 3√3 (r / 2)²
AREA_PER_R2 = {"circle": math.pi, "square": 1.7 ** 2, "triangle": 3 * math.sqrt(3) / 4}


class AdherenceError(data.DataError):
    """Clips handed to the adherence score are malformed (rank, channels, empty, mismatched captions)."""


@dataclass
class FrameReading:
    """What one frame shows; `found` False when no object stands out of the background."""

    found: bool
    background: tuple[float, float, float]
    colour: tuple[float, float, float] = (0.0, 0.0, 0.0)
    area: float = 0.0  # image-side² units
    centroid: tuple[float, float] = (0.0, 0.0)  # image-side units, x right, y down
    shape_iou: dict[str, float] = field(default_factory=dict)
    objects: int = 0  # connected blobs


@dataclass
class ClipScore:
    caption_id: int
    expected: dict[str, str]
    predicted: dict[str, str]
    correct: dict[str, bool]
    all_correct: bool
    coherence: float  # fraction of frames with exactly one object
    frames_with_object: int
    radius: float  # image-side units, median over frames
    velocity: tuple[float, float]  # image sides per frame (x, y) of the fitted line
    shape_iou: dict[str, float]  # mean over frames


def to_unit(clip: torch.Tensor) -> torch.Tensor:
    """[3, F, H, W] uint8 (0..255) or float in [-1, 1] → float32 in [0, 1]; typed errors otherwise."""
    if not isinstance(clip, torch.Tensor):
        raise AdherenceError(f"a clip must be a tensor, got {type(clip).__name__}")
    if clip.ndim != 4:
        raise AdherenceError(f"a clip must be [3, F, H, W], got rank {clip.ndim} {tuple(clip.shape)}")
    if clip.shape[0] != 3:
        raise AdherenceError(f"a clip must have 3 (RGB) channels first, got {clip.shape[0]} in {tuple(clip.shape)}")
    if clip.numel() == 0 or min(clip.shape[2:]) < 8:
        raise AdherenceError(f"clip {tuple(clip.shape)} is empty or smaller than 8 pixels a side")
    if clip.dtype == torch.uint8:
        return clip.float() / 255
    if not clip.is_floating_point():
        raise AdherenceError(f"clip dtype must be uint8 or float in [-1, 1], got {clip.dtype}")
    x = clip.detach().float().cpu()
    if not torch.isfinite(x).all():
        raise AdherenceError("clip holds NaN or Inf")
    return ((x + 1) / 2).clamp(0, 1)


def _dilate(mask: torch.Tensor, px: int) -> torch.Tensor:
    k = 2 * px + 1
    return torch.nn.functional.max_pool2d(mask[None, None].float(), k, 1, px)[0, 0] > 0


def _components(mask: torch.Tensor) -> tuple[torch.Tensor, list[int]]:
    """8-connected labels of a boolean [H, W] mask and the pixel count of each label 1..n."""
    from scipy import ndimage  # noqa: PLC0415

    labels, n = ndimage.label(mask.numpy(), structure=[[1, 1, 1], [1, 1, 1], [1, 1, 1]])
    labels = torch.from_numpy(labels)
    return labels, torch.bincount(labels.flatten(), minlength=n + 1)[1:].tolist()


def _template(shape: str, cx: float, cy: float, r: float, h: int, w: int) -> torch.Tensor:
    """The renderer's anti-aliased coverage of `shape` (radius r px) centred at (cx, cy) px; [H, W]."""
    ys = (torch.arange(h, dtype=torch.float32) + 0.5).view(1, 1, h, 1)
    xs = (torch.arange(w, dtype=torch.float32) + 0.5).view(1, 1, 1, w)
    sd = data._signed_distance(torch.tensor([data.SHAPES.index(shape)]), xs - cx, ys - cy, torch.tensor(r))
    return (0.5 - sd).clamp(0, 1)[0, 0]


def read_frame(frame: torch.Tensor) -> FrameReading:
    """Background, object coverage, colour, area, centroid and shape fit of one [3, H, W] frame in [0, 1]."""
    _, h, w = frame.shape
    side = min(h, w)
    pix = frame.reshape(3, -1).T  # [HW, 3]
    # the object covers at most ~20 % of a frame, so the per-channel median is background
    d0 = (pix - pix.median(0).values).norm(dim=1)
    k = max(3, round(0.005 * h * w))
    dmax = d0.topk(k).values[-1].item()  # robust to a few stray pixels
    ys, xs = torch.meshgrid(torch.arange(h, dtype=torch.float32) + 0.5, torch.arange(w, dtype=torch.float32) + 0.5,
                            indexing="ij")
    # background plane per channel over pixels clearly away from the object
    near = _dilate((d0 > 0.25 * max(dmax, MIN_CONTRAST)).view(h, w), 2).flatten()
    far = ~near if (~near).sum() >= 16 else torch.ones_like(near)
    design = torch.stack([torch.ones(h * w), xs.flatten() / w - 0.5, ys.flatten() / h - 0.5], 1)
    coef = torch.linalg.lstsq(design[far], pix[far]).solution  # [3 terms, 3 channels]
    background = tuple(coef[0].clamp(0, 1).tolist())  # value at the image centre
    if dmax < MIN_CONTRAST:
        return FrameReading(False, background)
    bg = design @ coef  # [HW, 3]
    diff = pix - bg
    strong = (diff.norm(dim=1) > 0.6 * dmax)
    colour = pix[strong].median(0).values
    c = colour - bg  # per-pixel object-minus-background direction
    alpha = (diff * c).sum(1) / (c * c).sum(1).clamp_min(1e-6)
    alpha = alpha.view(h, w)
    labels, sizes = _components(alpha > 0.5)
    if not sizes:
        return FrameReading(False, background)
    big = max(sizes)
    objects = sum(s >= max(1, 0.1 * big) for s in sizes)
    blob = labels == (sizes.index(big) + 1)
    weight = alpha.clamp(0, 1) * _dilate(blob, 1)
    total = weight.sum().item()
    cx, cy = (weight * xs).sum().item() / total, (weight * ys).sum().item() / total
    core = blob & (alpha > 0.8)
    colour = frame[:, core].median(1).values if core.any() else colour
    ious = {}
    for shape, k2 in AREA_PER_R2.items():
        t = _template(shape, cx, cy, math.sqrt(total / k2), h, w)
        ious[shape] = (torch.minimum(t, weight).sum() / torch.maximum(t, weight).sum().clamp_min(1e-6)).item()
    return FrameReading(True, background, tuple(colour.tolist()), total / side**2, (cx / w, cy / h), ious, objects)


def _nearest(table: dict[str, tuple], rgb: torch.Tensor, shade: tuple[float, float] = (1.0, 1.0)) -> str:
    """Nearest palette entry to `rgb`, each entry scaled by the best shade in `shade` (clipped to [0, 1])."""
    best, name = math.inf, ""
    for key, value in table.items():
        p = torch.tensor(value)
        s = ((rgb * p).sum() / (p * p).sum()).clamp(*shade)
        dist = (rgb - (p * s).clamp(0, 1)).norm().item()
        if dist < best:
            best, name = dist, key
    return name


def score_clip(clip: torch.Tensor, caption_id: int, spec: data.ClipSpec) -> ClipScore:
    """Every caption attribute of `caption_id` read back from one clip [3, F, H, W] and compared."""
    if spec.kind != "video":
        raise AdherenceError(f"adherence scores video clips; the spec is {spec.kind!r}")
    if not 0 <= int(caption_id) < data.num_captions("video"):
        raise AdherenceError(f"caption id {caption_id} is outside 0..{data.num_captions('video') - 1}")
    x = to_unit(clip)
    expected = data.attributes_of("video", int(caption_id))
    readings = [read_frame(x[:, f]) for f in range(x.shape[1])]
    found = [r for r in readings if r.found]
    background = torch.tensor([r.background for r in readings]).median(0).values
    predicted = {"background": _nearest(data.BACKGROUNDS, background)}
    coherence = sum(r.objects == 1 for r in readings) / len(readings)
    radius, velocity, mean_iou = 0.0, (0.0, 0.0), {}
    if not found:
        predicted.update({a: "none" for a in ATTRIBUTES if a != "background"})
    else:
        colour = torch.tensor([r.colour for r in found]).median(0).values
        predicted["colour"] = _nearest(data.COLOURS, colour, shade=(0.85, 1.15))
        mean_iou = {s: sum(r.shape_iou[s] for r in found) / len(found) for s in data.SHAPES}
        shape = max(mean_iou, key=mean_iou.get)
        predicted["shape"] = shape
        radius = float(torch.tensor([math.sqrt(r.area / AREA_PER_R2[shape]) for r in found]).median())
        small, large = data.SIZES["small"], data.SIZES["large"]
        predicted["size"] = "large" if radius > (small + large) / 2 else "small"
        predicted["direction"], predicted["speed"], velocity = _motion(readings, spec)
    correct = {a: predicted[a] == expected[a] for a in ATTRIBUTES}
    return ClipScore(int(caption_id), expected, predicted, correct, all(correct.values()), coherence,
                     len(found), radius, velocity, mean_iou)


def _motion(readings: list[FrameReading], spec: data.ClipSpec) -> tuple[str, str, tuple[float, float]]:
    """Direction and speed class from a least-squares line through the centroids of the frames with an object."""
    t = torch.tensor([float(i) for i, r in enumerate(readings) if r.found])
    if len(t) < 2:
        return "static", "static", (0.0, 0.0)
    xy = torch.tensor([r.centroid for r in readings if r.found])  # [n, 2]
    tc = t - t.mean()
    v = (tc[:, None] * (xy - xy.mean(0))).sum(0) / (tc * tc).sum()  # slope per axis
    vx, vy = v.tolist()
    slowly, quickly = spec.speed_table().values()
    along = vx if abs(vx) >= abs(vy) else vy
    if abs(along) < STATIC_FRACTION * slowly:
        return "static", "static", (vx, vy)
    direction = ("right" if vx > 0 else "left") if abs(vx) >= abs(vy) else ("down" if vy > 0 else "up")
    return direction, ("quickly" if abs(along) > (slowly + quickly) / 2 else "slowly"), (vx, vy)


def score_clips(clips: torch.Tensor, caption_ids, spec: data.ClipSpec) -> list[ClipScore]:
    """`clips` [N, 3, F, H, W]; one score per clip."""
    if not isinstance(clips, torch.Tensor) or clips.ndim != 5:
        raise AdherenceError(f"clips must be a [N, 3, F, H, W] tensor, got {getattr(clips, 'shape', type(clips))}")
    ids = [int(i) for i in caption_ids]
    if len(ids) != len(clips) or not ids:
        raise AdherenceError(f"{len(clips)} clips but {len(ids)} caption ids; give one id per clip (at least one)")
    if (clips.shape[2], clips.shape[3], clips.shape[4]) != (spec.frames, spec.height, spec.width):
        raise AdherenceError(f"clips are {tuple(clips.shape[2:])} (F, H, W) but the spec renders "
                             f"{spec.frames}x{spec.height}x{spec.width}; pass the spec of the model that made them")
    return [score_clip(c, i, spec) for c, i in zip(clips, ids)]


def aggregate(scores: list[ClipScore]) -> dict:
    """Per-attribute accuracy, the rate of clips with every attribute right, and the mean coherence."""
    if not scores:
        raise AdherenceError("no clip scores to aggregate")
    n = len(scores)
    out = {"clips": n, "accuracy": {a: sum(s.correct[a] for s in scores) / n for a in ATTRIBUTES},
           "all_correct": sum(s.all_correct for s in scores) / n,
           "coherence": sum(s.coherence for s in scores) / n,
           "static": sum(s.predicted["direction"] == "static" for s in scores) / n}
    return out


def as_json(score: ClipScore) -> dict:
    return asdict(score)


def reference_clips(caption_ids, seeds, spec: data.ClipSpec) -> torch.Tensor:
    """Ground-truth renders of the same captions (placement drawn from each clip's seed), uint8 like generated clips."""
    clips = [data.render(spec, data.scenes_from_ids(spec, torch.tensor([int(i)]), torch.Generator().manual_seed(int(s))))
             for i, s in zip(caption_ids, seeds)]
    return ((torch.cat(clips) + 1) * 127.5).round().to(torch.uint8)


def ground_truth(spec: data.ClipSpec, n: int, seed: int) -> dict:
    """The score of `n` ground-truth renders of random captions and placements: what a perfect model gets."""
    g = torch.Generator().manual_seed(seed)
    scenes = data.scenes_from_ids(spec, torch.randint(data.num_captions("video"), (n,), generator=g), g)
    return {"seed": seed, **aggregate(score_clips(data.render(spec, scenes), scenes.caption_ids, spec))}


def _git_commit() -> str:
    import subprocess  # noqa: PLC0415
    from pathlib import Path  # noqa: PLC0415

    here = Path(__file__).resolve().parent
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, check=True)
        dirty = subprocess.run(["git", "status", "--porcelain"], cwd=here, capture_output=True, text=True, check=True)
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return head.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")


def main(argv: list[str] | None = None) -> int:
    import argparse  # noqa: PLC0415
    import json  # noqa: PLC0415
    import logging  # noqa: PLC0415
    from pathlib import Path  # noqa: PLC0415

    from safetensors import SafetensorError  # noqa: PLC0415
    from safetensors.torch import load_file  # noqa: PLC0415

    from ditbake.exporter.testbed.models import data_spec_of, data_spec_record  # noqa: PLC0415

    p = argparse.ArgumentParser(prog="python -m ditbake.exporter.testbed.adherence",
                                description="Prompt adherence of generated test-bed clips (generate.py's format).")
    p.add_argument("clips", type=Path, help="safetensors with clips uint8 [N, 3, F, H, W], caption_ids [N], seeds [N]")
    p.add_argument("--spec-from", type=Path, required=True, help="model directory whose data spec made the clips")
    p.add_argument("--out", type=Path, required=True, help="JSON; an existing adherence JSON gains or replaces --name")
    p.add_argument("--name", help="key of this bed in --out (default: the model directory's name)")
    p.add_argument("--note", default="", help="free text stored with the scores")
    p.add_argument("--reference", action="store_true", help="also score ground-truth renders of the same captions")
    p.add_argument("--ground-truth", type=int, default=0, metavar="N",
                   help="also score N ground-truth renders of random captions and placements (the scorer's own accuracy)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    log = logging.getLogger("ditbake.testbed")
    torch.set_num_threads(1)  # thousands of tiny per-frame ops: more threads only add overhead
    try:
        spec = data_spec_of(args.spec_from)
        try:
            tensors = load_file(str(args.clips))
        except (OSError, SafetensorError) as e:
            raise AdherenceError(f"cannot read clips file {args.clips}: {e}") from e
        missing = {"clips", "caption_ids", "seeds"} - set(tensors)
        if missing:
            raise AdherenceError(f"{args.clips} lacks {sorted(missing)}; write it with exporter/testbed/generate.py")
        ids, seeds = tensors["caption_ids"].tolist(), tensors["seeds"].tolist()
        scores = score_clips(tensors["clips"], ids, spec)
        own_held = set(data.held_out_ids("video", spec.held_out_rule))
        record = {"model_dir": str(args.spec_from), "clips_file": str(args.clips), "commit": _git_commit(),
                  "spec": data_spec_record(spec, args.spec_from.name), "note": args.note,
                  "captions_seen_in_training": sum(i not in own_held for i in ids),
                  "aggregate": aggregate(scores),
                  "per_clip": [{**as_json(s), "seed": sd, "seen_in_training": s.caption_id not in own_held}
                               for s, sd in zip(scores, seeds)]}
        if args.reference:
            ref = score_clips(reference_clips(ids, seeds, spec), ids, spec)
            record["reference_aggregate"] = aggregate(ref)
        if args.ground_truth > 0:
            record["ground_truth"] = ground_truth(spec, args.ground_truth, seed=int(torch.randint(2**31, ())))
    except data.DataError as e:
        log.error("%s", e)
        return 2
    out = {"what": "prompt adherence of test-bed clips (exporter/testbed/adherence.py)", "beds": {}}
    if args.out.is_file():
        try:
            old = json.loads(args.out.read_text())
            out["beds"] = old["beds"] if isinstance(old.get("beds"), dict) else {}
        except (ValueError, AttributeError):
            log.error("%s exists and is not an adherence JSON; choose another --out", args.out)
            return 2
    out["beds"][args.name or args.spec_from.name] = record
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=1) + "\n")
    log.info("%s: %s", args.name or args.spec_from.name, json.dumps(record["aggregate"]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
