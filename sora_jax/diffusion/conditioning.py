"""The task mix: which latent frames of each example are given clean during training.

One model does every generation mode of the report: text-to-video, image-to-video,
extension forwards and backwards, looping and connecting. During training each
example (slot of a packed row) draws a task; the task names a number of *head*
frames and *tail* frames that are given clean:

  task              head  tail   eligible when (T = token frames of the example)
  t2v                 0     0    always (the only task for images, T = 1)
  i2v                 1     0    T >= 2
  extend_forward      k     0    T >= 2   k ~ U{1 .. max(1, floor(f T))}, k <= T - 1
  extend_backward     0     k    T >= 2
  loop                1     1    T >= 3   the clip's own first and last frames
  connect            kh    kt    T >= 3   kh, kt ~ U{1 .. max(1, floor(f T / 2))}

(f = config.diffusion.max_cond_fraction.) The given frames travel as per-token
time: their tokens get t = 0 and their clean values, and they are left out of the
loss (rectified_flow.flow_inputs / masked_loss). See docs/diffusion.md for why
per-token time rather than channel concatenation, and why training loop and
connect on a single clip's own frames teaches the sampling-time modes.

Frames here are *token* frames (positions[..., 0]); with the default temporal
patch 1 they are latent frames.
"""

from __future__ import annotations

from typing import Mapping

import jax
import jax.numpy as jnp

from sora_jax.diffusion.rectified_flow import per_token

TASKS = ("t2v", "i2v", "extend_forward", "extend_backward", "loop", "connect")
MIN_FRAMES = {"t2v": 1, "i2v": 2, "extend_forward": 2, "extend_backward": 2, "loop": 3, "connect": 3}


def task_weights(cfg: Mapping) -> jnp.ndarray:
    """config.diffusion.tasks -> weights in TASKS order (missing tasks weigh 0)."""
    tasks = dict(cfg.get("tasks", {"t2v": 1.0}))
    unknown = set(tasks) - set(TASKS)
    if unknown:
        raise ValueError(f"config.diffusion.tasks has unknown tasks {sorted(unknown)}; known: {TASKS}")
    w = [float(tasks.get(name, 0.0)) for name in TASKS]
    if any(x < 0 for x in w) or sum(w) <= 0:
        raise ValueError(f"config.diffusion.tasks weights must be >= 0 with a positive sum, got {tasks}")
    return jnp.asarray(w, jnp.float32)


def sample_tasks(key, slot_shape, cfg: Mapping) -> dict:
    """Draws a task per slot; returns {"task", "head", "tail"}, each int32 [B, K].

    Tasks an example is too short for are excluded; if none of its positive-weight
    tasks fits (e.g. an image with t2v weight 0), it falls back to t2v.
    """
    weights = task_weights(cfg)
    frac = float(cfg.get("max_cond_fraction", 0.5))
    frames = jnp.asarray(slot_shape)[..., 0].astype(jnp.int32)  # [B, K]
    k_task, k_ext, k_head, k_tail = jax.random.split(key, 4)

    eligible = jnp.stack([frames >= MIN_FRAMES[name] for name in TASKS], -1)  # [B, K, 6]
    w = jnp.where(eligible, weights, 0.0)
    w = w.at[..., 0].set(jnp.where(w.sum(-1) > 0, w[..., 0], 1.0))  # fall back to t2v
    task = jax.random.categorical(k_task, jnp.log(w), axis=-1).astype(jnp.int32)

    def uniform_k(k, max_k):
        return jnp.floor(jax.random.uniform(k, frames.shape) * max_k).astype(jnp.int32) + 1

    max_ext = jnp.clip(jnp.floor(frac * frames).astype(jnp.int32), 1, jnp.maximum(frames - 1, 1))
    ext = uniform_k(k_ext, max_ext)
    max_con = jnp.maximum(jnp.floor(frac * frames / 2).astype(jnp.int32), 1)
    con_head = uniform_k(k_head, max_con)
    con_tail = jnp.minimum(uniform_k(k_tail, max_con), jnp.maximum(frames - 1 - con_head, 1))

    idx = {name: i for i, name in enumerate(TASKS)}
    zero = jnp.zeros_like(frames)
    head = jnp.select(
        [task == idx["i2v"], task == idx["extend_forward"], task == idx["loop"], task == idx["connect"]],
        [zero + 1, ext, zero + 1, con_head],
        zero,
    )
    tail = jnp.select(
        [task == idx["extend_backward"], task == idx["loop"], task == idx["connect"]],
        [ext, zero + 1, con_tail],
        zero,
    )
    return {"task": task, "head": head, "tail": tail}


def frames_mask(head, tail, positions, segment_ids, slot_shape):
    """Per-token bool [B, L]: True where the token's frame is among its slot's given frames."""
    t_pos = positions[..., 0]
    h = per_token(head, segment_ids, 0)
    tl = per_token(tail, segment_ids, 0)
    frames = per_token(jnp.asarray(slot_shape)[..., 0], segment_ids, 0)
    return (segment_ids > 0) & ((t_pos < h) | (t_pos >= frames - tl))


def drop_captions(key, rate: float, segment_ids_shape_bk, *, text_ids=None, text_mask=None, class_labels=None, null_class=None):
    """Caption dropout for classifier-free guidance, per slot.

    A dropped slot gets all-padding text ids (the sampler's unconditional input), an
    all-False text mask, or the null class. Returns (dropped [B, K], dict of inputs).
    """
    dropped = jax.random.bernoulli(key, rate, segment_ids_shape_bk)
    out = {}
    if text_ids is not None:
        out["text_ids"] = jnp.where(dropped[..., None], 0, text_ids)
    if text_mask is not None:
        out["text_mask"] = jnp.where(dropped[..., None], False, text_mask)
    if class_labels is not None:
        if null_class is None:
            raise ValueError("caption dropout of class labels needs the null class id (config.model.num_classes)")
        out["class_labels"] = jnp.where(dropped, null_class, class_labels)
    return dropped, out
