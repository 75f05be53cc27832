"""The causal 3D convolution of the VAE, and the cache that carries its past between chunks.

Causal in time: the (kt - 1) frames before the first are zeros, or, in chunked
processing (models/vae_chunked.py), the last frames of the previous chunk read from
a `CausalCache`. So chunked and unchunked encoding run the same layer code.

On XLA:CPU `impl="taps"` computes the convolution as sums of per-tap matmuls
(attention.project), which runs faster than lax.conv_general_dilated for the VAE's
narrow (32-128 channel) layers; `impl="xla"` is lax's convolution (GPU, TPU).
"""

from __future__ import annotations

import math
from typing import Sequence

import jax
import jax.numpy as jnp
from flax import nnx
from jax import lax

from sora_jax import sharding
from sora_jax.models.attention import project
from sora_jax.models.flop_count import add_flops as _add_flops

CONV_AXES = ("kernel_t", "kernel_h", "kernel_w", "conv_in", "conv_out")
CONV_IMPLS = ("auto", "taps", "xla")


# ----------------------------------------------------------------------------
# Causal cache for chunked processing (see vae_chunked.py)
# ----------------------------------------------------------------------------
class CausalCache:
    """Frames carried between chunks, one entry per causal layer, in call order.

    `entries=None` means "first chunk": layers use zero padding (exactly what
    the unchunked path does) and record what the next chunk will need.
    """

    def __init__(self, entries: Sequence[jax.Array] | None = None):
        self.first = entries is None
        self._in = list(entries) if entries is not None else None
        self.out: list[jax.Array] = []

    def read(self, default):
        return default if self.first else self._in[len(self.out)]

    def write(self, value: jax.Array) -> None:
        self.out.append(value)


# ----------------------------------------------------------------------------
# Layers
# ----------------------------------------------------------------------------
def _conv_init():
    return nnx.initializers.variance_scaling(1.0, "fan_in", "truncated_normal")


# _taps uses shifted outputs when the padded input has at most this many times the
# output's positions (video frames; small or single-frame inputs waste too much matmul on
# padding). With kw folded into the contraction, bench vae in alternating runs: 17x64x64 and
# 17x32x32 and 17x128x128 run at the same speed with 1.3, 2 or always (within run-to-run
# noise) while 2 lowers peak RSS ~10-22% against 1.3; a 1x256x256 image (ratio >= 3 from
# the causal time padding) encodes at 3.0-3.3 fps with 2 but 1.9 fps always.
_SHIFTED_OUTPUT_MAX_OVERHEAD = 2.0


class CausalConv3d(nnx.Module):
    """(kt, kh, kw) convolution, causal in time, 'same' (or 2x down) in space.

    kt == 1 folds time into the batch and runs a 2D convolution (faster on CPU
    and exact). Spatial stride 2 pads (0, 1) like Wan / SD so H -> H/2.
    """

    def __init__(self, cin, cout, kernel=(3, 3, 3), *, stride=1, zero_init=False, impl="xla", out_axis="conv_out",
                 rngs: nnx.Rngs):
        # out_axis=None for tiny outputs (the 3 RGB channels): they cannot split over fsdp.
        self.kernel_size = tuple(kernel)
        self.impl = impl
        self.stride = stride
        init = nnx.initializers.zeros_init() if zero_init else _conv_init()
        axes = CONV_AXES[:-1] + (out_axis,)
        self.kernel = nnx.Param(sharding.partitioned(init, axes)(rngs.params(), (*self.kernel_size, cin, cout)))
        self.bias = nnx.Param(sharding.partitioned(nnx.initializers.zeros_init(), (out_axis,))(rngs.params(), (cout,)))

    def _spatial_pad(self):
        kh, kw = self.kernel_size[1:]
        if self.stride == 1:
            return ((kh // 2, kh // 2), (kw // 2, kw // 2))
        return ((0, 1), (0, 1))

    def __call__(self, x: jax.Array, cache: CausalCache | None = None) -> jax.Array:
        kt, kh, kw = self.kernel_size
        w = self.kernel[...]  # the taps' project() casts it to x's dtype itself and keeps dw in fp32
        if kt > 1:
            zeros = jnp.zeros((x.shape[0], kt - 1) + x.shape[2:], x.dtype)
            past = zeros if cache is None else cache.read(zeros)
            x = jnp.concatenate([past, x], axis=1)
            if cache is not None:
                cache.write(x[:, -(kt - 1):])
        b, t = x.shape[:2]
        impl = self.impl if self.impl != "auto" else ("taps" if jax.default_backend() == "cpu" else "xla")
        if impl == "taps" and self.stride == 1 and kh * kw > 1:
            y = self._taps(x, w)
        elif kt == 1:
            w = w.astype(x.dtype)
            y = lax.conv_general_dilated(
                x.reshape((b * t,) + x.shape[2:]), w[0], (self.stride, self.stride), self._spatial_pad(),
                dimension_numbers=("NHWC", "HWIO", "NHWC"))
            y = y.reshape((b, t) + y.shape[1:])
        else:
            w = w.astype(x.dtype)
            y = lax.conv_general_dilated(
                x, w, (1, self.stride, self.stride), ((0, 0),) + self._spatial_pad(),
                dimension_numbers=("NDHWC", "DHWIO", "NDHWC"))
        _add_flops(2 * math.prod(y.shape) * kt * kh * kw * w.shape[3])
        return y + self.bias[...].astype(y.dtype)

    def _taps(self, x, w):
        # Sum over kernel taps of (shifted input) @ (cin, cout): on XLA:CPU this runs
        # ~1.3x faster than conv_general_dilated for these narrow (32-128 channel) convs.
        # Every matmul is attention.project, whose CPU custom VJP (the DiT's projections') takes
        # each weight gradient as one dot over the rows, without a transposed copy.
        kt, kh, kw = self.kernel_size
        (ph0, ph1), (pw0, pw1) = self._spatial_pad()
        x = jnp.pad(x, ((0, 0), (0, 0), (ph0, ph1), (pw0, pw1), (0, 0)))
        t, h, wd = x.shape[1] - kt + 1, x.shape[2] - kh + 1, x.shape[3] - kw + 1
        cout = w.shape[-1]
        if x.shape[-1] * kt * kh * kw <= 128:
            # Few input channels (the RGB input conv): one matmul over all taps (im2col). Per-tap
            # matmuls with 3-wide contractions are mostly overhead; this made encode ~20% faster.
            # The columns are built one kernel axis at a time (w, then h, then t): one concat of
            # 27 three-channel slices writes 12-byte runs and took 29 ms at 17x64x64 on XLA:CPU,
            # three concats of 3 ever-wider slices take 4-5 ms. Channel order (a, b, c, cin)
            # matches w.reshape(-1, cout).
            cols = jnp.concatenate([x[:, :, :, c:c + wd] for c in range(kw)], -1)
            cols = jnp.concatenate([cols[:, :, b:b + h] for b in range(kh)], -1)
            cols = jnp.concatenate([cols[:, a:a + t] for a in range(kt)], -1)
            return project(cols, w.reshape(-1, cout))
        if cout * kt * kh * kw <= 128:
            # Few output channels (the RGB output conv): one matmul gives every tap's
            # contribution at every input position, then the taps are summed as shifted
            # slices of that small result instead of shifted copies of the wide input.
            z = project(x, jnp.moveaxis(w, 3, 0).reshape(x.shape[-1], -1))
            z = z.reshape(z.shape[:4] + (kt, kh, kw, cout))
            y = 0.0
            for a in range(kt):
                for b in range(kh):
                    for c in range(kw):
                        y = y + z[:, a:a + t, b:b + h, c:c + wd, a, b, c]
            return y
        if math.prod(x.shape[1:4]) <= _SHIFTED_OUTPUT_MAX_OVERHEAD * t * h * wd:
            return self._shifted_output_taps(x, w, t, h, wd)
        taps = _split_taps(w, kt * kh * kw)
        y = 0.0
        for a in range(kt):
            for b in range(kh):
                for c in range(kw):
                    y = y + project(x[:, a:a + t, b:b + h, c:c + wd], taps[(a * kh + b) * kw + c])
        return y

    def _shifted_output_taps(self, x, w, t, h, wd):
        # Each tap (below: each row of kw taps) multiplies the whole padded input, flattened
        # over (t, h, w), and its result is added at that tap's flat offset; the rows that
        # wrap across an edge land only in the padding columns, which the final crop drops. This trades the per-tap strided
        # copies of the input (27 per 3x3x3 conv; slice copies were 154 of 366 thunk-ms in
        # vae-small encode) for matmuls over (padded / output) times as many rows.
        kt, kh, kw = self.kernel_size
        bsz, tp, hp, wp, cin = x.shape
        n = t * hp * wp
        tail = (kh - 1) * wp + kw - 1
        xf = jnp.pad(x.reshape(bsz, tp * hp * wp, cin), ((0, 0), (0, tail), (0, 0)))
        # The kw taps of a row are folded into the contraction: kw shifted copies of the flat
        # input side by side (kw*cin channels) turn kt*kh*kw thin (cin x cout) matmuls into
        # kt*kh ones with a kw-times deeper contraction. At cin=32 the thin matmuls were
        # memory-bound (~60 GF/s); bench vae 17x64x64 in alternating runs: encode 67-73 ->
        # 91-105 fps, decode 36-39 -> 46-50 fps, peak RSS 1333 -> 1070 MiB. Folding kh too
        # (9x the input copied) was slower: 71-73 / 30 fps.
        length = tp * hp * wp + (kh - 1) * wp
        cols = jnp.concatenate([xf[:, c:c + length] for c in range(kw)], -1)
        rows = _split_taps(w, kt * kh)  # rows[a * kh + b] = w[a, b] as (kw * cin, cout)
        y = 0.0
        for a in range(kt):
            for b in range(kh):
                off = (a * hp + b) * wp
                z = project(cols, rows[a * kh + b])
                y = y + z[:, off:off + n]
        return y.reshape(bsz, t, hp, wp, -1)[:, :, :h, :wd]


def _split_taps(w: jax.Array, n: int) -> list[jax.Array]:
    """The kernel (kt, kh, kw, cin, cout) as n equal matrices, in (t, h, w) order (n = kt*kh*kw:
    one per tap, (cin, cout); n = kt*kh: one per row of kw taps, (kw*cin, cout)).

    Split, not indexed: the gradient of w[a, b, c] is a zero-padded copy of the whole kernel per
    tap, summed (27 operands per 3x3x3 conv: ~35 ms of a 260 ms quick-config training step on the
    2-core AMX Xeon); the gradient of a split is one concatenate.
    """
    parts = jnp.split(w.reshape(n, -1, w.shape[-1]), n)
    return [p[0] for p in parts]

