"""VAEHandle: the encode/decode API used by latent caching and the samplers.

  handle = VAEHandle.from_workdir("/tmp/vae_quick")      # trained VAE + latent_stats.json
  z = handle.encode(frames_uint8)        # (T,H,W,3) uint8 or (B,T,H,W,3) float [-1,1] -> normalised latents
  video = handle.decode(z)               # float [-1, 1], (B,T,H,W,3) (or (T,H,W,3) for an unbatched input)

Latents are the posterior means, normalised per channel with the training
statistics: (z - mean) / std. Videos longer than `chunk_frames` go through the
chunked causal path (memory bounded in duration); frames larger than `tile`
latent cells go through overlapping tiles. Each path is jitted once per shape, with the
fast-compiling "xla" convolutions unless `conv_impl` says otherwise.
"""

from __future__ import annotations

from typing import Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from sora_jax.models import vae as vae_lib
from sora_jax.models import vae_chunked


class VAEHandle:
    def __init__(self, model: vae_lib.CausalVAE, stats: Mapping | None = None, *, chunk_frames: int = 33,
                 tile: int | None = None, tile_overlap: int = 4, conv_impl: str | None = "xla"):
        # conv_impl (None = the checkpoint's): "xla" by default because the handle compiles once
        # per shape and, at the toy world's sizes, compiles dominate: caching 384 quickstart clips
        # of 25 shapes took 32 s with "xla", 105 s with "taps" (2-core CPU, 2026-12-03).
        self.model = model if conv_impl is None else vae_lib.with_conv_impl(model, conv_impl)
        self.cfg = self.model.cfg
        c = self.cfg.latent_channels
        stats = dict(stats or {"mean": [0.0] * c, "std": [1.0] * c})
        if len(stats["mean"]) != c or len(stats["std"]) != c:
            raise ValueError(f"latent stats have {len(stats['mean'])} channels, the VAE has {c}")
        self.stats = stats
        self._mean = jnp.asarray(stats["mean"], jnp.float32)
        self._std = jnp.asarray(stats["std"], jnp.float32)
        self.chunk_frames = int(chunk_frames)
        self.tile, self.tile_overlap = tile, int(tile_overlap)
        self._encode = nnx.jit(lambda m, v: m.encode(v)[0])
        self._decode = nnx.jit(lambda m, z: m.decode(z))

    @classmethod
    def from_workdir(cls, workdir: str, step: int | None = None, use_ema: bool = True, **kw) -> "VAEHandle":
        from sora_jax.stages.vae import read_latent_stats
        from sora_jax.train.checkpoint import restore_model

        config, model = restore_model(workdir, step=step, use_ema=use_ema)
        if config.stage != "vae":
            raise ValueError(f"{workdir}: stage is {config.stage!r}, not 'vae'")
        return cls(model, read_latent_stats(workdir), **kw)

    # --- shapes -----------------------------------------------------------------------------
    def latent_shape(self, t: int, h: int, w: int) -> tuple[int, int, int, int]:
        return vae_lib.latent_shape(self.cfg, t, h, w)

    def pixel_shape(self, t: int, h: int, w: int) -> tuple[int, int, int, int]:
        return vae_lib.pixel_shape(self.cfg, t, h, w)

    # --- encode / decode ------------------------------------------------------------------------
    def _too_big(self, h, w):
        return self.tile is not None and max(h, w) > self.tile

    def encode(self, video) -> jax.Array:
        video = np.asarray(video) if not isinstance(video, jax.Array) else video
        unbatched = video.ndim == 4
        if video.ndim not in (4, 5) or video.shape[-1] != 3:
            raise ValueError(f"VAEHandle.encode: expected (T,H,W,3) or (B,T,H,W,3), got {video.shape}")
        if video.dtype == np.uint8:
            video = video.astype(np.float32) / 127.5 - 1.0
        x = jnp.asarray(video, jnp.float32)
        if unbatched:
            x = x[None]
        t, h, w = x.shape[1:4]
        vae_lib.check_video_shape(t, h, w, self.cfg)
        sc = self.cfg.spatial_compression
        if self._too_big(h // sc, w // sc):
            z, _ = vae_chunked.encode_tiled(self.model, x, self.tile, self.tile_overlap,
                                            chunk_latents=1 if t > self.chunk_frames else None)
        elif t > self.chunk_frames:
            z, _ = vae_chunked.encode_chunked(self.model, x)
        else:
            z = self._encode(self.model, x)
        z = (z - self._mean) / self._std
        return z[0] if unbatched else z

    def decode(self, latents) -> jax.Array:
        z = jnp.asarray(latents, jnp.float32)
        unbatched = z.ndim == 4
        if z.ndim not in (4, 5) or z.shape[-1] != self.cfg.latent_channels:
            raise ValueError(f"VAEHandle.decode: expected (T',H',W',{self.cfg.latent_channels}) latents "
                             f"(optionally batched), got {z.shape}")
        if unbatched:
            z = z[None]
        z = z * self._std + self._mean
        t = z.shape[1]
        long = 1 + (t - 1) * self.cfg.temporal_compression > self.chunk_frames
        if self._too_big(*z.shape[2:4]):
            out = vae_chunked.decode_tiled(self.model, z, self.tile, self.tile_overlap, chunk_latents=1 if long else None)
        elif long:
            out = vae_chunked.decode_chunked(self.model, z)
        else:
            out = self._decode(self.model, z)
        out = jnp.clip(out, -1.0, 1.0)
        return out[0] if unbatched else out
