"""Reading and writing videos as uint8 (T, H, W, 3) arrays.

read_video(path)  mp4 / webm / mov / mkv / avi / m4v through PyAV (FFmpeg);
                  gif / png / jpg / jpeg / webp / bmp through Pillow (a still
                  image is a 1-frame video). Grayscale and palette frames become
                  RGB; an alpha channel is dropped (not composited: the colour
                  channels are kept as stored). Anything unreadable, truncated to
                  nothing, or with zero frames raises VideoReadError naming the file.
write_video(path, frames, fps)
                  .mp4: H.264 (libx264), yuv420p, which needs even sizes, so an odd
                        height or width is padded by repeating the last row/column
                        (the file is then one pixel larger than the input);
                  .gif: looping animation (Pillow, adaptive palette);
                  .png: the frame itself, or a contact sheet of all frames.
contact_sheet(frames, cols) -> one uint8 image, frames in a grid.
"""

from __future__ import annotations

import os
from fractions import Fraction

import numpy as np

VIDEO_EXTS = (".mp4", ".webm", ".mov", ".mkv", ".avi", ".m4v")
IMAGE_EXTS = (".gif", ".png", ".jpg", ".jpeg", ".webp", ".bmp")


class VideoReadError(ValueError):
    """A video that cannot be read; the message names the file and the reason."""

    def __init__(self, path, reason: str):
        self.path, self.reason = str(path), reason
        super().__init__(f"cannot read video {self.path!r}: {reason}")


def _to_rgb(a: np.ndarray) -> np.ndarray:
    if a.ndim == 2:
        a = a[..., None]
    if a.shape[-1] == 1:
        a = np.repeat(a, 3, axis=-1)
    elif a.shape[-1] == 2:  # gray + alpha
        a = np.repeat(a[..., :1], 3, axis=-1)
    return np.ascontiguousarray(a[..., :3]).astype(np.uint8, copy=False)


def read_video(path, *, max_frames: int | None = None) -> tuple[np.ndarray, float]:
    """(frames uint8 (T, H, W, 3), fps). Images are 1-frame videos with fps 0 (GIFs: from their delays)."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise VideoReadError(path, "no such file")
    if os.path.getsize(path) == 0:
        raise VideoReadError(path, "file is empty")
    ext = os.path.splitext(path)[1].lower()
    try:
        frames, fps = (_read_image(path, max_frames) if ext in IMAGE_EXTS else _read_av(path, max_frames))
    except VideoReadError:
        raise
    except Exception as e:  # FFmpeg / Pillow errors for corrupt or truncated data
        raise VideoReadError(path, f"{type(e).__name__}: {e}") from e
    if not frames:
        raise VideoReadError(path, "no decodable frames (zero-frame or truncated video)")
    shapes = {f.shape for f in frames}
    if len(shapes) != 1:
        raise VideoReadError(path, f"frames change size mid-stream: {sorted(shapes)}")
    return np.stack(frames), float(fps)


def _read_av(path, max_frames):
    import av

    frames = []
    with av.open(path) as container:
        if not container.streams.video:
            raise VideoReadError(path, "no video stream")
        stream = container.streams.video[0]
        rate = stream.average_rate or stream.guessed_rate or stream.base_rate
        fps = float(rate) if rate else 0.0
        for frame in container.decode(stream):
            frames.append(frame.to_ndarray(format="rgb24"))
            if max_frames is not None and len(frames) >= max_frames:
                break
    return frames, fps


def _read_image(path, max_frames):
    from PIL import Image, ImageSequence

    frames, durations = [], []
    with Image.open(path) as im:
        for frame in ImageSequence.Iterator(im):
            durations.append(frame.info.get("duration", 0) or 0)
            # Pillow's RGBA/LA/P -> RGB/L conversions drop alpha without compositing.
            gray = frame.mode in ("1", "L", "LA", "I", "I;16", "F")
            a = np.asarray(frame.convert("L" if gray else "RGB"))
            frames.append(_to_rgb(a))
            if max_frames is not None and len(frames) >= max_frames:
                break
    mean_ms = float(np.mean(durations)) if durations else 0.0
    fps = 1000.0 / mean_ms if len(frames) > 1 and mean_ms > 0 else 0.0
    return frames, fps


def _check_frames(frames) -> np.ndarray:
    frames = np.asarray(frames)
    if frames.ndim == 3:
        frames = frames[None]
    if frames.ndim != 4 or frames.shape[-1] not in (1, 3, 4) or frames.shape[0] == 0:
        raise ValueError(f"frames must be (T, H, W, 3) with T >= 1, got shape {frames.shape}")
    if frames.dtype != np.uint8:
        raise ValueError(f"frames must be uint8, got {frames.dtype}")
    return _to_rgb(frames)


def write_video(path, frames, fps: float = 8.0) -> str:
    """Writes frames (uint8 (T, H, W, 3)) by extension; returns the path."""
    path = os.fspath(path)
    frames = _check_frames(frames)
    ext = os.path.splitext(path)[1].lower()
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    if ext == ".mp4":
        _write_mp4(path, frames, fps)
    elif ext == ".gif":
        from PIL import Image

        images = [Image.fromarray(f) for f in frames]
        images[0].save(path, save_all=True, append_images=images[1:], loop=0,
                       duration=max(20, int(round(1000.0 / max(fps, 1e-3)))), optimize=False, disposal=1)
    elif ext == ".png":
        from PIL import Image

        Image.fromarray(frames[0] if len(frames) == 1 else contact_sheet(frames)).save(path)
    else:
        raise ValueError(f"write_video: unsupported extension {ext!r} for {path!r} (use .mp4, .gif or .png)")
    return path


def _write_mp4(path, frames, fps):
    import av

    t, h, w, _ = frames.shape
    # yuv420p subsamples chroma by 2, so x264 needs even sizes: repeat the last row / column.
    frames = np.pad(frames, ((0, 0), (0, h % 2), (0, w % 2), (0, 0)), mode="edge")
    rate = Fraction(fps).limit_denominator(1001) if fps > 0 else Fraction(8)
    with av.open(path, mode="w") as container:
        stream = container.add_stream("libx264", rate=rate)
        stream.width, stream.height = frames.shape[2], frames.shape[1]
        stream.pix_fmt = "yuv420p"
        stream.options = {"crf": "12", "preset": "veryfast"}
        for f in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(f, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def contact_sheet(frames, cols: int | None = None, pad: int = 1, pad_value: int = 255) -> np.ndarray:
    """All frames of a (T, H, W, 3) array in one image, `cols` per row, `pad` pixels apart."""
    frames = _check_frames(frames)
    t, h, w, _ = frames.shape
    cols = int(cols or min(t, max(1, int(np.ceil(np.sqrt(t))))))
    rows = -(-t // cols)
    sheet = np.full((rows * (h + pad) - pad, cols * (w + pad) - pad, 3), pad_value, np.uint8)
    for i, f in enumerate(frames):
        r, c = divmod(i, cols)
        sheet[r * (h + pad): r * (h + pad) + h, c * (w + pad): c * (w + pad) + w] = f
    return sheet
