"""The VAE's patch-level pieces: pixel (un)shuffle and the linear patch shortcut.

`space_to_depth` / `depth_to_space` fold p x p pixel blocks into channels and back
(config `model.input_patch`). `PatchShortcut` is the linear path between a
(tc, sc, sc) pixel patch and its latent cell around the deep encoder and decoder
(`model.patch_shortcut`); its decoder paints either the cell's own block ("cell") or
a tent-windowed, overlap-added patch twice that size ("tent",
`model.shortcut_decoder`). All of it is spatial or per latent frame, so causality and
chunked processing (models/vae_chunked.py) are unchanged.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from sora_jax import sharding
from sora_jax.models.flop_count import add_flops


def space_to_depth(x: jax.Array, p: int) -> jax.Array:
    """(B, T, H, W, C) -> (B, T, H/p, W/p, p*p*C), each p x p pixel block to channels (row-major)."""
    if p == 1:
        return x
    b, t, h, w, c = x.shape
    x = x.reshape(b, t, h // p, p, w // p, p, c).transpose(0, 1, 2, 4, 3, 5, 6)
    return x.reshape(b, t, h // p, w // p, p * p * c)


def depth_to_space(x: jax.Array, p: int) -> jax.Array:
    """The inverse of `space_to_depth`."""
    if p == 1:
        return x
    b, t, h, w, c = x.shape
    x = x.reshape(b, t, h, w, p, p, c // (p * p)).transpose(0, 1, 2, 4, 3, 5, 6)
    return x.reshape(b, t, h * p, w * p, c // (p * p))


class PatchShortcut(nnx.Module):
    """Linear maps between a (tc, sc, sc) pixel patch and its latent cell, around the deep nets.

    Why: the deep encoder/decoder start far from even a linear code, and on the toy
    world the first quickstart VAE stayed below an 8x8 average-pool baseline for
    hundreds of steps. With these paths the VAE starts as a learnt linear patch
    autoencoder (in the spirit of DC-AE's space-to-channel residual shortcuts) and the
    deep networks learn what the linear code misses. Both are causal strided 3D convs
    (kernel = stride = (tc, sc, sc)): latent frame j sees pixel frames 4j-3..4j, frame 0
    sees zeros before itself exactly as the causal convolutions do, so chunking holds.
    """

    def __init__(self, cfg, *, rngs: nnx.Rngs):
        self.tc, self.sc = cfg.temporal_compression, cfg.spatial_compression
        self.tent = cfg.shortcut_decoder == "tent"
        patch = self.tc * self.sc * self.sc * 3
        out = patch * (4 if self.tent else 1)  # tent: a (tc, 2sc, 2sc, 3) patch per cell
        c = cfg.latent_channels
        kin = nnx.initializers.variance_scaling(1.0, "fan_in", "truncated_normal")
        self.enc_kernel = nnx.Param(sharding.partitioned(kin, ("conv_in", "conv_out"))(rngs.params(), (patch, 2 * c)))
        self.dec_kernel = nnx.Param(sharding.partitioned(nnx.initializers.zeros_init(), ("conv_in", "conv_out"))(
            rngs.params(), (c, out)))
        self.dec_bias = nnx.Param(sharding.partitioned(nnx.initializers.zeros_init(), ("conv_out",))(
            rngs.params(), (out,)))

    def encode(self, x: jax.Array, first: bool) -> jax.Array:
        """(B, T, H, W, 3) -> (B, T', H/sc, W/sc, 2C); `first`: x starts at frame 0 of the video."""
        tc, sc = self.tc, self.sc
        if first:  # frame 0 is a group of its own: pad it with the zeros the causal convs see
            x = jnp.concatenate([jnp.zeros((x.shape[0], tc - 1) + x.shape[2:], x.dtype), x], axis=1)
        b, t, h, w, ch = x.shape
        x = x.reshape(b, t // tc, tc, h // sc, sc, w // sc, sc, ch).transpose(0, 1, 3, 5, 2, 4, 6, 7)
        x = x.reshape(b, t // tc, h // sc, w // sc, tc * sc * sc * ch)
        add_flops(2 * x.size * self.enc_kernel.shape[1])
        return x @ self.enc_kernel[...].astype(x.dtype)

    def decode(self, z: jax.Array, first: bool) -> jax.Array:
        """(B, T', h, w, C) -> (B, T, h*sc, w*sc, 3); the inverse layout of `encode`."""
        tc, sc = self.tc, self.sc
        b, t, h, w, _ = z.shape
        y = z @ self.dec_kernel[...].astype(z.dtype) + self.dec_bias[...].astype(z.dtype)
        add_flops(2 * z.size * self.dec_kernel.shape[1])
        if self.tent:
            y = tent_overlap_add(y.reshape(b, t, h, w, tc, 2 * sc, 2 * sc, 3), sc)
        else:
            y = y.reshape(b, t, h, w, tc, sc, sc, 3)
        y = y.transpose(0, 1, 4, 2, 5, 3, 6, 7).reshape(b, t * tc, h * sc, w * sc, 3)
        return y[:, tc - 1:] if first else y


def tent_overlap_add(patches: jax.Array, sc: int) -> jax.Array:
    """(B, T, h, w, tc, 2sc, 2sc, 3) patches, each centred on its cell -> (B, T, h, w, tc, sc, sc, 3).

    Each patch is weighted by a separable tent (1 at its centre, ~0 at its rim) and added
    to its neighbours'; the sum is divided by the summed weights, which are 1 everywhere
    but within half a cell of the frame border. Spatial only, so causality is untouched.
    """
    tent = 1.0 - jnp.abs(jnp.arange(2 * sc) + 0.5 - sc) / sc
    win = (tent[:, None] * tent[None, :]).astype(patches.dtype)[:, :, None]  # (2sc, 2sc, 1)

    def ola(p):  # p (B, T, h, w, tc, 2sc, 2sc, c): overlap-add on a grid offset by half a cell
        out = 0.0
        for a in range(2):
            for e in range(2):
                part = p[:, :, :, :, :, a * sc:(a + 1) * sc, e * sc:(e + 1) * sc]
                out = out + jnp.pad(part, ((0, 0),) * 2 + ((a, 1 - a), (e, 1 - e)) + ((0, 0),) * 4)
        b, t, h1, w1, tc = out.shape[:5]
        full = out.transpose(0, 1, 4, 2, 5, 3, 6, 7).reshape(b, t, tc, h1 * sc, w1 * sc, -1)
        full = full[:, :, :, sc // 2: sc // 2 + (h1 - 1) * sc, sc // 2: sc // 2 + (w1 - 1) * sc]
        return full.reshape(b, t, tc, h1 - 1, sc, w1 - 1, sc, -1).transpose(0, 1, 3, 5, 2, 4, 6, 7)

    b, t, h, w, tc = patches.shape[:5]
    weight = ola(jnp.broadcast_to(win, (1, 1, h, w, 1) + win.shape))
    return ola(patches * win) / weight
