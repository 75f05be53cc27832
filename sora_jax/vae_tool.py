"""Encode a video file to latents, or decode latents back to a video file.

  python -m sora_jax.vae_tool encode IN.mp4 OUT.npz --workdir=DIR [--step=N]
  python -m sora_jax.vae_tool decode IN.npz OUT.mp4 --workdir=DIR [--fps=8]

The .npz holds `latents` (T', H', W', C) float32 (normalised with the workdir's
latent_stats.json), `fps` and `pixel_shape`. Input frames are cropped (centre)
to T = 1 + 4k and H, W multiples of the VAE's spatial stride.
"""

from __future__ import annotations

import argparse
import sys

import numpy as np


def _crop(frames: np.ndarray, tc: int, sc: int) -> np.ndarray:
    t = 1 + (len(frames) - 1) // tc * tc
    h, w = frames.shape[1] // sc * sc, frames.shape[2] // sc * sc
    if h == 0 or w == 0:
        raise ValueError(f"frames of {frames.shape[1]}x{frames.shape[2]} are smaller than the VAE stride {sc}")
    y0, x0 = (frames.shape[1] - h) // 2, (frames.shape[2] - w) // 2
    return frames[:t, y0:y0 + h, x0:x0 + w]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m sora_jax.vae_tool", description=__doc__.split("\n")[0])
    p.add_argument("mode", choices=["encode", "decode"])
    p.add_argument("src")
    p.add_argument("dst")
    p.add_argument("--workdir", required=True, help="a trained vae workdir (checkpoint + latent_stats.json)")
    p.add_argument("--step", type=int, default=None)
    p.add_argument("--fps", type=float, default=0.0, help="decode: output fps (default: the one stored)")
    p.add_argument("--tile", type=int, default=None, help="latent tile size for large frames")
    args = p.parse_args(argv)

    from sora_jax.data import video_io
    from sora_jax.models.vae_api import VAEHandle

    # One video: run time, not compiles, dominates, so keep the checkpoint's (faster) convolutions.
    handle = VAEHandle.from_workdir(args.workdir, step=args.step, tile=args.tile, conv_impl=None)
    if args.mode == "encode":
        frames, fps = video_io.read_video(args.src)
        frames = _crop(np.asarray(frames), handle.cfg.temporal_compression, handle.cfg.spatial_compression)
        z = np.asarray(handle.encode(frames))
        np.savez(args.dst, latents=z.astype(np.float32), fps=np.float32(fps or 8.0), pixel_shape=np.array(frames.shape))
        print(f"{args.src}: {frames.shape} -> latents {z.shape} in {args.dst}")
    else:
        with np.load(args.src) as f:
            if "latents" not in f:
                raise ValueError(f"{args.src}: no 'latents' array (write it with `vae_tool encode`)")
            z, fps = f["latents"], float(f["fps"]) if "fps" in f else 8.0
        video = np.asarray(handle.decode(z))
        frames = np.round((video + 1.0) * 127.5).astype(np.uint8)
        video_io.write_video(args.dst, frames, fps=args.fps or fps)
        print(f"{args.src}: latents {z.shape} -> {frames.shape} in {args.dst}")
    return 0


if __name__ == "__main__":
    from sora_jax import hugepages

    hugepages.reexec_with_hugepages()  # before JAX starts: see sora_jax/hugepages.py
    sys.exit(main())
