"""Spacetime patches: latent videos <-> token sequences with (t, h, w) coordinates.

The same functions run on numpy (host-side packing in the data pipeline) and on
jax.numpy (inside the model and the samplers): `xp` is taken from the input.
A latent video is (T, H, W, C) (or batched (B, T, H, W, C)); a patch (pt, ph, pw)
becomes one token of size pt*ph*pw*C, ordered t-major, then h, then w.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np


def _xp(x):
    return np if isinstance(x, np.ndarray) else __import__("jax.numpy", fromlist=["numpy"])


def check_divisible(shape: Sequence[int], patch: Sequence[int], what: str = "latent") -> None:
    t, h, w = shape[-4:-1] if len(shape) >= 4 else shape
    pt, ph, pw = patch
    if t % pt or h % ph or w % pw:
        raise ValueError(f"{what} shape (T,H,W)=({t},{h},{w}) is not divisible by patch ({pt},{ph},{pw})")


def grid_shape(latent_thw: Sequence[int], patch: Sequence[int]) -> tuple[int, int, int]:
    check_divisible(tuple(latent_thw) + (1,), patch)
    return tuple(int(a) // int(p) for a, p in zip(latent_thw, patch))


def patchify(latent, patch: Sequence[int]):
    """(..., T, H, W, C) -> (..., N, pt*ph*pw*C) with N = (T/pt)(H/ph)(W/pw)."""
    xp = _xp(latent)
    *lead, t, h, w, c = latent.shape
    pt, ph, pw = patch
    check_divisible((t, h, w, c), patch)
    x = latent.reshape(*lead, t // pt, pt, h // ph, ph, w // pw, pw, c)
    n = len(lead)
    x = xp.transpose(x, (*range(n), n, n + 2, n + 4, n + 1, n + 3, n + 5, n + 6))
    return x.reshape(*lead, (t // pt) * (h // ph) * (w // pw), pt * ph * pw * c)


def unpatchify(tokens, grid: Sequence[int], patch: Sequence[int], channels: int):
    """Inverse of patchify: (..., N, pt*ph*pw*C) -> (..., T, H, W, C)."""
    xp = _xp(tokens)
    *lead, n_tok, d = tokens.shape
    gt, gh, gw = grid
    pt, ph, pw = patch
    if n_tok != gt * gh * gw or d != pt * ph * pw * channels:
        raise ValueError(f"tokens {tokens.shape} do not match grid {tuple(grid)}, patch {tuple(patch)}, C={channels}")
    x = tokens.reshape(*lead, gt, gh, gw, pt, ph, pw, channels)
    n = len(lead)
    x = xp.transpose(x, (*range(n), n, n + 3, n + 1, n + 4, n + 2, n + 5, n + 6))
    return x.reshape(*lead, gt * pt, gh * ph, gw * pw, channels)


def grid_positions(grid: Sequence[int]) -> np.ndarray:
    """(N, 3) int32 (t, h, w) coordinates of each token, in patch units, same order as patchify."""
    gt, gh, gw = grid
    t, h, w = np.meshgrid(np.arange(gt), np.arange(gh), np.arange(gw), indexing="ij")
    return np.stack([t, h, w], -1).reshape(-1, 3).astype(np.int32)
