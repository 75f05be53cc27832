"""Attention pieces shared by the DiT and the text encoder: 3D RoPE, QK-norm, masks, one kernel call.

Everything that decides *which* kernel runs lives in `attend`, so a TPU
splash-attention kernel (which wants segment ids rather than a dense mask) can be
dropped in there without touching the models. Masks are built once per forward
pass, outside the layer scan, and shared by every layer.

3D RoPE. head_dim is split among the (t, h, w) axes as in Wan 2.1:
  h and w get 2 * (head_dim // 6) channels each, t gets the rest
  (head_dim 64 -> t 24, h 20, w 20; head_dim 72 -> 24, 24, 24).
Each axis rotates its channels by angles position * theta^(-2i/d_axis). We use
the "half split" layout (channel i pairs with channel i + d/2 inside each axis
block), which is cheaper than interleaving and has the same relative property:
<R(p) q, R(p') k> depends only on p - p'.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

from sora_jax import sharding


def rope_split(head_dim: int) -> tuple[int, int, int]:
    """Channels of each head given to the (t, h, w) rotations; each is even."""
    if head_dim % 2 or head_dim < 6:
        raise ValueError(f"3D RoPE needs an even head_dim >= 6, got {head_dim}")
    hw = 2 * (head_dim // 6)
    t = head_dim - 2 * hw
    if t % 2:  # head_dim = 6k + 2m keeps t even; this is a guard for odd leftovers
        raise ValueError(f"3D RoPE split of head_dim {head_dim} gives an odd t block ({t})")
    return t, hw, hw


def rope_angles(positions: jax.Array, head_dim: int, theta: float) -> tuple[jax.Array, jax.Array]:
    """cos and sin tables [B, L, head_dim // 2] for int positions [B, L, 3] (t, h, w).

    Columns are in (t, h, w) blocks of `rope_split` / 2, each with its own frequencies. The
    angles come from one [3, head_dim // 2] frequency table that is zero outside each axis's
    block (products with zero are exact, so each angle is one product, as per block); one cos
    and one sin then run over aligned rows instead of three unaligned blocks to concatenate
    (bench-small, thunk time per step: 4.5 ms in a profile before, 0.5-2 ms in three after). The frequencies are rounded once from float64.
    """
    freqs = np.zeros((3, head_dim // 2), np.float32)
    start = 0
    for axis, dim in enumerate(rope_split(head_dim)):
        freqs[axis, start : start + dim // 2] = float(theta) ** (-np.arange(0, dim, 2) / dim)
        start += dim // 2
    ang = jnp.sum(positions.astype(jnp.float32)[..., :, None] * freqs, axis=-2)
    return jnp.cos(ang), jnp.sin(ang)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array, head_dim: int) -> jax.Array:
    """Rotates x [B, L, N, head_dim] by the 3D RoPE tables (computed in fp32, cast back).

    Channel i of the first half pairs with channel i of the second half, and pair i turns by
    table column i, whose (t, h, w) block `rope_angles` sets. The pairs of one axis are thus
    not adjacent, which changes nothing that a learned q/k projection can express, and the
    rotation is two slices at head_dim / 2: earlier versions paired inside each axis block,
    which on XLA:CPU cut every head into six slices of 10-12 channels (unaligned, scalar code;
    RoPE's forward and backward fusions in the ~420 ms bench-small step: 14 -> 7.7 thunk-ms).
    """
    dtype = x.dtype
    x = x.astype(jnp.float32)
    c, s = cos[:, :, None, :], sin[:, :, None, :]
    a, b = x[..., : head_dim // 2], x[..., head_dim // 2 :]
    return jnp.concatenate([a * c - b * s, a * s + b * c], -1).astype(dtype)


class RMSNorm(nnx.Module):
    """RMSNorm over the last axis with a learned scale; used for QK-norm (per head_dim)."""

    def __init__(self, dim: int, *, names=("kv",), eps: float = 1e-6, param_dtype=jnp.float32):
        self.eps = eps
        self.scale = nnx.Param(sharding.partitioned(nnx.initializers.ones, names)(None, (dim,), param_dtype))

    def __call__(self, x):
        dtype = x.dtype
        x = x.astype(jnp.float32)
        x = x * jax.lax.rsqrt(jnp.mean(x * x, -1, keepdims=True) + self.eps)
        return (x * self.scale[...].astype(jnp.float32)).astype(dtype)


def segment_mask(q_segments: jax.Array, kv_segments: jax.Array) -> jax.Array:
    """Boolean [B, 1, Lq, Lk]: a query may see a key only with the same segment id."""
    return (q_segments[:, :, None] == kv_segments[:, None, :])[:, None]


def attend(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array | None) -> jax.Array:
    """The one attention call: q [B,Lq,N,H], k/v [B,Lk,N,H], mask broadcastable to [B,N,Lq,Lk].

    On GPU, `jax.nn.dot_product_attention(implementation=None)` picks cuDNN flash
    attention where it applies. Elsewhere (CPU, and TPU until a splash-attention
    kernel is dropped in here) we use `recompute_attention`, whose backward keeps
    no [Lq, Lk] tensor alive between the passes.
    """
    if jax.default_backend() == "gpu":
        return jax.nn.dot_product_attention(q, k, v, mask=mask, implementation=None)
    return recompute_attention(q, k, v, mask)


def recompute_attention(q, k, v, mask):
    """Softmax attention with a FlashAttention-style backward, in plain XLA ops.

    The autodiff of a textbook softmax saves the [B,N,Lq,Lk] probabilities (and
    more) for the backward pass. On CPU, writing and re-reading those costs far
    more than their few FLOPs: in the bench-small DiT step, attention took ~25%
    of the time for ~10% of the FLOPs. This version saves only q, k, v, the
    output and the softmax row max and sum, recomputes the probabilities in the backward
    pass and uses dS = P * (dP - rowsum(dO * O)), so no [Lq, Lk] reduction is
    needed there. Scores and softmax run in fp32 whatever the compute dtype.
    Fully masked rows get a uniform softmax, like jax.nn.dot_product_attention.
    """
    swap = lambda a: jnp.swapaxes(a, 1, 2)  # [B,L,N,H] <-> [B,N,L,H]
    return swap(_attention(swap(q), swap(k), swap(v), mask))


def _scores(a, b, mask):
    """fp32 scores a b^T / sqrt(head_dim) for a [.., La, H], b [.., Lb, H]; masked entries -1e30.

    The scale goes on the operand a rather than on the [La, Lb] product, where XLA:CPU ran it as
    a pass of its own over the scores (bench-small forward: ~2.4 thunk-ms per step). That is
    exact for a power-of-two scale (head_dim 16, 64, 256) and one rounding of a in fp32; a bf16
    operand with another scale keeps it on the fp32 product, as its rounding would be 2^-8.
    (The backward's dS keeps its own scale: folding it into v for dP made the YNN fusion that
    forms dS slower, 17.5 -> 24 thunk-ms in one profile each.)
    """
    scale = a.shape[-1] ** -0.5
    on_operand = a.dtype == jnp.float32 or math.log2(scale).is_integer()
    if on_operand:
        a = a * jnp.asarray(scale, a.dtype)
    s = jnp.einsum("bnqh,bnkh->bnqk", a, b, preferred_element_type=jnp.float32)
    s = s if on_operand else s * scale
    return s if mask is None else jnp.where(mask, s, jnp.float32(-1e30))


@jax.custom_vjp
def _attention(q, k, v, mask):
    return _attention_fwd(q, k, v, mask)[0]


def _attention_fwd(q, k, v, mask):
    s = _scores(q, k, mask)
    m = jnp.max(s, -1, keepdims=True)
    p = jnp.exp(s - m)
    row_sum = jnp.sum(p, -1, keepdims=True)
    o = (jnp.einsum("bnqk,bnkh->bnqh", p.astype(v.dtype), v, preferred_element_type=jnp.float32) / row_sum)
    o = o.astype(q.dtype)
    # Named so a remat policy can keep them (dit.remat_policy "minimal"): otherwise remat
    # re-runs this whole forward in the backward pass just to rebuild these residuals.
    o, m, row_sum = (checkpoint_name(a, "attention_out") for a in (o, m, row_sum))
    # The row max and sum are kept apart (not as one log-sum-exp): m + log(sum) would lose the
    # log(sum) against the -1e30 fill of a fully masked row.
    return o, (q, k, v, mask, o, m, row_sum)


def _attention_bwd(res, do):
    # Runs on the transposed scores S^T = K Q^T ([.., Lk, Lq]): then dV = P^T dO and dK = dS^T Q are
    # plain (NN) batched matmuls and only dQ = (dS^T)^T K contracts a leading axis. With S itself,
    # dV and dK both would: XLA:CPU runs those transposed-operand batched dots in Eigen at about
    # half the rate. bench-small's attention (4x320x6x64) forward+backward, medians of 40:
    # 11.2 -> 10.0 and 11.9 -> 10.7 ms unmasked; with a 2-segment mask 10.2 -> 10.7 and
    # 11.5 -> 11.6 ms (a small loss: the masked scores do not form the fused YNN kernel anyway).
    q, k, v, mask, o, m, row_sum = res
    scale = q.shape[-1] ** -0.5
    mask_t = None if mask is None else jnp.swapaxes(mask, -1, -2)
    s_t = _scores(k, q, mask_t)
    p_t = jnp.exp(s_t - jnp.swapaxes(m, -1, -2)) / jnp.swapaxes(row_sum, -1, -2)
    dv = jnp.einsum("bnkq,bnqh->bnkh", p_t.astype(do.dtype), do, preferred_element_type=jnp.float32)
    dp_t = jnp.einsum("bnkh,bnqh->bnkq", v, do, preferred_element_type=jnp.float32)
    delta = jnp.sum(do.astype(jnp.float32) * o.astype(jnp.float32), -1, keepdims=True)
    ds_t = p_t * (dp_t - jnp.swapaxes(delta, -1, -2)) * scale
    if mask_t is not None:  # a fully masked row has uniform p but no path to q or k
        ds_t = jnp.where(mask_t, ds_t, 0.0)
    ds_t = ds_t.astype(q.dtype)
    dk = jnp.einsum("bnkq,bnqh->bnkh", ds_t, q, preferred_element_type=jnp.float32)
    dq = jnp.einsum("bnkq,bnkh->bnqh", ds_t, k, preferred_element_type=jnp.float32)
    return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), None


_attention.defvjp(_attention_fwd, _attention_bwd)


# --- the small layers both transformers are built from ------------------------


class Dense(nnx.Module):
    """x[..., in] @ W[in, *out_shape] + b, with logical names on W and b.

    A multi-axis output (e.g. (3, heads, head_dim) for a fused QKV projection)
    keeps the head axis visible to the sharding rules. Math runs in `dtype`
    (the compute dtype); the parameters stay in `param_dtype`.
    """

    def __init__(self, in_features: int, out_shape, names, *, rngs: nnx.Rngs, zero_init: bool = False,
                 use_bias: bool = True, dtype=jnp.float32, param_dtype=jnp.float32):
        out_shape = tuple(out_shape) if isinstance(out_shape, (tuple, list)) else (int(out_shape),)
        if len(names) != 1 + len(out_shape):
            raise ValueError(f"Dense: names {names} do not match kernel rank {1 + len(out_shape)}")
        n_out = len(out_shape)
        init = nnx.initializers.zeros if zero_init else nnx.initializers.xavier_uniform(
            in_axis=0, out_axis=tuple(range(1, 1 + n_out)))
        self.kernel = nnx.Param(sharding.partitioned(init, names)(rngs.params(), (in_features, *out_shape), param_dtype))
        self.bias = (nnx.Param(sharding.partitioned(nnx.initializers.zeros, names[1:])(None, out_shape, param_dtype))
                     if use_bias else None)
        self.n_out, self.dtype, self.names = n_out, dtype, tuple(names)

    def __call__(self, x):
        # Weights stored sharded over "fsdp" are gathered before the matmul (see
        # sharding.gather_for_compute: FSDP, and the way round an XLA partitioner bug).
        w = sharding.gather_for_compute(self.kernel[...], self.names)
        b = None if self.bias is None else sharding.gather_for_compute(self.bias[...], self.names[1:])
        return project(x.astype(self.dtype), w, b)


def project(x: jax.Array, w: jax.Array, b: jax.Array | None = None) -> jax.Array:
    """x[..., in] @ w[in, *out] (+ b[*out]), computed in x's dtype; w and b keep theirs.

    On CPU this goes through `_project_cpu`, a custom VJP written for XLA:CPU:
    - every matmul of both passes takes x's dtype and accumulates in fp32; the bias is
      added, and the bias and weight gradients are summed, in fp32. Plain autodiff of
      `x @ w.astype(bf16)` instead runs a bf16 dot with a bf16 result, which misses the
      AMX kernels (0.25 against 1.5 TFLOP/s at 2048^3), hands the backward dots fp32
      cotangents so they run in fp32, and reduces the bias gradient in bf16 through
      slow reduce-windows (bench-small DiT in bf16 on an AMX machine: 1.05 -> 0.71 s);
    - the weight gradient sum_l x[l, i] dy[l, o] is written so that XLA:CPU picks a
      kernel that copies neither operand transposed (see _project_cpu_bwd; bench-small
      fp32 step ~0.91 -> ~0.79 s).
    GPU and TPU keep plain autodiff: their bf16 dots accumulate in fp32 inside the
    kernels and their layouts are chosen differently.
    """
    if jax.default_backend() != "cpu":
        y = jax.lax.dot_general(x, w.astype(x.dtype), (((x.ndim - 1,), (0,)), ((), ())))
        return y if b is None else y + b.astype(x.dtype)
    return _project_cpu_nobias(x, w) if b is None else _project_cpu(x, w, b)


def _contract(a, b, dims):
    return jax.lax.dot_general(a, b, (dims, ((), ())), preferred_element_type=jnp.float32)


@jax.custom_vjp
def _project_cpu(x, w, b):
    return _project_cpu_fwd(x, w, b)[0]


def _project_cpu_fwd(x, w, b):
    y = _contract(x, w.astype(x.dtype), ((x.ndim - 1,), (0,))) + b.astype(jnp.float32)
    return y.astype(x.dtype), (x, w, b)


def _project_cpu_bwd(res, dy):
    x, w, b = res
    out_axes = tuple(range(x.ndim - 1, dy.ndim))
    db = jnp.sum(dy.astype(jnp.float32), tuple(range(x.ndim - 1)))
    dy = dy.astype(x.dtype)
    dx = _contract(dy, w.astype(x.dtype), (out_axes, tuple(range(1, w.ndim))))
    # The weight gradient from rows flattened, x2 [N, in] and dy2 [N, out]. In fp32 a 2-D dot
    # that contracts both operands' major axis runs in XLA:CPU's Eigen dot with no transposed
    # copy; plain autodiff's (dy^T x)^T instead copies dy transposed, 4x wider than x for an
    # MLP's first layer (weight-gradient dots 13-16 -> 6 ms at 1280x384x1536). Eigen has no
    # bf16 kernel (XLA upcasts such a dot to fp32, and the mirrored dy-first form fails to run:
    # "Unsupported element type for DotThunk"), so bf16 adds a unit axis, which keeps the dot
    # on YNNPACK with its AMX kernels.
    x2 = x.reshape(-1, x.shape[-1])
    dy2 = dy.reshape(x2.shape[0], -1)
    if x.dtype == jnp.float32:
        dw = _contract(x2, dy2, ((0,), (0,)))
    else:
        dw = _contract(x2[None], dy2[None], ((0, 1), (0, 1)))
    return dx.astype(x.dtype), dw.reshape(w.shape).astype(w.dtype), db.astype(b.dtype)


_project_cpu.defvjp(_project_cpu_fwd, _project_cpu_bwd)


# Without a bias (the VAE's conv taps): no zero bias added to every output and no bias gradient.
@jax.custom_vjp
def _project_cpu_nobias(x, w):
    return _project_cpu_nobias_fwd(x, w)[0]


def _project_cpu_nobias_fwd(x, w):
    return _contract(x, w.astype(x.dtype), ((x.ndim - 1,), (0,))).astype(x.dtype), (x, w)


def _project_cpu_nobias_bwd(res, dy):
    x, w = res
    dx, dw, _ = _project_cpu_bwd((x, w, jnp.zeros((), jnp.float32)), dy)
    return dx, dw


_project_cpu_nobias.defvjp(_project_cpu_nobias_fwd, _project_cpu_nobias_bwd)


def layer_norm(x: jax.Array, eps: float = 1e-6) -> jax.Array:
    """LayerNorm without learned affine (adaLN supplies scale and shift), computed in fp32."""
    dtype = x.dtype
    x = x.astype(jnp.float32)
    mean = jnp.mean(x, -1, keepdims=True)
    var = jnp.mean(jnp.square(x - mean), -1, keepdims=True)
    return ((x - mean) * jax.lax.rsqrt(var + eps)).astype(dtype)
