"""Video I/O: round trips (odd sizes included), bad files, grayscale and alpha GIFs."""

import numpy as np
import pytest
from PIL import Image

from sora_jax.data import video_io
from sora_jax.data.toy_world import ToyWorld
from sora_jax.data.video_io import VideoReadError, contact_sheet, read_video, write_video


def _frames(t, h, w, seed=0):
    """Smooth moving blocks: x264 and GIF palettes keep these close to exact."""
    rng = np.random.default_rng(seed)
    out = np.zeros((t, h, w, 3), np.uint8)
    colors = rng.integers(0, 256, (3, 3))
    for i in range(t):
        out[i, :, :] = colors[0]
        out[i, h // 4: h // 2, (i * 2) % w: (i * 2) % w + w // 3] = colors[1]
        out[i, h // 2:, : w // 4] = colors[2]
    return out


@pytest.mark.parametrize("t,h,w", [(5, 32, 48), (3, 17, 33), (1, 16, 16), (9, 40, 96)])
def test_mp4_round_trip(tmp_path, t, h, w):
    frames = _frames(t, h, w)
    path = write_video(tmp_path / "v.mp4", frames, fps=12.0)
    back, fps = read_video(path)
    assert fps == pytest.approx(12.0)
    assert back.shape == (t, h + h % 2, w + w % 2, 3)  # odd sizes padded to even
    err = np.abs(back[:, :h, :w].astype(int) - frames.astype(int)).mean()
    assert err < 4.0, err
    assert read_video(path, max_frames=2)[0].shape[0] == min(2, t)


@pytest.mark.parametrize("t,h,w", [(4, 24, 40), (2, 15, 9)])
def test_gif_round_trip(tmp_path, t, h, w):
    frames = _frames(t, h, w, seed=1)
    back, fps = read_video(write_video(tmp_path / "v.gif", frames, fps=10.0))
    assert back.shape == frames.shape and fps == pytest.approx(10.0)
    assert np.abs(back.astype(int) - frames.astype(int)).max() <= 8  # few colours: near-exact palette


def test_png_single_frame_and_contact_sheet(tmp_path):
    frames = _frames(5, 12, 20)
    one, fps = read_video(write_video(tmp_path / "one.png", frames[:1]))
    np.testing.assert_array_equal(one[0], frames[0])
    assert fps == 0.0
    sheet, _ = read_video(write_video(tmp_path / "sheet.png", frames))
    np.testing.assert_array_equal(sheet[0], contact_sheet(frames))
    s = contact_sheet(frames, cols=2, pad=1)
    assert s.shape == (3 * 13 - 1, 2 * 21 - 1, 3)
    np.testing.assert_array_equal(s[13:25, 21:41], frames[3])


def test_toy_world_video_round_trip(tmp_path):
    video = ToyWorld(seed=0)[1]["video"]
    back, _ = read_video(write_video(tmp_path / "toy.mp4", video, fps=8.0))
    assert back.shape == video.shape
    assert np.abs(back.astype(int) - video.astype(int)).mean() < 6.0


def test_bad_files_raise_naming_the_path(tmp_path):
    missing = tmp_path / "missing.mp4"
    with pytest.raises(VideoReadError, match="missing.mp4"):
        read_video(missing)
    corrupt = tmp_path / "corrupt.mp4"
    corrupt.write_bytes(b"\x00\x00\x00\x18ftypmp42" + bytes(range(256)) * 4)
    with pytest.raises(VideoReadError, match="corrupt.mp4") as info:
        read_video(corrupt)
    assert isinstance(info.value, ValueError) and info.value.path == str(corrupt)
    empty = tmp_path / "empty.webm"
    empty.write_bytes(b"")
    with pytest.raises(VideoReadError, match="empty.webm"):
        read_video(empty)
    good = write_video(tmp_path / "good.mp4", _frames(9, 32, 32), fps=8.0)
    truncated = tmp_path / "truncated.mp4"
    truncated.write_bytes(open(good, "rb").read()[:200])
    with pytest.raises(VideoReadError, match="truncated.mp4"):
        read_video(truncated)
    import av

    zero = tmp_path / "zero.mp4"  # a valid container whose video stream has no frames
    with av.open(str(zero), mode="w") as container:
        stream = container.add_stream("libx264", rate=8)
        stream.width = stream.height = 16
        stream.pix_fmt = "yuv420p"
    with pytest.raises(VideoReadError, match="zero.mp4"):
        read_video(zero)
    bad_gif = tmp_path / "bad.gif"
    bad_gif.write_bytes(b"GIF89a" + b"\x01" * 20)
    with pytest.raises(VideoReadError, match="bad.gif"):
        read_video(bad_gif)


def test_grayscale_and_rgba_gifs_become_rgb(tmp_path):
    gray = [Image.fromarray(np.full((10, 14), v, np.uint8), mode="L") for v in (30, 200)]
    gray[0].save(tmp_path / "gray.gif", save_all=True, append_images=gray[1:], duration=100, loop=0)
    frames, fps = read_video(tmp_path / "gray.gif")
    assert frames.shape == (2, 10, 14, 3) and frames.dtype == np.uint8 and fps == pytest.approx(10.0)
    assert (frames[0] == 30).all() and (frames[1] == 200).all()

    rgba = np.zeros((8, 12, 4), np.uint8)
    rgba[..., 0] = 220
    rgba[..., 3] = 255
    rgba[:, :6, 3] = 0  # left half transparent
    Image.fromarray(rgba, mode="RGBA").save(tmp_path / "alpha.gif")
    frames, _ = read_video(tmp_path / "alpha.gif")
    assert frames.shape == (1, 8, 12, 3)
    assert (frames[0, :, 6:, 0] == 220).all()  # opaque pixels keep their colour; alpha is dropped

    rgba_png = tmp_path / "alpha.png"
    Image.fromarray(rgba, mode="RGBA").save(rgba_png)
    frames, _ = read_video(rgba_png)
    assert frames.shape == (1, 8, 12, 3) and (frames[0, ..., 0] == 220).all()


def test_write_rejects_bad_input(tmp_path):
    with pytest.raises(ValueError, match="uint8"):
        write_video(tmp_path / "x.mp4", np.zeros((2, 8, 8, 3), np.float32))
    with pytest.raises(ValueError, match="unsupported extension"):
        write_video(tmp_path / "x.avi2", np.zeros((2, 8, 8, 3), np.uint8))
    assert video_io.VIDEO_EXTS and video_io.IMAGE_EXTS
