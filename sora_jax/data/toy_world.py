"""The procedural toy world: native-size videos with exact ground truth.

Every example is a pure function of (seed, index): a background (solid or a
simple texture) with 1 to 3 coloured shapes that stay still, move in a line,
bounce off the walls or fall under gravity. On top of that, each with its own
probability, come the world-simulation phenomena of the Sora report:

  occlusion        an object passes behind an occluder (bar or box) and reappears
  exit / re-entry  an object leaves the frame and comes back
  camera pan       the whole scene, background included, shifts consistently
  painter          an object leaves a trail that stays for the rest of the clip

Geometry lives in *world* pixel coordinates; the camera at frame t sits at an
integer offset o_t, so screen = world - o_t. Integer offsets make the pan exact:
frame t is frame 0 shifted by o_t wherever no object moved. Rendering has hard
edges (no anti-aliasing), so the per-frame visible fraction is an exact pixel
count: visible pixels / the object's full pixel count on an unbounded canvas.

See docs/toy_world.md for the record layout and the ground-truth fields.
"""

from __future__ import annotations

import dataclasses
import json
import math
from typing import Any, Mapping

import ml_collections
import numpy as np

from sora_jax.data import captions

# Clearly distinct, named colours. Objects are bright, backgrounds are muted or
# pale, occluders neutral; a colour too close to the background is never drawn.
OBJECT_COLORS = {
    "red": (230, 40, 40), "green": (40, 190, 70), "blue": (50, 100, 240),
    "yellow": (245, 225, 40), "orange": (250, 140, 20), "purple": (150, 70, 220),
    "cyan": (50, 220, 230), "pink": (250, 140, 200), "white": (250, 250, 250),
}
BACKGROUND_COLORS = {
    "black": (15, 15, 15), "navy": (20, 30, 80), "charcoal": (60, 60, 66),
    "olive": (85, 90, 30), "maroon": (90, 20, 30), "teal": (0, 80, 85),
    "beige": (225, 215, 180),
}
OCCLUDER_COLORS = {"gray": (140, 140, 140), "brown": (130, 80, 40)}
SHAPES = ("circle", "square", "triangle", "diamond")
SIZES = {"small": 0.07, "medium": 0.10, "large": 0.14}  # radius / sqrt(H*W)
MOTIONS = ("static", "linear", "bouncing", "falling")
BACKGROUNDS = ("solid", "stripes", "checker", "gradient")
_MIN_CONTRAST = 110.0  # Euclidean RGB distance between an object and its background


@dataclasses.dataclass(frozen=True)
class ToyWorldConfig:
    aspect_ratios: tuple[str, ...] = ("16:9", "9:16", "4:3", "3:4", "1:1", "21:9")
    pixel_budget: int = 64 * 64  # H * W <= pixel_budget
    size_multiple: int = 8  # H and W are multiples of this
    max_frames: int = 17
    frame_step: int = 4  # clip lengths are 1 + frame_step * k <= max_frames
    image_prob: float = 0.15  # probability of a 1-frame example (an image)
    fps: float = 8.0
    min_objects: int = 1
    max_objects: int = 3
    shapes: tuple[str, ...] = SHAPES
    colors: tuple[str, ...] = tuple(OBJECT_COLORS)
    sizes: tuple[str, ...] = tuple(SIZES)
    motions: tuple[str, ...] = MOTIONS
    motion_weights: tuple[float, ...] = (0.15, 0.35, 0.3, 0.2)
    backgrounds: tuple[str, ...] = BACKGROUNDS
    occlusion_prob: float = 0.3
    exit_reenter_prob: float = 0.25
    camera_pan_prob: float = 0.25
    painter_prob: float = 0.2

    def __post_init__(self):
        def check_subset(field, values, known):
            bad = [v for v in values if v not in known]
            if bad or not values:
                raise ValueError(f"ToyWorldConfig.{field}: unknown or empty {bad}; known: {list(known)}")

        for field in ("aspect_ratios", "shapes", "colors", "sizes", "motions", "motion_weights", "backgrounds"):
            object.__setattr__(self, field, tuple(getattr(self, field)))
        for a in self.aspect_ratios:
            _parse_aspect(a)
        check_subset("shapes", self.shapes, SHAPES)
        check_subset("colors", self.colors, OBJECT_COLORS)
        check_subset("sizes", self.sizes, SIZES)
        check_subset("motions", self.motions, MOTIONS)
        check_subset("backgrounds", self.backgrounds, BACKGROUNDS)
        if len(self.motion_weights) != len(self.motions) or min(self.motion_weights) < 0 or sum(self.motion_weights) <= 0:
            raise ValueError(f"ToyWorldConfig.motion_weights {self.motion_weights} must be >= 0, one per motion {self.motions}")
        for p in ("image_prob", "occlusion_prob", "exit_reenter_prob", "camera_pan_prob", "painter_prob"):
            if not 0.0 <= getattr(self, p) <= 1.0:
                raise ValueError(f"ToyWorldConfig.{p} must be in [0, 1], got {getattr(self, p)}")
        if not 1 <= self.min_objects <= self.max_objects <= len(self.colors):
            raise ValueError(f"ToyWorldConfig: need 1 <= min_objects <= max_objects <= len(colors), got "
                             f"{self.min_objects}, {self.max_objects}, {len(self.colors)}")
        if self.max_frames < 1 or self.frame_step < 1 or self.pixel_budget < 4 * self.size_multiple ** 2:
            raise ValueError("ToyWorldConfig: max_frames, frame_step >= 1 and pixel_budget >= 4 * size_multiple**2")

    @property
    def frame_counts(self) -> tuple[int, ...]:
        return tuple(range(1, self.max_frames + 1, self.frame_step))

    @classmethod
    def from_config(cls, config: Mapping[str, Any] | ml_collections.ConfigDict | None) -> "ToyWorldConfig":
        values = dict(config.to_dict() if isinstance(config, ml_collections.ConfigDict) else (config or {}))
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown toy world config field(s) {unknown}; known: {sorted(known)}")
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in values.items()})


def default_toy_config() -> ml_collections.ConfigDict:
    """The defaults as a ConfigDict (config.data.toy)."""
    return ml_collections.ConfigDict(
        {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(ToyWorldConfig()).items()})


def _parse_aspect(aspect: str) -> float:
    try:
        a, b = (float(x) for x in aspect.split(":"))
        assert a > 0 and b > 0
    except Exception:
        raise ValueError(f"aspect ratio must look like '16:9', got {aspect!r}") from None
    return a / b


def native_size(aspect: str, pixel_budget: int, multiple: int) -> tuple[int, int]:
    """(H, W): multiples of `multiple`, H*W <= budget, ratio as close to `aspect` as possible."""
    ratio = _parse_aspect(aspect)
    h, w = math.sqrt(pixel_budget / ratio), math.sqrt(pixel_budget * ratio)
    best = None
    for hh in {max(1, math.floor(h / multiple)), max(1, math.ceil(h / multiple))}:
        for ww in {max(1, math.floor(w / multiple)), max(1, math.ceil(w / multiple))}:
            if hh * ww * multiple * multiple > pixel_budget:
                continue
            key = (round(abs(math.log(ww / hh / ratio)), 3), -hh * ww)
            best = min(best or (key, hh, ww), (key, hh, ww))
    if best is None:
        raise ValueError(f"pixel_budget {pixel_budget} too small for aspect {aspect} at multiple {multiple}")
    return best[1] * multiple, best[2] * multiple


# ----------------------------------------------------------------------------- shapes
def _half_extents(shape: str, r: float) -> tuple[float, float, float, float]:
    """(left, top, right, bottom) distances from the centre to the bounding box."""
    if shape == "square":
        a = 0.886 * r  # same area as the circle of radius r
        return a, a, a, a
    if shape == "triangle":
        big = 1.35 * r  # circumradius; the centre is the centroid
        return 0.866 * big, big, 0.866 * big, 0.5 * big
    if shape == "diamond":
        return 1.25 * r, 1.25 * r, 1.25 * r, 1.25 * r
    return r, r, r, r


def _shape_mask(shape: str, r: float, dx: np.ndarray, dy: np.ndarray) -> np.ndarray:
    """Inside test at pixel-centre offsets (dx, dy) from the object's centre."""
    if shape == "circle":
        return dx * dx + dy * dy <= r * r
    if shape == "square":
        a = 0.886 * r
        return (np.abs(dx) <= a) & (np.abs(dy) <= a)
    if shape == "diamond":
        return np.abs(dx) + np.abs(dy) <= 1.25 * r
    big = 1.35 * r  # triangle, apex up
    return (dy >= -big) & (dy <= 0.5 * big) & (np.abs(dx) <= (dy + big) / (1.5 * big) * 0.866 * big)


def _raster(shape: str, r: float, cx: float, cy: float):
    """Pixel coordinates (ys, xs) covered by the shape; pixel (y, x) has centre (x+.5, y+.5)."""
    l, t, rr, b = _half_extents(shape, r)
    xs = np.arange(math.floor(cx - l) - 1, math.ceil(cx + rr) + 1)
    ys = np.arange(math.floor(cy - t) - 1, math.ceil(cy + b) + 1)
    m = _shape_mask(shape, r, (xs + 0.5 - cx)[None, :], (ys + 0.5 - cy)[:, None])
    yy, xx = np.nonzero(m)
    return ys[yy], xs[xx]


# ----------------------------------------------------------------------------- motion
def _simulate(kind, pos, vel, ext, walls, gravity, num_frames):
    """Per-frame world centres; bounces reflect exactly at `walls` (x0, y0, x1, y1)."""
    x, y = pos
    vx, vy = vel
    l, t, r, b = ext
    centres, wall_hits, floor_hits = [], [], []
    for f in range(num_frames):
        if f > 0 and kind != "static":
            if kind == "falling":
                vy += gravity
            x, y = x + vx, y + vy
            if kind in ("bouncing", "falling"):
                if x - l < walls[0] or x + r > walls[2]:
                    x = 2 * (walls[0] + l) - x if x - l < walls[0] else 2 * (walls[2] - r) - x
                    vx = -vx
                    wall_hits.append(f)
                if y + b > walls[3]:
                    y, vy = 2 * (walls[3] - b) - y, -vy * (0.85 if kind == "falling" else 1.0)
                    (floor_hits if kind == "falling" else wall_hits).append(f)
                elif y - t < walls[1] and kind == "bouncing":
                    y, vy = 2 * (walls[1] + t) - y, -vy
                    wall_hits.append(f)
        centres.append((x, y))
    return np.asarray(centres, np.float64), wall_hits, floor_hits


# ----------------------------------------------------------------------------- the world
class ToyWorld:
    """Random access to the toy world: world[i] is the i-th example (a dict, see module doc)."""

    def __init__(self, config: ToyWorldConfig | None = None, seed: int = 0, num_examples: int = 10_000):
        self.config = config if isinstance(config, ToyWorldConfig) else ToyWorldConfig.from_config(config)
        self.seed, self.num_examples = int(seed), int(num_examples)

    def __len__(self) -> int:
        return self.num_examples

    def scene(self, index: int) -> dict:
        """The ground truth of example `index` without rendering it (what world[index] renders)."""
        index = int(index)
        if not 0 <= index < self.num_examples:
            raise IndexError(f"toy world index {index} out of range [0, {self.num_examples})")
        gt = self.sample_scene(np.random.default_rng(np.random.SeedSequence([self.seed, index])))
        gt.update(seed=self.seed, index=index)
        return gt

    def __getitem__(self, index: int) -> dict:
        index = int(index)
        gt = self.scene(index)
        video = render(gt)
        return {
            "video": video,
            "caption": captions.describe(gt),
            "short_caption": captions.short_caption(gt),
            "fps": float(self.config.fps),
            "index": index,
            "ground_truth": json.dumps(gt, separators=(",", ":")),
        }

    # -- scene sampling: everything random happens here, rendering is deterministic.
    def sample_scene(self, rng: np.random.Generator) -> dict:
        c = self.config
        aspect = c.aspect_ratios[rng.integers(len(c.aspect_ratios))]
        height, width = native_size(aspect, c.pixel_budget, c.size_multiple)
        counts = c.frame_counts
        if len(counts) == 1 or rng.random() < c.image_prob:
            num_frames = 1
        else:
            num_frames = int(counts[1:][rng.integers(len(counts) - 1)])
        scale = math.sqrt(height * width)
        speed_unit = scale / 64.0

        # Background: a pan is only visible on a texture, so a pan forces one.
        wants = {k: rng.random() < p for k, p in (("occlusion", c.occlusion_prob), ("exit", c.exit_reenter_prob),
                                                   ("pan", c.camera_pan_prob), ("painter", c.painter_prob))}
        wants["occlusion"] &= num_frames >= 9
        wants["exit"] &= num_frames >= 9
        wants["pan"] &= num_frames >= 5
        wants["painter"] &= num_frames >= 5
        pan = [0.0, 0.0]  # camera velocity, world pixels per frame
        if wants["pan"]:
            angle = rng.choice([0, math.pi, 0, math.pi, math.pi / 2, -math.pi / 2, math.pi / 4, 3 * math.pi / 4])
            speed = rng.uniform(0.75, 2.0) * speed_unit
            pan = [round(speed * math.cos(angle), 3), round(speed * math.sin(angle), 3)]
        kinds = [k for k in c.backgrounds if not (wants["pan"] and k == "solid")] or ["checker"]
        bg_kind = kinds[rng.integers(len(kinds))]
        bg_names = list(BACKGROUND_COLORS)
        bg = [bg_names.pop(rng.integers(len(bg_names)))]
        if bg_kind != "solid":
            bg.append(bg_names[rng.integers(len(bg_names))])
        background = {"kind": bg_kind, "colors": bg, "rgb": [BACKGROUND_COLORS[n] for n in bg],
                      "orientation": ["vertical", "horizontal"][rng.integers(2)] if not wants["pan"] else
                      ("vertical" if abs(pan[0]) >= abs(pan[1]) else "horizontal"),  # texture varies along the pan
                      "period": int(rng.integers(6, 13) * max(1.0, speed_unit))}

        # Objects: distinct colours that contrast with every background colour.
        allowed = [n for n in c.colors if all(_dist(OBJECT_COLORS[n], BACKGROUND_COLORS[b]) >= _MIN_CONTRAST for b in bg)]
        allowed = allowed or list(c.colors)
        n_obj = int(rng.integers(c.min_objects, min(c.max_objects, len(allowed)) + 1))
        colors = [allowed[i] for i in rng.permutation(len(allowed))[:n_obj]]
        objects = []
        for i, color in enumerate(colors):
            shape = c.shapes[rng.integers(len(c.shapes))]
            size = c.sizes[rng.integers(len(c.sizes))]
            radius = SIZES[size] * scale
            ext = _half_extents(shape, radius)
            motion = "static" if num_frames == 1 else c.motions[rng.choice(len(c.motions), p=np.asarray(c.motion_weights) / sum(c.motion_weights))]
            angle = rng.uniform(0, 2 * math.pi)
            speed = rng.uniform(0.8, 2.5) * speed_unit
            vel = [speed * math.cos(angle), speed * math.sin(angle)]
            if motion == "falling":
                vel = [rng.uniform(-0.8, 0.8) * speed_unit, rng.uniform(-0.5, 0.5) * speed_unit]
            if motion == "static":
                vel = [0.0, 0.0]
            # A few tries at a start position away from the objects placed so far.
            tries = [[rng.uniform(ext[0], width - ext[2]), rng.uniform(ext[1], height - ext[3])] for _ in range(8)]
            pos = max(tries, key=lambda p: min([math.dist(p, q["start"]) for q in objects] or [0.0]))
            if motion == "falling":
                pos[1] = rng.uniform(ext[1], max(ext[1], 0.45 * height))
            objects.append(dict(id=i, shape=shape, color=color, rgb=OBJECT_COLORS[color], size=size,
                                radius=radius, motion=motion, start=pos, velocity=vel,
                                walls=[0.0, 0.0, float(width), float(height)],
                                gravity=rng.uniform(0.3, 0.6) * speed_unit if motion == "falling" else 0.0,
                                painter=False))

        occluders = []
        order = list(rng.permutation(n_obj))
        if wants["occlusion"]:
            o = objects[order.pop(0)]
            occluders.append(self._plan_occlusion(rng, o, height, width, num_frames, bg))
        if wants["exit"] and order:
            self._plan_exit(rng, objects[order.pop(0)], height, width, num_frames)
        if wants["painter"]:
            p = objects[rng.integers(n_obj)]
            if p["motion"] == "static":
                p["motion"] = "linear"
                angle = rng.uniform(0, 2 * math.pi)
                p["velocity"] = [1.5 * speed_unit * math.cos(angle), 1.5 * speed_unit * math.sin(angle)]
            p["painter"] = True
        offsets = [[int(round(pan[0] * f)), int(round(pan[1] * f))] for f in range(num_frames)]

        for o in objects:  # simulate in world coordinates
            ext = _half_extents(o["shape"], o["radius"])
            centres, wall_hits, floor_hits = _simulate(o["motion"], o["start"], o["velocity"], ext, o["walls"], o["gravity"], num_frames)
            o["world_centers"] = centres.round(3).tolist()
            o["wall_bounces"], o["floor_bounces"] = wall_hits, floor_hits
            o["extents"] = [round(e, 3) for e in ext]
        return dict(version=1, height=height, width=width, aspect=aspect, num_frames=num_frames, fps=float(c.fps),
                    background=background, camera={"pan_velocity": pan, "offsets": offsets}, occluders=occluders,
                    painter=next(({"object": o["id"], "rgb": [int(0.6 * v) for v in o["rgb"]],
                                   "brush_radius": round(0.45 * o["radius"], 3)} for o in objects if o["painter"]), None),
                    objects=objects,
                    requested=wants)

    def _plan_occlusion(self, rng, o, height, width, num_frames, bg):
        """Send object `o` in a straight line across an occluder placed on its path."""
        ext = max(_half_extents(o["shape"], o["radius"]))
        horizontal = width >= height  # move along the long axis
        length, cross = (width, height) if horizontal else (height, width)
        thick = max(2 * ext + 2, 2.6 * ext + 1)
        centre = rng.uniform(0.4, 0.6) * length
        reach = thick / 2 + ext + 2
        sign = 1 if rng.random() < 0.5 else -1
        along = centre - sign * reach
        speed = 2 * reach / (num_frames - 1)
        p = rng.uniform(ext, cross - ext)
        kind = "bar" if rng.random() < 0.5 else "box"
        lo, hi = (-4 * cross, 5 * cross) if kind == "bar" else (p - ext - rng.uniform(2, 6), p + ext + rng.uniform(2, 6))
        o["motion"], o["start"] = "linear", [along, p] if horizontal else [p, along]
        o["velocity"] = [sign * speed, 0.0] if horizontal else [0.0, sign * speed]
        box = [centre - thick / 2, lo, centre + thick / 2, hi] if horizontal else [lo, centre - thick / 2, hi, centre + thick / 2]
        names = [n for n in OCCLUDER_COLORS if all(_dist(OCCLUDER_COLORS[n], BACKGROUND_COLORS[b]) >= 60 for b in bg)] or list(OCCLUDER_COLORS)
        name = names[rng.integers(len(names))]
        return {"kind": kind, "color": name, "rgb": OCCLUDER_COLORS[name], "box_world": [round(v, 3) for v in box]}

    def _plan_exit(self, rng, o, height, width, num_frames):
        """Bounce `o` off a wall just outside one edge so it leaves, turns mid-clip and returns."""
        l, t, r, b = _half_extents(o["shape"], o["radius"])
        side = ["left", "right", "top", "bottom"][rng.integers(4)]
        half = (num_frames - 1) / 2
        x0, y0 = rng.uniform(l, width - r), rng.uniform(t, height - b)
        drift = rng.uniform(-0.4, 0.4) * math.sqrt(height * width) / 64
        walls = [0.0, 0.0, float(width), float(height)]
        if side in ("left", "right"):
            x0 = rng.uniform(l, 0.5 * width) if side == "left" else rng.uniform(0.5 * width, width - r)
            turn = -(r + 2) if side == "left" else width + l + 2  # centre fully outside by 2 px
            walls[0 if side == "left" else 2] = turn - l if side == "left" else turn + r
            vel = [(turn - x0) / half, drift]
        else:
            y0 = rng.uniform(t, 0.5 * height) if side == "top" else rng.uniform(0.5 * height, height - b)
            turn = -(b + 2) if side == "top" else height + t + 2
            walls[1 if side == "top" else 3] = turn - t if side == "top" else turn + b
            vel = [drift, (turn - y0) / half]
        o.update(motion="bouncing", start=[x0, y0], velocity=vel, walls=walls, gravity=0.0)


def _dist(a, b) -> float:
    return float(np.linalg.norm(np.subtract(a, b, dtype=np.float64)))


# ----------------------------------------------------------------------------- rendering
def _background_canvas(bg: dict, y0: int, x0: int, h: int, w: int, frame_w: int) -> np.ndarray:
    """Background over world pixels [y0, y0+h) x [x0, x0+w)."""
    ys = np.arange(y0, y0 + h)[:, None]
    xs = np.arange(x0, x0 + w)[None, :]
    c1 = np.asarray(bg["rgb"][0], np.float32)
    c2 = np.asarray(bg["rgb"][-1], np.float32)
    along = xs if bg["orientation"] == "vertical" else ys
    if bg["kind"] == "solid":
        mix = np.zeros((h, w), np.float32)
    elif bg["kind"] == "stripes":
        mix = np.broadcast_to(((along // bg["period"]) % 2).astype(np.float32), (h, w))
    elif bg["kind"] == "checker":
        mix = (((ys // bg["period"]) + (xs // bg["period"])) % 2).astype(np.float32)
    else:  # gradient over one frame width, repeating as a triangle wave so a pan keeps moving it
        phase = (along / float(frame_w)) % 2.0
        mix = np.broadcast_to(np.minimum(phase, 2.0 - phase).astype(np.float32), (h, w))
    return (c1 * (1 - mix[..., None]) + c2 * mix[..., None]).round().astype(np.uint8)


def render(gt: dict) -> np.ndarray:
    """Draws the scene described by `gt` (and fills its per-frame screen fields). uint8 (T, H, W, 3)."""
    T, H, W = gt["num_frames"], gt["height"], gt["width"]
    offsets = [(int(x), int(y)) for x, y in gt["camera"]["offsets"]]  # python ints: numpy scalars are slow here
    ox0, oy0 = min(o[0] for o in offsets), min(o[1] for o in offsets)
    ox1, oy1 = max(o[0] for o in offsets), max(o[1] for o in offsets)
    canvas = _background_canvas(gt["background"], oy0, ox0, H + oy1 - oy0, W + ox1 - ox0, W)
    objects = gt["objects"]
    painter = gt["painter"]
    painter_obj = objects[painter["object"]] if painter else None
    occ_boxes = [[float(v) for v in o["box_world"]] for o in gt["occluders"]]
    video = np.empty((T, H, W, 3), np.uint8)
    colors = np.asarray([o["rgb"] for o in objects] + [o["rgb"] for o in gt["occluders"]] or [[0, 0, 0]], np.uint8)
    n_obj = len(objects)
    for o in objects:
        o["frames"] = {"center": [], "box": [], "visible": [], "in_frame": [], "behind_occluder": []}
    for o in gt["occluders"]:
        o["boxes"] = []
    for f in range(T):
        ox, oy = offsets[f]
        if painter:  # stamp the brush along the path since the last frame, in world pixels
            cur = np.asarray(painter_obj["world_centers"][f])
            prev = np.asarray(painter_obj["world_centers"][max(f - 1, 0)])
            _stamp_capsule(canvas, prev - (ox0, oy0), cur - (ox0, oy0), painter["brush_radius"], painter["rgb"])
        frame = video[f]
        frame[:] = canvas[oy - oy0: oy - oy0 + H, ox - ox0: ox - ox0 + W]
        owner = np.full((H, W), -1, np.int16)  # who is seen at each pixel: object id, occluder n_obj+k, or -1
        rasters = []
        for o in objects:
            cx, cy = float(o["world_centers"][f][0]) - ox, float(o["world_centers"][f][1]) - oy
            ys, xs = _raster(o["shape"], o["radius"], cx, cy)
            inside = (ys >= 0) & (ys < H) & (xs >= 0) & (xs < W)
            rasters.append((ys[inside], xs[inside], len(ys)))
            owner[ys[inside], xs[inside]] = o["id"]
            l, t, r, b = o["extents"]
            o["frames"]["center"].append([round(cx, 3), round(cy, 3)])
            o["frames"]["box"].append([round(cx - l, 3), round(cy - t, 3), round(cx + r, 3), round(cy + b, 3)])
        occ_mask = np.zeros((H, W), bool)
        for k, box in enumerate(occ_boxes):
            x0, y0, x1, y1 = box[0] - ox, box[1] - oy, box[2] - ox, box[3] - oy
            # pixel centres inside the box, clipped to the frame
            cx0, cy0 = max(0, math.ceil(x0 - 0.5)), max(0, math.ceil(y0 - 0.5))
            cx1, cy1 = min(W, math.floor(x1 - 0.5) + 1), min(H, math.floor(y1 - 0.5) + 1)
            gt["occluders"][k]["boxes"].append([round(x0, 3), round(y0, 3), round(x1, 3), round(y1, 3)])
            if cx1 > cx0 and cy1 > cy0:
                owner[cy0:cy1, cx0:cx1] = n_obj + k
                occ_mask[cy0:cy1, cx0:cx1] = True
        seen = owner >= 0
        frame[seen] = colors[owner[seen]]
        for o, (ys, xs, total) in zip(objects, rasters):
            total = max(total, 1)
            o["frames"]["in_frame"].append(round(len(ys) / total, 4))
            o["frames"]["visible"].append(round(int((owner[ys, xs] == o["id"]).sum()) / total, 4))
            o["frames"]["behind_occluder"].append(round(int(occ_mask[ys, xs].sum()) / total, 4))
    return video


def _stamp_capsule(canvas: np.ndarray, p0, p1, radius: float, rgb) -> None:
    """Paints every pixel within `radius` of the segment p0-p1 (canvas pixel coordinates)."""
    h, w = canvas.shape[:2]
    x0 = max(0, math.floor(min(p0[0], p1[0]) - radius) - 1)
    x1 = min(w, math.ceil(max(p0[0], p1[0]) + radius) + 1)
    y0 = max(0, math.floor(min(p0[1], p1[1]) - radius) - 1)
    y1 = min(h, math.ceil(max(p0[1], p1[1]) + radius) + 1)
    if x1 <= x0 or y1 <= y0:
        return
    px = np.arange(x0, x1)[None, :] + 0.5
    py = np.arange(y0, y1)[:, None] + 0.5
    d = np.subtract(p1, p0)
    denom = float(d @ d) or 1.0
    s = np.clip(((px - p0[0]) * d[0] + (py - p0[1]) * d[1]) / denom, 0.0, 1.0)
    dist2 = (px - p0[0] - s * d[0]) ** 2 + (py - p0[1] - s * d[1]) ** 2
    canvas[y0:y1, x0:x1][dist2 <= radius * radius] = rgb


def parse_ground_truth(record: Mapping[str, Any]) -> dict:
    """The ground-truth dict of a record (accepts str or bytes, as stored in ArrayRecord)."""
    raw = record["ground_truth"]
    if isinstance(raw, (bytes, np.bytes_)):
        raw = raw.decode("utf-8")
    elif isinstance(raw, np.ndarray):
        raw = raw.item() if raw.dtype.kind in "SUO" else raw.tobytes()
        raw = raw.decode("utf-8") if isinstance(raw, bytes) else raw
    return json.loads(raw)
