"""Procedural captioned clips and images for the test-bed models (pixel space, values in [-1, 1]).

A scene is one object (circle / square / triangle) of a colour and size on a background colour
with a soft gradient. Clips move the object left / right / up / down, slowly or quickly, in a
straight line (temporally coherent); images place it in one of five positions. Captions name
every attribute, so the prompt decides the picture:

    "a small red circle moving slowly left on a blue background"       (video)
    "a large green triangle in the top left on a gray background"      (image)

Attributes are index tensors, so a batch renders on any device in one vectorised pass, and every
caption is one entry of a fixed enumeration (`all_captions`): a text-embedding table computed
once serves the whole training run. About 1 caption in 20 (`is_held_out`) never appears in
training; the held-out loss and `ditbake eval`'s default prompts use those.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

SHAPES = ("circle", "square", "triangle")
COLOURS = {"red": (0.9, 0.1, 0.1), "green": (0.1, 0.8, 0.2), "yellow": (0.95, 0.9, 0.1),
           "white": (0.95, 0.95, 0.95), "orange": (1.0, 0.55, 0.0), "purple": (0.6, 0.2, 0.8)}
BACKGROUNDS = {"black": (0.05, 0.05, 0.05), "blue": (0.1, 0.2, 0.6), "gray": (0.5, 0.5, 0.5),
               "brown": (0.4, 0.25, 0.1)}
SIZES = {"small": 0.13, "large": 0.23}  # radius as a fraction of the image side
DIRECTIONS = {"left": (-1.0, 0.0), "right": (1.0, 0.0), "up": (0.0, -1.0), "down": (0.0, 1.0)}
SPEEDS = {"slowly": 0.04, "quickly": 0.08}  # image sides per frame
POSITIONS = {"in the center": (0.5, 0.5), "in the top left": (0.28, 0.28), "in the top right": (0.72, 0.28),
             "in the bottom left": (0.28, 0.72), "in the bottom right": (0.72, 0.72)}

# attribute order of the caption enumeration (mixed radix, first attribute most significant)
VIDEO_ATTRIBUTES = (("shape", SHAPES), ("colour", COLOURS), ("size", SIZES), ("direction", DIRECTIONS),
                    ("speed", SPEEDS), ("background", BACKGROUNDS))
IMAGE_ATTRIBUTES = (("shape", SHAPES), ("colour", COLOURS), ("size", SIZES), ("position", POSITIONS),
                    ("background", BACKGROUNDS))
KINDS = ("video", "image")
HELD_OUT_EVERY = 20
# How captions are split into train / held-out. "v1" (the first test beds) keys on the caption id
# mod 20, which fixes the least significant attribute: every v1 held-out video caption has a brown
# background. "v2" hashes the id, so held-out captions cover every value of every attribute.
HELD_OUT_RULES = ("v1", "v2")


class DataError(ValueError):
    """A data request is malformed (unknown kind, bad shape)."""


@dataclass(frozen=True)
class ClipSpec:
    """Rendered size: `frames` = 1 renders images [B, 3, H, W]; more renders clips [B, 3, F, H, W]."""

    kind: str = "video"
    frames: int = 8
    height: int = 32
    width: int = 32
    # image sides per frame for (slowly, quickly); None = SPEEDS. Longer clips need slower motion
    # for the straight path to stay in frame.
    speeds: tuple[float, float] | None = None
    held_out_rule: str = "v1"

    def __post_init__(self):
        if self.kind not in KINDS:
            raise DataError(f"unknown data kind {self.kind!r}; expected one of {KINDS}")
        if self.held_out_rule not in HELD_OUT_RULES:
            raise DataError(f"unknown held-out rule {self.held_out_rule!r}; expected one of {HELD_OUT_RULES}")
        if self.speeds is not None and (len(self.speeds) != 2 or not 0 < self.speeds[0] < self.speeds[1]):
            raise DataError(f"speeds must be (slowly, quickly) with 0 < slowly < quickly, got {self.speeds}")
        if self.frames < 1 or self.height < 8 or self.width < 8:
            raise DataError(f"clip size {self.frames}x{self.height}x{self.width} is too small (frames >= 1, sides >= 8)")
        if self.kind == "image" and self.frames != 1:
            raise DataError("images have frames=1")

    @property
    def attributes(self):
        return VIDEO_ATTRIBUTES if self.kind == "video" else IMAGE_ATTRIBUTES

    def speed_table(self) -> dict[str, float]:
        return SPEEDS if self.speeds is None else dict(zip(SPEEDS, self.speeds))

    def at_size(self, frames: int, height: int, width: int) -> ClipSpec:
        """The same data (motion per frame, split) rendered at another size, e.g. for a low-res stage."""
        return ClipSpec(self.kind, frames, height, width, self.speeds, self.held_out_rule)


def _values(table) -> list[str]:
    return list(table)


def num_captions(kind: str) -> int:
    attrs = ClipSpec(kind, 1 if kind == "image" else 8).attributes
    n = 1
    for _, table in attrs:
        n *= len(table)
    return n


def caption_from_attributes(kind: str, a: dict[str, str]) -> str:
    head = f"a {a['size']} {a['colour']} {a['shape']}"
    if kind == "video":
        return f"{head} moving {a['speed']} {a['direction']} on a {a['background']} background"
    return f"{head} {a['position']} on a {a['background']} background"


def attributes_of(kind: str, caption_id: int) -> dict[str, str]:
    """Decode a caption id (mixed radix over the attribute tables) into attribute names."""
    attrs = ClipSpec(kind, 1 if kind == "image" else 8).attributes
    out = {}
    for name, table in reversed(attrs):
        caption_id, i = divmod(caption_id, len(table))
        out[name] = _values(table)[i]
    return out


def all_captions(kind: str) -> list[str]:
    """Every caption of `kind`, in caption-id order."""
    return [caption_from_attributes(kind, attributes_of(kind, i)) for i in range(num_captions(kind))]


def is_held_out(caption_id: torch.Tensor | int, rule: str = "v1") -> torch.Tensor | bool:
    """About one caption in 20 is reserved for the held-out loss and samples (fixed, seed-free)."""
    if rule == "v1":
        return (caption_id * 7919 + 3) % HELD_OUT_EVERY == 0
    if rule == "v2":
        # Knuth's multiplicative hash: the high bits of id * 2654435761 mod 2^32 mix every digit of
        # the mixed-radix id, so no attribute is pinned by the residue
        return ((caption_id * 2654435761) % 4294967296) // 65536 % HELD_OUT_EVERY == 0
    raise DataError(f"unknown held-out rule {rule!r}; expected one of {HELD_OUT_RULES}")


def held_out_ids(kind: str, rule: str = "v1") -> list[int]:
    return [i for i in range(num_captions(kind)) if is_held_out(i, rule)]


@dataclass
class SceneBatch:
    """Attribute indices [B] per attribute name, and the continuous draws that place the object."""

    kind: str
    index: dict[str, torch.Tensor]
    caption_ids: torch.Tensor
    jitter: torch.Tensor  # [B, 6]: size, position x/y, colour shade, gradient angle, gradient strength

    def captions(self) -> list[str]:
        return [caption_from_attributes(self.kind, attributes_of(self.kind, int(i))) for i in self.caption_ids]


def _encode_ids(spec: ClipSpec, index: dict[str, torch.Tensor]) -> torch.Tensor:
    ids = torch.zeros_like(next(iter(index.values())))
    for name, table in spec.attributes:
        ids = ids * len(table) + index[name]
    return ids


def scenes_from_ids(spec: ClipSpec, caption_ids: torch.Tensor, generator: torch.Generator) -> SceneBatch:
    """Scenes for given caption ids (attributes fixed, placement and shading drawn from `generator`)."""
    ids = caption_ids.clone().cpu()
    index, rest = {}, ids.clone()
    for name, table in reversed(spec.attributes):
        index[name] = rest % len(table)
        rest = rest // len(table)
    jitter = torch.rand((len(ids), 6), generator=generator)
    return SceneBatch(spec.kind, index, ids, jitter)


def sample_scenes(spec: ClipSpec, n: int, generator: torch.Generator, split: str = "train") -> SceneBatch:
    """`n` random scenes from the `train` captions or the `held_out` ones."""
    if split not in ("train", "held_out"):
        raise DataError(f"unknown split {split!r}; expected 'train' or 'held_out'")
    pool = torch.arange(num_captions(spec.kind))
    held = is_held_out(pool, spec.held_out_rule)
    keep = held if split == "held_out" else ~held
    pool = pool[keep]
    ids = pool[torch.randint(len(pool), (n,), generator=generator)]
    return scenes_from_ids(spec, ids, generator)


def _palette(table: dict, idx: torch.Tensor) -> torch.Tensor:
    return torch.tensor(list(table.values()))[idx]  # [B, 3] in [0, 1]


def _object_centres(spec: ClipSpec, scenes: SceneBatch, radius: torch.Tensor) -> torch.Tensor:
    """Object centre per frame, [B, F, 2] in image-side units (x right, y down)."""
    j = scenes.jitter
    t = torch.arange(spec.frames, dtype=torch.float32)
    if spec.kind == "image":
        pos = torch.tensor(list(POSITIONS.values()))[scenes.index["position"]]
        return (pos + (j[:, 1:3] - 0.5) * 0.08)[:, None, :]
    direction = torch.tensor(list(DIRECTIONS.values()))[scenes.index["direction"]]  # [B, 2]
    speed = torch.tensor(list(spec.speed_table().values()))[scenes.index["speed"]]  # [B]
    travel = speed * (spec.frames - 1)
    margin = radius * 0.6
    # start so that the whole path stays inside [margin, 1 - margin] along the motion axis
    lo, hi = margin, 1 - margin - travel
    along = lo + (hi - lo).clamp_min(0) * j[:, 1]
    start_along = torch.where(direction.sum(-1) > 0, along, 1 - along)
    across = margin + (1 - 2 * margin) * j[:, 2]
    horizontal = direction[:, 0] != 0
    start = torch.stack([torch.where(horizontal, start_along, across),
                         torch.where(horizontal, across, start_along)], -1)
    return start[:, None, :] + direction[:, None, :] * (speed[:, None, None] * t[None, :, None])


def _signed_distance(shape_idx: torch.Tensor, dx: torch.Tensor, dy: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    """Signed distance-like field (negative inside) for each shape, all in pixels; [B, F, H, W]."""
    circle = torch.sqrt(dx**2 + dy**2) - r
    square = torch.maximum(dx.abs(), dy.abs()) - 0.85 * r
    # upward triangle (image y down): flat edge below the centre, apex above; inradius r / 2
    triangle = torch.maximum(torch.maximum(dy, 0.866 * dx - 0.5 * dy), -0.866 * dx - 0.5 * dy) - 0.5 * r
    s = shape_idx.view(-1, 1, 1, 1)
    return torch.where(s == 0, circle, torch.where(s == 1, square, triangle))


def render(spec: ClipSpec, scenes: SceneBatch, device: torch.device | str = "cpu") -> torch.Tensor:
    """Anti-aliased frames in [-1, 1]: [B, 3, F, H, W] for video, [B, 3, H, W] for images."""
    b, f, h, w = len(scenes.caption_ids), spec.frames, spec.height, spec.width
    side = min(h, w)
    j = scenes.jitter
    radius = torch.tensor(list(SIZES.values()))[scenes.index["size"]] * (0.9 + 0.2 * j[:, 0])  # image-side units
    centres = _object_centres(spec, scenes, radius).to(device)  # [B, F, 2]
    ys = (torch.arange(h, device=device, dtype=torch.float32) + 0.5).view(1, 1, h, 1)
    xs = (torch.arange(w, device=device, dtype=torch.float32) + 0.5).view(1, 1, 1, w)
    dx = xs - centres[..., 0, None, None] * w
    dy = ys - centres[..., 1, None, None] * h
    sd = _signed_distance(scenes.index["shape"].to(device), dx, dy, (radius * side).to(device).view(-1, 1, 1, 1))
    coverage = (0.5 - sd).clamp(0, 1)[:, None]  # [B, 1, F, H, W]

    shade = 0.9 + 0.2 * j[:, 3:4]
    colour = (_palette(COLOURS, scenes.index["colour"]) * shade).clamp(0, 1).to(device)
    background = _palette(BACKGROUNDS, scenes.index["background"]).to(device)
    angle = (j[:, 4] * 6.2832).to(device)
    ramp = (torch.cos(angle).view(-1, 1, 1) * (xs[0] / w - 0.5) + torch.sin(angle).view(-1, 1, 1) * (ys[0] / h - 0.5))
    gradient = 1 + (0.3 * j[:, 5]).to(device).view(-1, 1, 1) * ramp  # [B, H, W]
    bg = (background.view(b, 3, 1, 1) * gradient[:, None]).clamp(0, 1)[:, :, None]  # [B, 3, 1, H, W]
    frames = bg * (1 - coverage) + colour.view(b, 3, 1, 1, 1) * coverage
    frames = frames * 2 - 1
    return frames[:, :, 0] if spec.kind == "image" else frames


def batch(spec: ClipSpec, n: int, seed: int, split: str = "train",
          device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """A seed-reproducible batch: (pixels, caption ids [n], captions)."""
    gen = torch.Generator().manual_seed(int(seed))
    scenes = sample_scenes(spec, n, gen, split)
    return render(spec, scenes, device), scenes.caption_ids, scenes.captions()
