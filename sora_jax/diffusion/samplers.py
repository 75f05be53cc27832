"""Euler and Heun samplers for rectified flow, with guidance, conditioning frames and SDEdit.

`sample` generates one latent video of any (T, H, W) from a velocity function with
the DiT's call signature

    model_fn(x [B, L, D], t [B, L], positions [B, L, 3], segment_ids [B, L], **inputs) -> [B, L, D]

where `inputs` holds text_ids [B, 1, S] / text_emb / text_mask / class_labels [B]
(one slot: a sampled video is a row with a single example). It integrates
dx/dt = v from t = 1 (noise) to t = 0 (data) over the shifted time grid that
training used (rectified_flow.time_shift), in a `lax.fori_loop`, so the whole call
jits (make `shape`, `patch`, `steps`, `sampler` and `prediction` static).

Every mode of the report is a choice of arguments:
  t2v / t2i          text only
  i2v                cond_latent with cond_frames_mask = [1, 0, 0, ...]
  extend             head (forwards) or tail (backwards) frames given
  loop               the same frame given first and last
  connect            head frames of one video and tail frames of another, spliced
                     into cond_latent by the caller (sample.py)
  SDEdit             init_latent + sdedit_strength: start from the input noised to
                     t = strength; 0 returns it, 1 ignores it
Given frames are held exactly: their tokens are reset to the clean values before
every model call, get t = 0, and have zero velocity.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from sora_jax.diffusion import rectified_flow as rf
from sora_jax.models import patches

SAMPLERS = ("euler", "heun")


def time_grid(steps: int, alpha, start=1.0):
    """steps + 1 times from `start` down to 0, uniform before the shift with `alpha`.

    The unshifted grid starts at inverse_shift(start), so the shifted grid starts
    exactly at `start` (SDEdit strength) and ends exactly at 0.
    """
    u0 = rf.inverse_time_shift(start, alpha)
    u = u0 * (1.0 - jnp.arange(steps + 1, dtype=jnp.float32) / steps)
    return rf.time_shift(u, alpha)


def resolve_shift(shift: Any, grid: tuple[int, int, int], patch_t: int):
    """shift: "auto" (Open-Sora 2.0 rule from the video's size), None (no shift) or a number."""
    if shift is None:
        return jnp.float32(1.0)
    if isinstance(shift, str):
        if shift != "auto":
            raise ValueError(f"shift must be 'auto', None or a number, got {shift!r}")
        gt, gh, gw = grid
        return rf.resolution_shift_alpha(gh * gw, gt * patch_t)
    return jnp.asarray(shift, jnp.float32)


def token_cond_mask(cond_frames_mask, grid, patch) -> np.ndarray:
    """(T,) latent-frame mask -> (N,) token mask; a temporal patch must be all given or all free."""
    m = np.asarray(cond_frames_mask, bool)
    pt = patch[0]
    if m.shape != (grid[0] * pt,):
        raise ValueError(f"cond_frames_mask has shape {m.shape}, expected ({grid[0] * pt},) latent frames")
    per_patch = m.reshape(grid[0], pt)
    if not (per_patch.all(1) | ~per_patch.any(1)).all():
        raise ValueError(f"cond_frames_mask {m.astype(int).tolist()} splits a temporal patch of {pt} frames")
    return per_patch[:, 0][patches.grid_positions(grid)[:, 0]]


def sample(
    model_fn: Callable[..., jax.Array],
    *,
    shape: tuple[int, int, int, int],
    patch: tuple[int, int, int],
    text_ids=None,
    text_emb=None,
    text_mask=None,
    class_label=None,
    null_class: int | None = None,
    cond_latent=None,
    cond_frames_mask=None,
    sampler: str = "euler",
    steps: int = 32,
    guidance: float = 1.0,
    shift: Any = "auto",
    seed=0,
    sdedit_strength=None,
    init_latent=None,
    prediction: str = "velocity",
    model_kwargs: Mapping[str, Any] | None = None,
) -> jax.Array:
    """Samples one latent video (T, H, W, C) = `shape`. See the module docstring."""
    if sampler not in SAMPLERS:
        raise ValueError(f"sampler must be one of {SAMPLERS}, got {sampler!r}")
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    t_len, h_len, w_len, channels = shape
    grid = patches.grid_shape((t_len, h_len, w_len), patch)
    positions = jnp.asarray(patches.grid_positions(grid))[None]  # [1, N, 3]
    n_tok = positions.shape[1]
    dim = int(np.prod(patch)) * channels
    segment_ids = jnp.ones((1, n_tok), jnp.int32)

    # Conditioning frames: clean tokens that stay fixed.
    if cond_frames_mask is not None:
        if cond_latent is None:
            raise ValueError("cond_frames_mask needs cond_latent (the clean latent of the given frames)")
        cond = jnp.asarray(token_cond_mask(cond_frames_mask, grid, patch))[None]  # [1, N]
        x_cond = patches.patchify(jnp.asarray(cond_latent, jnp.float32).reshape(shape)[None], patch)
    else:
        cond = jnp.zeros((1, n_tok), bool)
        x_cond = jnp.zeros((1, n_tok, dim), jnp.float32)

    # Text / class inputs; the unconditional branch uses all-padding ids or the null class.
    inputs, uncond = {}, {}
    if text_ids is not None:
        ids = jnp.asarray(text_ids, jnp.int32).reshape(1, 1, -1)
        inputs["text_ids"], uncond["text_ids"] = ids, jnp.zeros_like(ids)
    if text_emb is not None:
        emb = jnp.asarray(text_emb, jnp.float32)
        emb = emb.reshape((1, 1) + emb.shape[-2:])
        mask = jnp.ones(emb.shape[:3], bool) if text_mask is None else jnp.asarray(text_mask, bool).reshape(emb.shape[:3])
        inputs["text_emb"], uncond["text_emb"] = emb, jnp.zeros_like(emb)
        inputs["text_mask"], uncond["text_mask"] = mask, jnp.zeros_like(mask)
    if class_label is not None:
        if null_class is None:
            raise ValueError("guidance with class labels needs null_class (the model's num_classes)")
        inputs["class_labels"] = jnp.asarray(class_label, jnp.int32).reshape(1)
        uncond["class_labels"] = jnp.full((1,), null_class, jnp.int32)
    use_cfg = not (isinstance(guidance, (int, float)) and float(guidance) == 1.0)
    if use_cfg and not inputs:
        raise ValueError("guidance != 1 needs text_ids, text_emb or class_label to guide with")
    if use_cfg:  # one batched call: row 0 conditional, row 1 unconditional
        call_inputs = {k: jnp.concatenate([inputs[k], uncond[k]], 0) for k in inputs}
        rows = 2
    else:
        call_inputs, rows = inputs, 1
    pos_rows = jnp.tile(positions, (rows, 1, 1))
    seg_rows = jnp.tile(segment_ids, (rows, 1))
    extra = dict(model_kwargs or {})

    def velocity(x, t):
        x = jnp.where(cond[..., None], x_cond, x)
        t_tok = jnp.where(cond, 0.0, t)  # [1, N]
        out = model_fn(
            jnp.tile(x, (rows, 1, 1)), jnp.tile(t_tok, (rows, 1)), pos_rows, seg_rows, **call_inputs, **extra
        ).astype(jnp.float32)
        if use_cfg:
            out = out[1:] + guidance * (out[:1] - out[1:])
        v = rf.to_velocity(out, x, t_tok, prediction)
        return jnp.where(cond[..., None], 0.0, v)

    # Start: pure noise, or the SDEdit input noised to t = strength.
    alpha = resolve_shift(shift, grid, patch[0])
    noise = jax.random.normal(jax.random.key(seed), (1, n_tok, dim), jnp.float32)
    if sdedit_strength is not None:
        if init_latent is None:
            raise ValueError("sdedit_strength needs init_latent (the video to edit)")
        strength = jnp.clip(jnp.asarray(sdedit_strength, jnp.float32), 0.0, 1.0)
        times = time_grid(steps, alpha, start=strength)
        x0_init = patches.patchify(jnp.asarray(init_latent, jnp.float32).reshape(shape)[None], patch)
        x = (1.0 - strength) * x0_init + strength * noise
    else:
        times = time_grid(steps, alpha)
        x = noise

    def euler_step(i, x):
        t, t_next = times[i], times[i + 1]
        return x + (t_next - t) * velocity(x, t)

    def heun_step(i, x):
        t, t_next = times[i], times[i + 1]
        v = velocity(x, t)
        x_euler = x + (t_next - t) * v
        # The corrector needs the velocity at t_next; at t = 0 (last step) Euler lands on the data.
        return jax.lax.cond(
            t_next > 0,
            lambda: x + (t_next - t) * 0.5 * (v + velocity(x_euler, t_next)),
            lambda: x_euler,
        )

    x = jax.lax.fori_loop(0, steps, euler_step if sampler == "euler" else heun_step, x)
    x = jnp.where(cond[..., None], x_cond, x)
    return patches.unpatchify(x[0], grid, patch, channels)
