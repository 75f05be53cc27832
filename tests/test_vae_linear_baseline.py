"""experiments/vae_linear_baseline.py: the per-cell PCA floor that a VAE has to beat."""

import os
import sys

import numpy as np
import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "experiments"))

import vae_linear_baseline  # noqa: E402


def _videos(rng, b=6, t=9, h=16, w=24):
    return rng.uniform(-1, 1, (b, t, h, w, 3)).astype(np.float32)


def test_cells_follow_the_causal_vae_layout():
    pca = vae_linear_baseline.CellPCA(k=4, tc=4, s=8)
    video = _videos(np.random.default_rng(0), b=1)
    cells = pca.cells(video)
    # Frame 0 alone, 8x8 cells; later frames in groups of 4 frames per cell.
    assert cells["first"].shape == (2 * 3, 8 * 8 * 3) and cells["rest"].shape == (2 * 2 * 3, 4 * 8 * 8 * 3)
    np.testing.assert_array_equal(cells["first"][1].reshape(8, 8, 3), video[0, 0, 0:8, 8:16])
    # 6 cells per latent frame; cell 7 of "rest" is latent frame 2 (row 0, col 1): frames 5-8, rows 0-8, cols 8-16.
    np.testing.assert_array_equal(cells["rest"][7].reshape(4, 8, 8, 3), video[0, 5:9, 0:8, 8:16])


def test_full_rank_pca_is_exact_and_fewer_components_lose_detail():
    rng = np.random.default_rng(1)
    # A low-rank world: every frame-0 cell and every 4-frame cell is a mix of 3 fixed patterns.
    # Frames and cells are sums of outer products, so the rank of each cell kind is 3.
    pats_first, pats_rest = rng.standard_normal((3, 192)), rng.standard_normal((3, 768))

    def world(n):
        video = np.zeros((n, 5, 16, 16, 3), np.float64)
        for i in range(n):
            for r in range(2):
                for c in range(2):
                    a, b = rng.standard_normal(3) * 0.05, rng.standard_normal(3) * 0.05
                    video[i, 0, 8 * r:8 * r + 8, 8 * c:8 * c + 8] = (a @ pats_first).reshape(8, 8, 3)
                    video[i, 1:, 8 * r:8 * r + 8, 8 * c:8 * c + 8] = (b @ pats_rest).reshape(4, 8, 8, 3)
        assert np.abs(video).max() < 1  # inside [-1, 1]: the reconstruction's clip is then the identity
        return video

    train, test = world(40), world(4)
    exact = vae_linear_baseline.CellPCA(k=3, tc=4, s=8)
    exact.add(train)
    kept = exact.fit()
    assert kept["first"]["variance_kept"] > 0.99 and kept["rest"]["variance_kept"] > 0.99
    np.testing.assert_allclose(exact.reconstruct(test), test, atol=1e-4)
    lossy = vae_linear_baseline.CellPCA(k=1, tc=4, s=8)
    lossy.add(train)
    lossy.fit()
    assert np.mean((lossy.reconstruct(test) - test) ** 2) > 100 * np.mean((exact.reconstruct(test) - test) ** 2)


def test_reconstructing_videos_needs_video_cells_in_the_fit():
    pca = vae_linear_baseline.CellPCA(k=2, tc=4, s=8)
    pca.add(_videos(np.random.default_rng(2), t=1))
    pca.fit()
    assert pca.reconstruct(_videos(np.random.default_rng(3), t=1)).shape == (6, 1, 16, 24, 3)
    with pytest.raises(ValueError, match="'rest'"):
        pca.reconstruct(_videos(np.random.default_rng(3), t=5))


def test_main_scores_the_stage_eval_batches():
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = vae_linear_baseline.main([f"--config={root}/configs/vae.py:micro", "--fit_batches=2"])
    assert out["cell"] == [4, 8, 8] and out["latent_channels"] == 16
    # A 16-value code of a 768-value cell loses detail (measured 22.9 dB), but does far better than a
    # flat mean colour per clip (~15 dB on the toy world, docs/vae.md).
    assert 18 < out["eval"]["video_psnr"] < 40
    assert 0 < out["fit"]["rest"]["variance_kept"] < 1
