"""Causal 3D VAE: the video compression network (images are 1-frame videos).

Layout is NDHWC throughout: video (B, T, H, W, 3) in [-1, 1] -> latent (B, T', H', W', C).

Causality. Every temporal convolution sees only the past: the (kt - 1) frames
before frame 0 are zeros (zero padding, as in Wan 2.1; replicate padding would
make an image depend on its own content twice). Temporal downsampling passes
the first frame through on its own and then convolves (kernel 3, stride 2) the
frames [2j-2, 2j-1, 2j] into output frame j, so T = 1 + 4k frames become
1 + k latent frames and a 1-frame video is encoded exactly like an image.
The decoder mirrors this: temporal upsampling keeps frame 0 and turns each
later latent frame into two. Norms are RMSNorm over channels (per position):
GroupNorm would mix statistics across time and break causality and chunking.

Chunked encoding (models/vae_chunked.py) reuses these very modules: each causal
layer reads the frames it needs from a `CausalCache` (models/causal_conv.py) instead
of zero padding, so the chunked and unchunked paths run the same code.

FLOPs: `vae_forward_flops` counts convolutions and attention matmuls
analytically (1 multiply-add = 2 FLOPs) from the shapes each layer sees.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx
from jax import lax

from sora_jax import sharding
# CausalCache and CausalConv3d are used here and re-exported (vae.CausalConv3d, vae.CausalCache).
from sora_jax.models.causal_conv import CONV_IMPLS, CausalCache, CausalConv3d
from sora_jax.models.flop_count import add_flops as _add_flops
from sora_jax.models.flop_count import count_flops
from sora_jax.models.vae_patching import PatchShortcut, depth_to_space, space_to_depth

ACT = ("activation_batch", "activation_frames", "activation_height", "activation_width", "activation_channels")

# ----------------------------------------------------------------------------
# Configuration
# ----------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class VAEConfig:
    base_width: int = 32
    channel_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 1
    decoder_res_blocks: int = 2  # Wan uses num_res_blocks + 1 in the decoder
    latent_channels: int = 16
    temporal_compression: int = 4
    mid_attention: bool = True
    # Levels (0 = the finest, as channel_mult) that also get per-frame attention after their res
    # blocks, in the encoder and the mirrored decoder level: a layer that sees the whole frame,
    # where a 3x3x3 conv sees its neighbours (the mid block's attention is at the coarsest level).
    level_attention: tuple[int, ...] = ()
    # "taps" (sums of per-tap matmuls: faster on XLA:CPU, docs/vae.md) | "xla" (lax.conv_general_dilated,
    # which GPUs and TPUs run as their own tuned convolutions) | "auto" ("taps" on CPU, "xla" elsewhere).
    conv_impl: str = "auto"
    patch_shortcut: bool = True  # linear (4x8x8 patch <-> latent cell) paths around both networks
    # Pixel (un)shuffle of p x p pixels to channels before the encoder and after the decoder
    # (as LTX-Video's VAE): the convolutions then start at H/p with wider channels, which
    # costs less at full resolution and keeps the matmuls wide enough to run well on CPU.
    input_patch: int = 1
    # How the decoder's shortcut paints a latent cell: "cell" = its own (tc, sc, sc) block
    # (so independent per-cell latent errors come out as flat blocks with seams: the 8x8 grid
    # of early samples), "tent" = a (tc, 2sc, 2sc) patch under a tent window, overlap-added
    # with its neighbours (bilinear blending, continuous across cell borders).
    shortcut_decoder: str = "cell"
    logvar_clip: tuple[float, float] = (-30.0, 20.0)
    # Activations and matmul operands of the encoder and decoder networks ("float32" | "bfloat16").
    # Parameters stay in their own dtype (fp32), matmuls accumulate in fp32, the patch shortcut,
    # the moments and the decoded video are fp32.
    compute_dtype: str = "float32"

    @property
    def spatial_compression(self) -> int:
        return self.input_patch * 2 ** (len(self.channel_mult) - 1)

    @property
    def temporal_down(self) -> tuple[bool, ...]:
        """Which level transitions halve time: the last log2(temporal_compression) ones."""
        n = len(self.channel_mult) - 1
        k = int(round(math.log2(self.temporal_compression)))
        return (False,) * (n - k) + (True,) * k

    def __post_init__(self):
        n = len(self.channel_mult) - 1
        tc = self.temporal_compression
        if n < 1:
            raise ValueError(f"model.channel_mult needs >= 2 levels, got {self.channel_mult}")
        if tc < 1 or tc & (tc - 1) or math.log2(tc) > n:
            raise ValueError(f"model.temporal_compression={tc} must be a power of two <= 2**{n}")
        if self.input_patch < 1:
            raise ValueError(f"model.input_patch must be >= 1, got {self.input_patch}")
        if self.shortcut_decoder not in ("cell", "tent"):
            raise ValueError(f"model.shortcut_decoder must be 'cell' or 'tent', got {self.shortcut_decoder!r}")
        if self.shortcut_decoder == "tent" and self.spatial_compression % 2:
            raise ValueError(f"model.shortcut_decoder='tent' needs an even spatial compression, got {self.spatial_compression}")
        if self.compute_dtype not in ("float32", "bfloat16"):
            raise ValueError(f"model.compute_dtype must be 'float32' or 'bfloat16', got {self.compute_dtype!r}")
        if any(not 0 <= i <= n for i in self.level_attention):
            raise ValueError(f"model.level_attention={self.level_attention}: levels must be in 0..{n}")
        if self.conv_impl not in CONV_IMPLS:
            raise ValueError(f"model.conv_impl must be one of {CONV_IMPLS}, got {self.conv_impl!r}")


def vae_config(cfg: Any) -> VAEConfig:
    """Builds a VAEConfig from a ConfigDict / dict / VAEConfig (unknown keys are ignored)."""
    if isinstance(cfg, VAEConfig):
        return cfg
    src = dict(cfg.to_dict() if hasattr(cfg, "to_dict") else (cfg or {}))
    kw = {}
    for f in dataclasses.fields(VAEConfig):
        if f.name in src and src[f.name] is not None:
            v = src[f.name]
            kw[f.name] = tuple(v) if isinstance(v, (list, tuple)) else v
    if "decoder_res_blocks" not in kw:
        kw["decoder_res_blocks"] = int(kw.get("num_res_blocks", VAEConfig.num_res_blocks)) + 1
    return VAEConfig(**kw)


def check_video_shape(t: int, h: int, w: int, cfg: VAEConfig) -> None:
    tc, sc = cfg.temporal_compression, cfg.spatial_compression
    if t < 1 or (t - 1) % tc or h % sc or w % sc:
        raise ValueError(
            f"video (T,H,W)=({t},{h},{w}) unsupported: need T = 1 + {tc}k and H, W divisible by {sc}"
        )


# ----------------------------------------------------------------------------
# Layers (the causal convolution itself: models/causal_conv.py)
# ----------------------------------------------------------------------------
class RMSNorm(nnx.Module):
    """Per-position RMS norm over channels (causal and chunk-safe)."""

    def __init__(self, dim: int, *, rngs: nnx.Rngs):
        self.scale = nnx.Param(sharding.partitioned(nnx.initializers.ones_init(), ("norm",))(rngs.params(), (dim,)))

    def __call__(self, x):
        ms = jnp.mean(jnp.square(x.astype(jnp.float32)), axis=-1, keepdims=True)
        return (x * lax.rsqrt(ms + 1e-6).astype(x.dtype)) * self.scale[...].astype(x.dtype)


class ResBlock(nnx.Module):
    def __init__(self, cin: int, cout: int, *, impl: str = "xla", rngs: nnx.Rngs):
        self.norm1 = RMSNorm(cin, rngs=rngs)
        self.conv1 = CausalConv3d(cin, cout, impl=impl, rngs=rngs)
        self.norm2 = RMSNorm(cout, rngs=rngs)
        self.conv2 = CausalConv3d(cout, cout, impl=impl, rngs=rngs)
        self.shortcut = CausalConv3d(cin, cout, (1, 1, 1), rngs=rngs) if cin != cout else None

    def __call__(self, x, cache=None):
        h = self.conv1(jax.nn.silu(self.norm1(x)), cache)
        h = self.conv2(jax.nn.silu(self.norm2(h)), cache)
        skip = self.shortcut(x) if self.shortcut is not None else x
        return sharding.constrain(skip + h, ACT)


class FrameAttention(nnx.Module):
    """Single-head self-attention within each frame (causal by construction)."""

    def __init__(self, dim: int, *, rngs: nnx.Rngs):
        self.norm = RMSNorm(dim, rngs=rngs)
        self.qkv = CausalConv3d(dim, 3 * dim, (1, 1, 1), rngs=rngs)
        self.proj = CausalConv3d(dim, dim, (1, 1, 1), zero_init=True, rngs=rngs)

    def __call__(self, x, cache=None):
        b, t, h, w, c = x.shape
        q, k, v = jnp.split(self.qkv(self.norm(x)).reshape(b * t, h * w, 3 * c), 3, axis=-1)
        logits = jnp.einsum("bqc,bkc->bqk", q, k, preferred_element_type=jnp.float32) / math.sqrt(c)
        p = jax.nn.softmax(logits, -1).astype(x.dtype)
        o = jnp.einsum("bqk,bkc->bqc", p, v, preferred_element_type=jnp.float32).astype(x.dtype)
        _add_flops(2 * 2 * b * t * (h * w) ** 2 * c)
        return x + self.proj(o.reshape(b, t, h, w, c))


class TimeDownsample(nnx.Module):
    """Frame 0 passes through; output j >= 1 = conv(frames 2j-2, 2j-1, 2j) (kernel 3, stride 2)."""

    def __init__(self, dim: int, *, rngs: nnx.Rngs):
        self.conv = CausalConv3d(dim, dim, (3, 1, 1), rngs=rngs)

    def __call__(self, x, cache=None):
        if cache is None:
            if x.shape[1] == 1:
                return x
            return jnp.concatenate([x[:, :1], self._strided(x)], axis=1)
        if cache.first:  # the first chunk is frame 0 alone
            cache.write(x[:, -1:])
            return x
        xx = jnp.concatenate([cache.read(None), x], axis=1)
        cache.write(xx[:, -1:])
        return self._strided(xx)

    def _strided(self, x):
        # A valid (unpadded) kernel-3 stride-2 conv over frames that start at 2j-2.
        w = self.conv.kernel[...].astype(x.dtype)
        b, t, hh, ww, c = x.shape
        y = lax.conv_general_dilated(x, w, (2, 1, 1), "VALID", dimension_numbers=("NDHWC", "DHWIO", "NDHWC"))
        _add_flops(2 * math.prod(y.shape) * 3 * c)
        return y + self.conv.bias[...].astype(y.dtype)


class TimeUpsample(nnx.Module):
    """Frame 0 passes through; each later frame becomes 2 (a causal conv to 2C channels, interleaved)."""

    def __init__(self, dim: int, *, rngs: nnx.Rngs):
        self.conv = CausalConv3d(dim, 2 * dim, (3, 1, 1), rngs=rngs)

    def __call__(self, x, cache=None):
        y = self.conv(x, cache)
        b, t, h, w, c2 = y.shape
        y = y.reshape(b, t, h, w, 2, c2 // 2).transpose(0, 1, 4, 2, 3, 5).reshape(b, 2 * t, h, w, c2 // 2)
        if cache is None:
            return jnp.concatenate([x[:, :1], y[:, 2:]], axis=1)
        return x if cache.first else y


class SpatialDown(nnx.Module):
    def __init__(self, dim: int, *, rngs: nnx.Rngs):
        self.conv = CausalConv3d(dim, dim, (1, 3, 3), stride=2, rngs=rngs)

    def __call__(self, x, cache=None):
        return self.conv(x)


class SpatialUp(nnx.Module):
    """Nearest 2x, then a 3x3 conv that halves channels (as Wan)."""

    def __init__(self, dim: int, out: int, *, impl: str = "xla", rngs: nnx.Rngs):
        self.conv = CausalConv3d(dim, out, (1, 3, 3), impl=impl, rngs=rngs)

    def __call__(self, x, cache=None):
        x = jnp.repeat(jnp.repeat(x, 2, axis=2), 2, axis=3)
        return self.conv(x)


# ----------------------------------------------------------------------------
# Encoder, decoder, VAE
# ----------------------------------------------------------------------------
def _mid(dim, cfg, rngs):
    layers = [ResBlock(dim, dim, impl=cfg.conv_impl, rngs=rngs)]
    if cfg.mid_attention:
        layers.append(FrameAttention(dim, rngs=rngs))
    layers.append(ResBlock(dim, dim, impl=cfg.conv_impl, rngs=rngs))
    return layers


class Encoder(nnx.Module):
    def __init__(self, cfg: VAEConfig, *, rngs: nnx.Rngs):
        widths = [cfg.base_width * m for m in cfg.channel_mult]
        self.patch = cfg.input_patch
        self.conv_in = CausalConv3d(3 * self.patch ** 2, widths[0], impl=cfg.conv_impl, rngs=rngs)
        layers, cin = [], widths[0]
        for i, cout in enumerate(widths):
            for _ in range(cfg.num_res_blocks):
                layers.append(ResBlock(cin, cout, impl=cfg.conv_impl, rngs=rngs))
                cin = cout
            if i in cfg.level_attention:
                layers.append(FrameAttention(cout, rngs=rngs))
            if i < len(widths) - 1:
                layers.append(SpatialDown(cout, rngs=rngs))
                if cfg.temporal_down[i]:
                    layers.append(TimeDownsample(cout, rngs=rngs))
        self.layers = nnx.List(layers + _mid(cin, cfg, rngs))
        self.norm_out = RMSNorm(cin, rngs=rngs)
        self.conv_out = CausalConv3d(cin, 2 * cfg.latent_channels, impl=cfg.conv_impl, rngs=rngs)
        self.quant = CausalConv3d(2 * cfg.latent_channels, 2 * cfg.latent_channels, (1, 1, 1), rngs=rngs)

    def __call__(self, x, cache=None):
        x = sharding.constrain(self.conv_in(space_to_depth(x, self.patch), cache), ACT)
        for layer in self.layers:
            x = layer(x, cache)
        x = self.conv_out(jax.nn.silu(self.norm_out(x)), cache)
        return self.quant(x)


class Decoder(nnx.Module):
    def __init__(self, cfg: VAEConfig, *, rngs: nnx.Rngs):
        widths = [cfg.base_width * m for m in reversed(cfg.channel_mult)]
        time_up = tuple(reversed(cfg.temporal_down))
        self.post_quant = CausalConv3d(cfg.latent_channels, cfg.latent_channels, (1, 1, 1), rngs=rngs)
        self.conv_in = CausalConv3d(cfg.latent_channels, widths[0], impl=cfg.conv_impl, rngs=rngs)
        layers, cin = _mid(widths[0], cfg, rngs), widths[0]
        for i, cout in enumerate(widths):
            for _ in range(cfg.decoder_res_blocks):
                layers.append(ResBlock(cin, cout, impl=cfg.conv_impl, rngs=rngs))
                cin = cout
            if len(widths) - 1 - i in cfg.level_attention:
                layers.append(FrameAttention(cout, rngs=rngs))
            if i < len(widths) - 1:
                if time_up[i]:
                    layers.append(TimeUpsample(cout, rngs=rngs))
                layers.append(SpatialUp(cout, cout // 2, impl=cfg.conv_impl, rngs=rngs))
                cin = cout // 2
        self.layers = nnx.List(layers)
        self.norm_out = RMSNorm(cin, rngs=rngs)
        self.patch = cfg.input_patch
        self.conv_out = CausalConv3d(cin, 3 * self.patch ** 2, impl=cfg.conv_impl, out_axis=None, rngs=rngs)

    def __call__(self, z, cache=None):
        x = sharding.constrain(self.conv_in(self.post_quant(z), cache), ACT)
        for layer in self.layers:
            x = layer(x, cache)
        return depth_to_space(self.conv_out(jax.nn.silu(self.norm_out(x)), cache), self.patch)


class CausalVAE(nnx.Module):
    """encode(video [B,T,H,W,3] in [-1,1]) -> (mean, logvar); decode(z) -> video."""

    def __init__(self, cfg: Any, *, rngs: nnx.Rngs):
        self.cfg = vae_config(cfg)
        self.encoder = Encoder(self.cfg, rngs=rngs)
        self.decoder = Decoder(self.cfg, rngs=rngs)
        self.shortcut = PatchShortcut(self.cfg, rngs=rngs) if self.cfg.patch_shortcut else None

    def encode(self, video: jax.Array, cache: CausalCache | None = None):
        if cache is None:
            check_video_shape(*video.shape[1:4], self.cfg)
        video = sharding.constrain(video, ACT)
        moments = self.encoder(video.astype(self.cfg.compute_dtype), cache).astype(jnp.float32)
        if self.shortcut is not None:
            moments = moments + self.shortcut.encode(video, first=cache is None or cache.first)
        mean, logvar = jnp.split(moments, 2, axis=-1)
        return mean, jnp.clip(logvar, *self.cfg.logvar_clip)

    def decode(self, z: jax.Array, cache: CausalCache | None = None) -> jax.Array:
        z = sharding.constrain(z, ACT)
        video = self.decoder(z.astype(self.cfg.compute_dtype), cache).astype(jnp.float32)
        if self.shortcut is not None:
            video = video + self.shortcut.decode(z, first=cache is None or cache.first)
        return video

    def __call__(self, video: jax.Array, key: jax.Array | None = None):
        """Reconstruction, mean, logvar; samples the posterior when a key is given."""
        mean, logvar = self.encode(video)
        z = mean if key is None else mean + jnp.exp(0.5 * logvar) * jax.random.normal(key, mean.shape, mean.dtype)
        return self.decode(z), mean, logvar


def with_conv_impl(model: CausalVAE, impl: str) -> CausalVAE:
    """A copy of `model` (same parameter arrays) whose convolutions all run as `impl`.

    Why: "taps" runs faster but compiles ~2x slower than "xla" (tests check that they agree),
    so code that compiles once per one-off shape (the training stage's evals) uses "xla"."""
    copy = nnx.clone(model)
    copy.cfg = dataclasses.replace(copy.cfg, conv_impl=impl)
    for _, module in nnx.iter_modules(copy):
        if isinstance(module, CausalConv3d):
            module.impl = impl
    return copy


def latent_shape(cfg: Any, t: int, h: int, w: int) -> tuple[int, int, int, int]:
    cfg = vae_config(cfg)
    check_video_shape(t, h, w, cfg)
    sc = cfg.spatial_compression
    return (1 + (t - 1) // cfg.temporal_compression, h // sc, w // sc, cfg.latent_channels)


def pixel_shape(cfg: Any, t: int, h: int, w: int) -> tuple[int, int, int, int]:
    cfg = vae_config(cfg)
    sc = cfg.spatial_compression
    return (1 + (t - 1) * cfg.temporal_compression, h * sc, w * sc, 3)


def kl_divergence(mean: jax.Array, logvar: jax.Array) -> jax.Array:
    """KL(N(mean, exp(logvar)) || N(0, 1)) summed over channels, per latent position (B, T, H, W)."""
    return 0.5 * jnp.sum(jnp.square(mean) + jnp.exp(logvar) - 1.0 - logvar, axis=-1)


def vae_forward_flops(cfg: Any, t: int, h: int, w: int, batch: int = 1) -> dict:
    """Analytic forward FLOPs of encode and decode for a (t, h, w) video (convs + attention matmuls)."""
    cfg = vae_config(cfg)
    with nnx.use_eager_sharding(False):
        graphdef, state = nnx.split(nnx.eval_shape(lambda: CausalVAE(cfg, rngs=nnx.Rngs(0))))
    lt, lh, lw, lc = latent_shape(cfg, t, h, w)
    with count_flops() as enc:
        jax.eval_shape(lambda s, v: nnx.merge(graphdef, s).encode(v), state,
                       jax.ShapeDtypeStruct((batch, t, h, w, 3), jnp.float32))
    with count_flops() as dec:
        jax.eval_shape(lambda s, z: nnx.merge(graphdef, s).decode(z), state,
                       jax.ShapeDtypeStruct((batch, lt, lh, lw, lc), jnp.float32))
    return {"encode": enc["flops"], "decode": dec["flops"]}
