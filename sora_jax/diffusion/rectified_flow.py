"""Rectified flow on packed token batches: noising, time sampling, time shift, loss.

Conventions (SD3 / Open-Sora 2.0):
  x_t = (1 - t) x0 + t e,   t in [0, 1], t = 0 clean data, t = 1 pure noise.
  The network predicts the velocity  v = dx_t/dt = e - x0  (default), or the clean
  patches x0 (config.diffusion.prediction = "x0", the report's "predict the clean
  patches"); `to_velocity` converts either output into a velocity, for the loss
  (always on velocity) and for the samplers.

Time is per token ([B, L]). One example (a slot of a packed row) shares one noise
time, except its conditioning tokens, which get t = 0 and stay clean
(sora_jax/diffusion/conditioning.py). Everything here is pure jax.numpy and runs
inside the jitted train step.

Time shift (SD3): t' = a t / (1 + (a - 1) t). a > 1 pushes times towards noise,
which large inputs need: more tokens carry more redundant signal, so the same t
destroys less information. Open-Sora 2.0 sets a linearly from 1 at 256 tokens per
frame to 3 at 4096 tokens per frame, times sqrt(latent frames); we compute it per
example from its slot_shape, in training and in sampling alike.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import jax
import jax.numpy as jnp
import ml_collections

# Open-Sora 2.0's linear resolution rule (get_res_lin_function): (tokens, alpha) pairs.
SHIFT_BASE_TOKENS, SHIFT_BASE_ALPHA = 256.0, 1.0
SHIFT_MAX_TOKENS, SHIFT_MAX_ALPHA = 4096.0, 3.0


def default_diffusion_config() -> ml_collections.ConfigDict:
    """config.diffusion fields read by this module, conditioning.py and samplers.py."""
    return ml_collections.ConfigDict(
        dict(
            prediction="velocity",  # "velocity" (e - x0) | "x0" (loss still on velocity)
            x0_min_t=0.05,  # x0 prediction: clamp of t in v = (x_t - x0_hat) / t for the loss
            time_sampling="logit_normal",  # "logit_normal" | "uniform"
            logit_mean=0.0,  # m of the logit-normal (SD3: 0)
            logit_std=1.0,  # s of the logit-normal (SD3: 1)
            shift="resolution",  # "resolution" (Open-Sora 2.0 rule) | "constant" | "none"
            shift_value=1.0,  # a for shift="constant"
            weighting="per_example",  # "per_example" | "per_token"
            eval_times=(0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9),
            eval_seed=1234,
            caption_dropout=0.1,
            tasks=dict(t2v=1.0, i2v=0.0, extend_forward=0.0, extend_backward=0.0, loop=0.0, connect=0.0),
            max_cond_fraction=0.5,  # extension/connect give at most this fraction of frames
        )
    )


# --- time ------------------------------------------------------------------


def time_shift(t, alpha):
    """SD3 shift t' = a t / (1 + (a - 1) t); a = 1 is the identity, a > 1 moves t towards 1."""
    t = jnp.asarray(t, jnp.float32)
    alpha = jnp.asarray(alpha, jnp.float32)
    return alpha * t / (1.0 + (alpha - 1.0) * t)


def inverse_time_shift(t_shifted, alpha):
    """Inverse of `time_shift` (the shift with 1/a)."""
    return time_shift(t_shifted, 1.0 / jnp.asarray(alpha, jnp.float32))


def resolution_shift_alpha(tokens_per_frame, latent_frames):
    """Open-Sora 2.0's a: linear in tokens per frame (1 at 256, 3 at 4096) times sqrt(frames).

    `tokens_per_frame` counts spatial tokens (H * W in patch units); `latent_frames`
    counts latent frames. Below 256 tokens the line continues (a < 1 before the
    frame factor), as in Open-Sora; it stays positive for any tokens >= 1.
    """
    slope = (SHIFT_MAX_ALPHA - SHIFT_BASE_ALPHA) / (SHIFT_MAX_TOKENS - SHIFT_BASE_TOKENS)
    tokens = jnp.asarray(tokens_per_frame, jnp.float32)
    frames = jnp.maximum(jnp.asarray(latent_frames, jnp.float32), 1.0)
    return (SHIFT_BASE_ALPHA + slope * (tokens - SHIFT_BASE_TOKENS)) * jnp.sqrt(frames)


def shift_alpha(slot_shape, cfg: Mapping, patch_t: int = 1):
    """Per-slot shift a from slot_shape (..., 3) = (T, H, W) in patch units.

    Empty slots (shape 0) get a = 1. `patch_t` converts token frames to latent frames.
    """
    slot_shape = jnp.asarray(slot_shape)
    mode = cfg.get("shift", "resolution")
    if mode == "none":
        return jnp.ones(slot_shape.shape[:-1], jnp.float32)
    if mode == "constant":
        return jnp.full(slot_shape.shape[:-1], float(cfg.get("shift_value", 1.0)), jnp.float32)
    if mode != "resolution":
        raise ValueError(f"config.diffusion.shift must be 'resolution', 'constant' or 'none', got {mode!r}")
    t, h, w = slot_shape[..., 0], slot_shape[..., 1], slot_shape[..., 2]
    alpha = resolution_shift_alpha(h * w, t * patch_t)
    return jnp.where(t > 0, alpha, 1.0)


def sample_times(key, shape, cfg: Mapping):
    """Training times in (0, 1): logit-normal sigmoid(m + s n) (SD3) or uniform."""
    kind = cfg.get("time_sampling", "logit_normal")
    if kind == "logit_normal":
        n = jax.random.normal(key, shape)
        return jax.nn.sigmoid(float(cfg.get("logit_mean", 0.0)) + float(cfg.get("logit_std", 1.0)) * n)
    if kind == "uniform":
        return jax.random.uniform(key, shape, minval=1e-5, maxval=1.0 - 1e-5)
    raise ValueError(f"config.diffusion.time_sampling must be 'logit_normal' or 'uniform', got {kind!r}")


def per_token(slot_values, segment_ids, fill=0.0):
    """Gathers a per-slot value [B, K] to tokens [B, L] via segment ids (padding gets `fill`)."""
    idx = jnp.clip(segment_ids - 1, 0, slot_values.shape[1] - 1)
    vals = jnp.take_along_axis(slot_values, idx, axis=1)
    return jnp.where(segment_ids > 0, vals, jnp.asarray(fill, vals.dtype))


# --- the flow --------------------------------------------------------------


def interpolate(x0, noise, t):
    """x_t = (1 - t) x0 + t e with t [B, L] broadcast over the token features."""
    t = t[..., None]
    return (1.0 - t) * x0 + t * noise


def velocity_target(x0, noise):
    """The rectified-flow velocity dx_t/dt = e - x0; the loss is always taken in this space."""
    return noise - x0


def to_velocity(output, x_t, t, prediction: str, min_t: float = 1e-3):
    """Turns a network output into a velocity: x0 prediction gives v = (x_t - x0_hat) / t.

    The loss compares velocities whatever the network predicts ("x-prediction,
    v-loss", as in Li & He 2025, JiT): an x0 loss would weigh small t by t^2 less
    and, in our Gaussian-mixture test, leaves the sampler's last steps too blunt
    (collapsed variance). `min_t` clamps the division near t = 0 (training uses
    config.diffusion.x0_min_t, 0.05 by default, as JiT). In the sampler's last step
    from t >= min_t to 0, x_t - t v = x0_hat exactly.
    """
    if prediction == "velocity":
        return output
    if prediction == "x0":
        return (x_t - output) / jnp.maximum(t, min_t)[..., None]
    raise ValueError(f"config.diffusion.prediction must be 'velocity' or 'x0', got {prediction!r}")


def masked_loss(pred, tgt, loss_mask, segment_ids, num_slots: int, weighting: str = "per_example"):
    """Mean squared error over real, non-conditioning tokens, weighted per the config.

    Returns (scalar loss, per-slot loss [B, K], per-slot valid [B, K]).
      per_example: each example's loss is the mean over its own loss tokens; the
        batch loss is the mean over examples. An example's weight does not depend on
        its length or on its row-mates (packing and padding change nothing).
      per_token: every loss token weighs the same (long examples weigh more).
    """
    err = jnp.mean(jnp.square(pred.astype(jnp.float32) - tgt.astype(jnp.float32)), axis=-1)  # [B, L]
    onehot = _slot_loss_tokens(loss_mask, segment_ids, num_slots)
    err_sum = jnp.einsum("bl,blk->bk", err, onehot)
    count = jnp.sum(onehot, axis=1)
    valid = count > 0
    per_slot = err_sum / jnp.maximum(count, 1.0)
    if weighting == "per_example":
        loss = jnp.sum(jnp.where(valid, per_slot, 0.0)) / jnp.maximum(jnp.sum(valid), 1)
    elif weighting == "per_token":
        loss = jnp.sum(err_sum) / jnp.maximum(jnp.sum(count), 1.0)
    else:
        raise ValueError(f"config.diffusion.weighting must be 'per_example' or 'per_token', got {weighting!r}")
    return loss, per_slot, valid


def _slot_loss_tokens(loss_mask, segment_ids, num_slots: int):
    """[B, L, K] float: token l of row b is a loss token of slot k (real, not conditioning)."""
    mask = (loss_mask & (segment_ids > 0)).astype(jnp.float32)
    return jax.nn.one_hot(segment_ids - 1, num_slots, dtype=jnp.float32) * mask[..., None]


def loss_units(loss_mask, segment_ids, num_slots: int, weighting: str = "per_example"):
    """What masked_loss averages over, as a float count: examples that have a loss token
    (per_example) or loss tokens (per_token). The eval weights each batch by it."""
    count = jnp.sum(_slot_loss_tokens(loss_mask, segment_ids, num_slots), axis=1)  # [B, K], as masked_loss
    return jnp.sum(count) if weighting == "per_token" else jnp.sum((count > 0).astype(jnp.float32))


def token_noise(seed: int, slot_index, segment_ids, positions, dim: int):
    """Noise that depends only on (seed, example index, token position), not on packing.

    The held-out loss then gives every example the same noise whatever its row-mates,
    batch size or process count, so eval numbers compare across runs and meshes.
    """
    idx = jnp.clip(segment_ids - 1, 0, slot_index.shape[1] - 1)
    example = jnp.take_along_axis(slot_index, idx, axis=1).astype(jnp.uint32)
    p = positions.astype(jnp.uint32)
    base = jax.random.key(seed)

    def one(ex, pt, ph, pw):
        k = jax.random.fold_in(jax.random.fold_in(base, ex), pt)
        k = jax.random.fold_in(jax.random.fold_in(k, ph), pw)
        return jax.random.normal(k, (dim,))

    flat = jax.vmap(one)(example.reshape(-1), p[..., 0].reshape(-1), p[..., 1].reshape(-1), p[..., 2].reshape(-1))
    return flat.reshape(segment_ids.shape + (dim,))


def flow_inputs(x0, noise, t_tokens, cond_mask):
    """Noisy inputs and per-token times with conditioning tokens kept clean at t = 0."""
    t_in = jnp.where(cond_mask, 0.0, t_tokens)
    x_t = interpolate(x0, noise, t_in)
    return x_t, t_in


def eval_time_names(times: Sequence[float]) -> list[str]:
    return [f"loss_t{float(t):.2f}" for t in times]
