"""experiments/vae_latent_noise.py: the grid ratio tells per-cell (blocky) errors from smooth ones."""

import os
import sys

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "experiments"))

import vae_latent_noise  # noqa: E402


def test_grid_ratio_separates_blocky_from_smooth_errors():
    rng = np.random.default_rng(0)
    # One random value per 8x8 cell: every change happens across a cell boundary.
    blocky = np.repeat(np.repeat(rng.standard_normal((3, 4, 4, 3)), 8, axis=1), 8, axis=2)
    blocky = blocky + 0.01 * rng.standard_normal(blocky.shape)
    white = rng.standard_normal((3, 32, 32, 3))  # no cell structure
    assert vae_latent_noise.grid_ratio(blocky, 8) > 20
    assert 0.8 < vae_latent_noise.grid_ratio(white, 8) < 1.25
    # Shifted by half a cell, the same blocks fall inside cells: the ratio drops below 1.
    assert vae_latent_noise.grid_ratio(np.roll(blocky, 4, axis=(1, 2)), 8) < 1
