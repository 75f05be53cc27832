"""Bounded-memory VAE encode/decode: causal chunks in time, overlapping tiles in space.

Time. As in Wan 2.1's VAE, the first frame is encoded alone, then chunks of
`temporal_compression * chunk_latents` frames follow. Every causal layer keeps
the last frames it saw in a `CausalCache` (causal_conv.py) and reads them in place of
zero padding, so the chunked result equals the unchunked one up to float
rounding, and memory depends on the chunk length, not on the video length.
Decoding runs the same way, one latent frame (or `chunk_latents`) at a time.
Each chunk step is jitted once per shape (first chunk, full chunk, last chunk).

Space. Frames larger than `tile` (latent units) are cut into tiles that overlap
by `overlap` latent units; each tile is processed alone and the overlaps are
blended with linear ramps (a partition of unity), as diffusers/Wan do. Tiling is
an approximation: convolutions near a tile border see zeros instead of the
neighbouring pixels; the ramps hide the seams (see tests for the tolerance).
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from sora_jax.models.causal_conv import CausalCache
from sora_jax.models.vae import CausalVAE, check_video_shape


@nnx.jit
def _encode_first(model, x):
    cache = CausalCache()
    mean, logvar = model.encode(x, cache)
    return mean, logvar, cache.out


@nnx.jit
def _encode_next(model, x, entries):
    cache = CausalCache(entries)
    mean, logvar = model.encode(x, cache)
    return mean, logvar, cache.out


@nnx.jit
def _decode_first(model, z):
    cache = CausalCache()
    return model.decode(z, cache), cache.out


@nnx.jit
def _decode_next(model, z, entries):
    cache = CausalCache(entries)
    return model.decode(z, cache), cache.out


def encode_chunked(model: CausalVAE, video: jax.Array, chunk_latents: int = 1):
    """(mean, logvar) of `video` [B,T,H,W,3], computed chunk by chunk in time."""
    cfg = model.cfg
    check_video_shape(*video.shape[1:4], cfg)
    step = cfg.temporal_compression * chunk_latents
    mean, logvar, entries = _encode_first(model, video[:, :1])
    means, logvars = [mean], [logvar]
    for start in range(1, video.shape[1], step):
        mean, logvar, entries = _encode_next(model, video[:, start:start + step], entries)
        means.append(mean)
        logvars.append(logvar)
    return jnp.concatenate(means, axis=1), jnp.concatenate(logvars, axis=1)


def decode_chunked(model: CausalVAE, z: jax.Array, chunk_latents: int = 1) -> jax.Array:
    """Video [B,T,H,W,3] from latents [B,T',H',W',C], decoded chunk by chunk in time."""
    frames, entries = _decode_first(model, z[:, :1])
    out = [frames]
    for start in range(1, z.shape[1], chunk_latents):
        frames, entries = _decode_next(model, z[:, start:start + chunk_latents], entries)
        out.append(frames)
    return jnp.concatenate(out, axis=1)


# ----------------------------------------------------------------------------
# Spatial tiling
# ----------------------------------------------------------------------------
def _tile_starts(size: int, tile: int, overlap: int) -> list[int]:
    if size <= tile:
        return [0]
    stride = tile - overlap
    starts = list(range(0, size - tile, stride)) + [size - tile]
    return sorted(set(starts))


def _ramp(length: int, ramp_before: int, ramp_after: int) -> np.ndarray:
    """Weights in (0, 1]: rising over `ramp_before` cells, falling over `ramp_after`."""
    w = np.ones((length,), np.float32)
    if ramp_before:
        w[:ramp_before] = np.minimum(w[:ramp_before], (np.arange(ramp_before) + 1) / (ramp_before + 1))
    if ramp_after:
        w[length - ramp_after:] = np.minimum(w[length - ramp_after:], (ramp_after - np.arange(ramp_after)) / (ramp_after + 1))
    return w


def _tiled(fn: Callable, x: jax.Array, tile_in: int, overlap_in: int, scale: float) -> jax.Array:
    """Applies fn to overlapping (H, W) tiles of x [B,T,H,W,C] and blends the outputs.

    fn maps a tile of size s to one of size s*scale (in H and W). Overlaps are
    blended with ramps over the overlap region (in output units).
    """
    _, _, h, w, _ = x.shape
    hs, ws = _tile_starts(h, tile_in, overlap_in), _tile_starts(w, tile_in, overlap_in)
    out, weight = None, None
    for i, y0 in enumerate(hs):
        for j, x0 in enumerate(ws):
            th, tw = min(tile_in, h), min(tile_in, w)
            y = fn(x[:, :, y0:y0 + th, x0:x0 + tw])
            oh, ow = y.shape[2], y.shape[3]
            # Ramp only on sides that overlap a neighbour, over that overlap's length.
            def side(starts, k, size_in):
                before = (starts[k - 1] + size_in - starts[k]) if k > 0 else 0
                after = (starts[k] + size_in - starts[k + 1]) if k + 1 < len(starts) else 0
                return int(round(before * scale)), int(round(after * scale))
            wy = _ramp(oh, *side(hs, i, th))
            wx = _ramp(ow, *side(ws, j, tw))
            wt = jnp.asarray(wy[:, None] * wx[None, :])[None, None, :, :, None]
            if out is None:
                out = jnp.zeros(y.shape[:2] + (int(round(h * scale)), int(round(w * scale))) + y.shape[4:], y.dtype)
                weight = jnp.zeros((1, 1) + out.shape[2:4] + (1,), y.dtype)
            oy, ox = int(round(y0 * scale)), int(round(x0 * scale))
            out = out.at[:, :, oy:oy + oh, ox:ox + ow].add(y * wt)
            weight = weight.at[:, :, oy:oy + oh, ox:ox + ow].add(wt)
    return out / weight


def encode_tiled(model: CausalVAE, video: jax.Array, tile: int = 16, overlap: int = 4, chunk_latents: int | None = 1):
    """(mean, logvar) with spatial tiles of `tile` latent cells overlapping by `overlap` cells.

    chunk_latents=None encodes each tile in one pass instead of in time chunks.
    """
    sc = model.cfg.spatial_compression
    check_video_shape(*video.shape[1:4], model.cfg)

    def fn(v):
        if chunk_latents is None:
            m, lv = _encode_full(model, v)
        else:
            m, lv = encode_chunked(model, v, chunk_latents)
        return jnp.concatenate([m, lv], axis=-1)

    moments = _tiled(fn, video, tile * sc, overlap * sc, 1.0 / sc)
    return jnp.split(moments, 2, axis=-1)


def decode_tiled(model: CausalVAE, z: jax.Array, tile: int = 16, overlap: int = 4, chunk_latents: int | None = 1):
    """Video decoded from overlapping latent tiles of `tile` cells, blended over `overlap` cells."""
    sc = model.cfg.spatial_compression

    def fn(t):
        return _decode_full(model, t) if chunk_latents is None else decode_chunked(model, t, chunk_latents)

    return _tiled(fn, z, tile, overlap, float(sc))


@nnx.jit
def _encode_full(model, x):
    return model.encode(x)


@nnx.jit
def _decode_full(model, z):
    return model.decode(z)
