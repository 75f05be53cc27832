"""What generation reads and writes: workdir checks, the size/frame geometry, input
images and videos, prompt expansion, and the saved outputs (mp4, GIF, contact sheet,
latents, JSON sidecar). `sora_jax.generate` holds the Generator and re-exports these.

Everything here is cheap (JSON, directory listings, decoding small inputs), so every
check runs before the expensive work (restoring, encoding, sampling) starts.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Sequence

import numpy as np

from sora_jax.data import transforms, video_io
from sora_jax.data.video_io import VideoReadError  # noqa: F401 (the error for unreadable inputs)


MODES = ("t2v", "t2i", "i2v", "extend", "loop", "edit", "connect")
MAX_LATENT_FRAMES_FACTOR = 4  # longest video = 4x the training clip's latent frames (RoPE extrapolates, a bit)
MAX_PIXELS_FACTOR = 16  # largest frame = 16x the training pixel budget




class GenerationError(ValueError):
    """Bad input to generation (size, frames, mode arguments); the message names the field."""


class CheckpointError(FileNotFoundError):
    """A workdir without a usable checkpoint; the message names the workdir and what is missing."""


@dataclasses.dataclass
class Result:
    video: np.ndarray  # uint8 (T, H, W, 3)
    latents: np.ndarray  # float32 (T', H', W', C), normalised
    metadata: dict

    def save(self, out_dir: str, name: str | None = None) -> list[str]:
        """Writes the outputs (see `save`) as OUT_DIR/NAME.*; returns the paths."""
        return list(save(self, out_dir, name or self.metadata["mode"]).values())


# --- workdir checks (cheap: JSON and directory listings only) ----------------------------


def _read_json(path: str, what: str) -> dict:
    try:
        with open(path) as f:
            return json.load(f)
    except FileNotFoundError:
        raise CheckpointError(f"{what}: {path} is missing") from None
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{what}: {path} is unreadable ({e})") from None


def complete_steps(workdir: str) -> list[int]:
    """Checkpoint steps whose orbax commit markers are all present (a finished save)."""
    directory = os.path.join(workdir, "checkpoints")
    if not os.path.isdir(directory):
        return []
    steps = []
    for name in os.listdir(directory):
        step_dir = os.path.join(directory, name)
        if not name.isdigit() or not os.path.isdir(os.path.join(step_dir, "state")):
            continue
        markers = [os.path.join(step_dir, "_CHECKPOINT_METADATA"), os.path.join(step_dir, "state", "_METADATA")]
        if all(os.path.exists(m) for m in markers):
            steps.append(int(name))
    return sorted(steps)


def check_checkpoint(workdir: str, step: int | None, what: str) -> tuple[dict, int]:
    """(config dict, step) of a workdir, or CheckpointError naming the workdir and what is missing."""
    workdir = os.path.abspath(os.fspath(workdir))
    if not os.path.isdir(workdir):
        raise CheckpointError(f"{what} workdir {workdir} does not exist")
    config = _read_json(os.path.join(workdir, "config.json"), f"{what} workdir {workdir}")
    directory = os.path.join(workdir, "checkpoints")
    present = sorted(int(n) for n in os.listdir(directory) if n.isdigit()) if os.path.isdir(directory) else []
    complete = complete_steps(workdir)
    if step is None:
        if not complete:
            detail = (f"checkpoint(s) {present} are incomplete (no state/_METADATA or _CHECKPOINT_METADATA)"
                      if present else "no checkpoints/ step directories")
            raise CheckpointError(f"{what} workdir {workdir} has no complete checkpoint: {detail}")
        return config, complete[-1]
    if step not in present:
        raise CheckpointError(f"{what} workdir {workdir} has no checkpoint {step}; it has {present}")
    if step not in complete:
        raise CheckpointError(f"{what} workdir {workdir}: checkpoint {step} is incomplete "
                              "(missing state/_METADATA or _CHECKPOINT_METADATA: an interrupted save?)")
    return config, step


# --- geometry -----------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Geometry:
    """Strides between pixels, latents and tokens, and the sizes the model accepts."""

    t_stride: int  # pixel frames per latent frame after the first (causal VAE)
    multiple: int  # pixel H, W multiple: VAE stride x patch
    spatial_stride: int  # VAE spatial stride
    patch: tuple[int, int, int]
    channels: int
    pixels: int  # training pixel budget per frame (default size)
    train_frames: int  # training clip length in pixel frames (default frames)

    @classmethod
    def from_config(cls, config) -> "Geometry":
        data, model = config["data"], config["model"]
        vae_stride = tuple(int(s) for s in data.get("vae_stride", (4, 8, 8)))
        patch = tuple(int(p) for p in model["patch"])
        return cls(t_stride=vae_stride[0] * patch[0], multiple=max(int(data.get("multiple", 16)), vae_stride[1] * patch[1]),
                   spatial_stride=vae_stride[1], patch=patch, channels=int(model["latent_channels"]),
                   pixels=int(data["pixels"]), train_frames=transforms.round_frames(int(data["frames"])))

    @property
    def max_latent_frames(self) -> int:
        return MAX_LATENT_FRAMES_FACTOR * self.latent_frames(self.train_frames)

    def latent_frames(self, frames: int) -> int:
        return 1 + (frames - 1) // self.t_stride

    def pixel_frames(self, latent_frames: int) -> int:
        return 1 + (latent_frames - 1) * self.t_stride

    def latent_shape(self, frames: int, size: tuple[int, int]) -> tuple[int, int, int, int]:
        return (self.latent_frames(frames), size[0] // self.spatial_stride, size[1] // self.spatial_stride, self.channels)

    def default_size(self, aspect_hw: tuple[int, int] = (1, 1)) -> tuple[int, int]:
        """The training pixel budget at this aspect ratio (what 'native' training used)."""
        return transforms.native_size(int(aspect_hw[0]), int(aspect_hw[1]), self.pixels, self.multiple)

    def round_size(self, size, notes: list) -> tuple[int, int]:
        """Nearest multiples of `multiple` (at least one); a change is noted, never silent."""
        try:
            h, w = (int(s) for s in size)
        except (TypeError, ValueError):
            raise GenerationError(f"size must be (height, width) in pixels, got {size!r}") from None
        if h < 1 or w < 1:
            raise GenerationError(f"size must be positive, got {h}x{w}")
        m = self.multiple
        out = (max(m, int(h / m + 0.5) * m), max(m, int(w / m + 0.5) * m))  # halves round up
        if out[0] * out[1] > MAX_PIXELS_FACTOR * self.pixels:
            raise GenerationError(f"size {out[0]}x{out[1]} has more than {MAX_PIXELS_FACTOR}x the training pixel "
                                  f"budget of {self.pixels} pixels per frame")
        if out != (h, w):
            notes.append(f"size {h}x{w} rounded to {out[0]}x{out[1]} (multiples of {m})")
        return out

    def round_count(self, frames, what: str, notes: list, *, minimum: int, maximum: int, step: int, offset: int) -> int:
        """Nearest offset + step*k in [minimum, maximum]; outside that range is an error."""
        try:
            n = int(frames)
        except (TypeError, ValueError):
            raise GenerationError(f"{what} must be an integer, got {frames!r}") from None
        if not minimum <= n <= maximum:
            raise GenerationError(f"{what}={n} is out of range: this mode takes {minimum}..{maximum}")
        out = offset + int((n - offset) / step + 0.5) * step  # halves round up
        out = min(max(out, minimum), maximum)
        if out != n:
            notes.append(f"{what} {n} rounded to {out} ({offset} + {step}k)")
        return out

    def round_frames(self, frames, notes: list, *, min_latent: int = 1, extra_latent: int = 0) -> int:
        """Total pixel frames 1 + 4k with min_latent <= latent frames <= max - extra_latent."""
        return self.round_count(frames, "frames", notes, minimum=self.pixel_frames(min_latent),
                                maximum=self.pixel_frames(self.max_latent_frames - extra_latent),
                                step=self.t_stride, offset=1)

    def round_new_frames(self, frames, notes: list, *, given_latent: int) -> int:
        """New pixel frames after/before a given video: a multiple of 4 (whole latent frames)."""
        room = self.max_latent_frames - given_latent
        if room < 1:
            raise GenerationError(f"the given video already has {given_latent} latent frames, the most this model "
                                  f"generates is {self.max_latent_frames}")
        return self.round_count(frames, "frames", notes, minimum=self.t_stride, maximum=room * self.t_stride,
                                step=self.t_stride, offset=0)


# --- inputs -----------------------------------------------------------------------------------


def load_frames(source, what: str) -> np.ndarray:
    """A path (any format video_io reads) or a uint8 array -> uint8 (T, H, W, 3). VideoReadError names the file."""
    if isinstance(source, (str, os.PathLike)):
        return video_io.read_video(source)[0]
    frames = np.asarray(source)
    if frames.ndim == 3:
        frames = frames[None]
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8 or frames.shape[0] == 0:
        raise GenerationError(f"{what} must be a file path or a uint8 (T, H, W, 3) array, got "
                              f"{frames.dtype} {frames.shape}")
    return frames


def fit(frames: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Centre crop to the aspect ratio of `size`, then resize: uint8 (T, H, W, 3)."""
    _, h, w, _ = frames.shape
    th, tw = size
    if h * tw > w * th:  # too tall
        ch = max(1, int(round(w * th / tw)))
        top = (h - ch) // 2
        frames = frames[:, top: top + ch]
    elif h * tw < w * th:  # too wide
        cw = max(1, int(round(h * tw / th)))
        left = (w - cw) // 2
        frames = frames[:, :, left: left + cw]
    return transforms.resize_video(np.ascontiguousarray(frames), th, tw)


def prepare_video(source, what: str, geometry: Geometry, size, notes: list, *, max_frames: int | None = None):
    """(uint8 clip (T=1+4k, H, W, 3) at the target size, size). Size: given (rounded) or the input's aspect."""
    frames = load_frames(source, what)
    size = geometry.round_size(size, notes) if size is not None else geometry.default_size(frames.shape[1:3])
    limit = geometry.pixel_frames(geometry.max_latent_frames) if max_frames is None else max_frames
    keep = transforms.round_frames(min(len(frames), limit))
    if keep != len(frames):
        notes.append(f"{what}: kept the first {keep} of its {len(frames)} frames (1 + {geometry.t_stride}k, "
                     f"at most {limit})")
    return fit(frames[:keep], size), size


def expand(prompt: str, expander, seed: int) -> str:
    """The long caption for a prompt: expander None (as is), "toy", "openai" or an object with .expand."""
    if expander is None or expander == "none":
        return prompt
    if isinstance(expander, str):
        from sora_jax.data import prompt_expansion

        if expander == "openai":
            expander = prompt_expansion.get_expander(
                "openai", base_url=os.environ.get("OPENAI_BASE_URL", "https://api.openai.com/v1"),
                model=os.environ.get("OPENAI_MODEL", "gpt-4o-mini"))
        else:
            expander = prompt_expansion.get_expander(expander)
    return expander.expand(prompt, seed=seed)


# --- outputs ----------------------------------------------------------------------------------


def save(result: Result, out_dir: str, name: str, *, formats: Sequence[str] = ("mp4", "gif", "png")) -> dict:
    """Writes the video (mp4, gif), a contact sheet PNG (a 1-frame result: the image PNG),
    the latents (.npy) and a JSON sidecar; returns {kind: path}."""
    os.makedirs(out_dir, exist_ok=True)
    base = os.path.join(out_dir, name)
    fps = float(result.metadata.get("fps", 8.0))
    paths = {}
    video = result.video
    if result.metadata.get("mode") == "loop" and result.metadata.get("loop_frames"):
        video = video[: int(result.metadata["loop_frames"])]  # the cycle: the last frame is frame 0 again
    if len(video) == 1:
        paths["png"] = video_io.write_video(base + ".png", video)
    else:
        for fmt in formats:
            if fmt == "png":
                paths["contact_sheet"] = video_io.write_video(base + "_sheet.png", video_io.contact_sheet(video)[None])
            else:
                paths[fmt] = video_io.write_video(f"{base}.{fmt}", video, fps)
    np.save(base + "_latents.npy", result.latents)
    paths["latents"] = base + "_latents.npy"
    paths["json"] = base + ".json"
    with open(paths["json"], "w") as f:
        json.dump({**result.metadata, "files": {k: os.path.basename(v) for k, v in paths.items()}}, f, indent=1)
    return paths
