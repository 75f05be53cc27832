"""Per-example transforms: raw record -> model-ready example.

  * temporal sampling: frame stride or a target fps, a clip of at most `frames`
    frames, its length rounded down to 1 + 4k (the causal VAE's temporal stride);
  * a resolution policy:
      native       keep the aspect ratio, scale to the pixel budget, round H and W
                   to `multiple` (what Sora does: train on videos at their own shape);
      square_crop  centre crop to a square, then resize (the report's ablation baseline);
      resize       a fixed (height, width), aspect ratio ignored;
      random_crop  native size, then a fixed (height, width) crop at a random place
                   (centred in eval): VAE training on patches of native-scale frames,
                   so that objects and textures keep the size they have at native scale;
  * normalise to [-1, 1] and tokenise the chosen caption (data/tokenizer.py).

Resizing uses Pillow's BOX (area) filter when shrinking, which is both fast and
alias-free, and bilinear when enlarging.
"""

from __future__ import annotations

import logging
import math

import numpy as np
from PIL import Image

from sora_jax.data.sources import DataError
from sora_jax.data.tokenizer import HashTokenizer

TEMPORAL_STRIDE = 4  # causal VAE: 1 + 4k frames -> 1 + k latent frames
RESOLUTIONS = ("native", "square_crop", "resize", "random_crop")


def round_frames(n: int, stride: int = TEMPORAL_STRIDE) -> int:
    """Largest 1 + stride*k <= n (n >= 1)."""
    if n < 1:
        raise ValueError(f"need at least one frame, got {n}")
    return 1 + (n - 1) // stride * stride


def frame_indices(num_frames: int, src_fps: float, *, max_frames: int, frame_stride: int = 1,
                  target_fps: float = 0.0, start: float = 0.0) -> np.ndarray:
    """Indices of the frames of one clip.

    `target_fps` > 0 resamples by time (nearest earlier frame), else every
    `frame_stride`-th frame. `start` in [0, 1] places the clip within the video
    (0 = first frame, 1 = as late as possible). The clip has 1 + 4k frames.
    """
    step = src_fps / target_fps if target_fps > 0 and src_fps > 0 else float(max(1, frame_stride))
    available = int(math.floor((num_frames - 1) / step)) + 1  # frames reachable at this step
    length = round_frames(min(available, round_frames(max_frames)))
    first = start * ((num_frames - 1) - (length - 1) * step)
    idx = np.floor(first + np.arange(length) * step + 1e-6).astype(np.int64)
    return np.clip(idx, 0, num_frames - 1)


def native_size(height: int, width: int, pixels: int, multiple: int) -> tuple[int, int]:
    """(H, W), multiples of `multiple` with H*W <= pixels, closest to the aspect ratio and budget.

    Independent rounding of H and W can distort the aspect ratio badly when the
    budget is only a few multiples wide (4:3 at 64x64 pixels and multiple 16 would
    round to a square), so we search the grid: cost = |log aspect error| +
    0.5 |log area / budget|. Aspect matters twice as much as using every pixel.
    """
    if multiple * multiple > pixels:
        raise ValueError(f"pixel budget {pixels} is smaller than one {multiple}x{multiple} block")
    aspect = math.log(height / width)
    best, best_cost = (multiple, multiple), float("inf")
    for h in range(multiple, pixels // multiple + 1, multiple):
        w_max = pixels // h // multiple * multiple
        ideal = h * width / height / multiple
        for w in {math.floor(ideal) * multiple, math.ceil(ideal) * multiple, w_max}:
            if w < multiple or h * w > pixels:
                continue
            cost = abs(math.log(h / w) - aspect) + 0.5 * abs(math.log(h * w / pixels))
            if cost < best_cost - 1e-12:
                best, best_cost = (h, w), cost
    return best


def target_size(height: int, width: int, policy: str, *, pixels: int, size: int, multiple: int,
                out_height: int = 0, out_width: int = 0) -> tuple[int, int]:
    """Output (H, W) of a frame of (height, width) under a resolution policy."""
    if policy == "native":
        return native_size(height, width, pixels, multiple)
    if policy == "square_crop":
        return size, size
    if policy in ("resize", "random_crop"):
        return out_height or size, out_width or size
    raise ValueError(f"config.data.resolution must be one of {RESOLUTIONS}, got {policy!r}")


def resize_video(video: np.ndarray, height: int, width: int) -> np.ndarray:
    """uint8 (T, h, w, 3) -> uint8 (T, height, width, 3), area filter when shrinking."""
    t, h, w, _ = video.shape
    if (h, w) == (height, width):
        return video
    shrink = height <= h and width <= w
    method = Image.Resampling.BOX if shrink else Image.Resampling.BILINEAR
    out = np.empty((t, height, width, 3), np.uint8)
    for i in range(t):
        out[i] = np.asarray(Image.fromarray(video[i]).resize((width, height), method))
    return out


def centre_crop_square(video: np.ndarray) -> np.ndarray:
    _, h, w, _ = video.shape
    side = min(h, w)
    top, left = (h - side) // 2, (w - side) // 2
    return video[:, top : top + side, left : left + side]


def crop(video: np.ndarray, height: int, width: int, rng: np.random.Generator | None = None) -> np.ndarray:
    """A (height, width) window of the frames: at a random place with `rng`, else centred.

    A frame smaller than the window in either side is first enlarged (aspect kept) to cover it.
    """
    _, h, w, _ = video.shape
    scale = max(height / h, width / w)
    if scale > 1:
        h, w = max(height, math.ceil(h * scale)), max(width, math.ceil(w * scale))
        video = resize_video(video, h, w)
    if rng is not None:
        top, left = int(rng.integers(0, h - height + 1)), int(rng.integers(0, w - width + 1))
    else:
        top, left = (h - height) // 2, (w - width) // 2
    return video[:, top : top + height, left : left + width]


def apply_resolution(video: np.ndarray, data_config, rng: np.random.Generator | None = None) -> np.ndarray:
    """The frames under `data_config.resolution`; `rng` places random_crop's window (train)."""
    c = data_config
    if c.resolution == "random_crop":
        h, w = native_size(video.shape[1], video.shape[2], c.pixels, c.multiple)
        return crop(resize_video(video, h, w), c.height or c.size, c.width or c.size, rng)
    if c.resolution == "square_crop":
        video = centre_crop_square(video)
    h, w = target_size(video.shape[1], video.shape[2], c.resolution, pixels=c.pixels, size=c.size,
                       multiple=c.multiple, out_height=c.height, out_width=c.width)
    return resize_video(video, h, w)


def normalise(video: np.ndarray) -> np.ndarray:
    """uint8 [0, 255] -> float32 [-1, 1]."""
    return video.astype(np.float32) * np.float32(2.0 / 255.0) - np.float32(1.0)


def denormalise(video: np.ndarray) -> np.ndarray:
    return np.clip(np.round((np.asarray(video, np.float32) + 1.0) * 127.5), 0, 255).astype(np.uint8)


def caption_of(record, data_config) -> str:
    if data_config.caption == "descriptive":
        return record["caption"]
    if data_config.caption == "short":
        return record.get("short_caption") or record["caption"]
    raise ValueError(f"config.data.caption must be 'descriptive' or 'short', got {data_config.caption!r}")


def where_of(record) -> str:
    return record.get("source_file") or f"example {record.get('index', '?')}"


class VideoTransform:
    """Raw record -> pixel example {video f32 (T,H,W,3) in [-1,1], text_ids, index}.

    `train=True` draws the clip start from the per-example rng that grain's
    `random_map` passes in (deterministic given seed and position); eval clips
    start at frame 0.
    """

    def __init__(self, data_config, train: bool):
        self.config = data_config
        self.train = train
        self.tokenizer = HashTokenizer(data_config.vocab_size, data_config.text_len)

    def clip_uint8(self, record, rng: np.random.Generator | None = None) -> np.ndarray:
        c = self.config
        video = record["video"]
        if video.ndim != 4 or video.shape[0] == 0:
            raise DataError(f"{where_of(record)}: expected a non-empty (T, H, W, 3) video, got {video.shape}")
        start = float(rng.uniform()) if (self.train and c.random_clip and rng is not None) else 0.0
        idx = frame_indices(video.shape[0], float(record.get("fps") or 0.0), max_frames=c.frames,
                            frame_stride=c.frame_stride, target_fps=c.fps, start=start)
        return apply_resolution(video[idx], c, rng if self.train else None)

    def __call__(self, record, rng: np.random.Generator | None = None) -> dict:
        return {
            "video": normalise(self.clip_uint8(record, rng)),
            "text_ids": self.tokenizer.encode(caption_of(record, self.config)),
            "index": np.int64(record["index"]),
        }


def skip_or_raise(fn, on_error: str, counter: dict | None = None):
    """Wraps fn(record, ...) so that a DataError is raised, or logged, counted and skipped (None)."""
    if on_error not in ("raise", "skip"):
        raise ValueError(f"config.data.on_error must be 'raise' or 'skip', got {on_error!r}")

    def wrapped(*args):
        try:
            return fn(*args)
        except DataError as e:
            if on_error == "raise":
                raise
            logging.warning("skipping bad example: %s", e)
            if counter is not None:
                counter[str(e)] = counter.get(str(e), 0) + 1
            return None

    return wrapped
