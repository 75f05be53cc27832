"""The VAE's linear floor: PSNR of a per-cell PCA code with the latent's size, on the VAE's own evals.

  python experiments/vae_linear_baseline.py [--config=configs/vae.py:quick] [--fit_batches=64]

A causal VAE at 4x8x8 with C latent channels keeps C numbers per latent cell: frame 0's
8x8x3 pixels, and each later group of 4 frames' 4x8x8x3. The best *linear* code of that
size, cell by cell, is PCA: project each cell (frame-0 cells and 4-frame cells apart) on
its top C principal components, fitted on training batches. A VAE is only worth its
nonlinear networks by how far it beats this. The baseline is scored by the vae stage's
own code (`VAEStage._scores`) on the same held-out batches as the loop's eval and the
final native-size eval, so the printed figures compare one to one with recon/*.json.

Prints one JSON object: the fit, then {"eval": ..., "native": ...} with the stage's keys.
"""

from __future__ import annotations

import argparse
import json

import numpy as np


class CellPCA:
    """Per-cell PCA with `k` components: frame-0 cells (1, s, s, 3) and later cells (tc, s, s, 3)."""

    def __init__(self, k: int, tc: int, s: int):
        self.k, self.tc, self.s = k, tc, s
        self.sums = {}  # kind -> (count, sum, sum of outer products) in float64
        self.basis = {}  # kind -> (mean, top-k eigenvectors), set by fit()

    def cells(self, video: np.ndarray) -> dict[str, np.ndarray]:
        """(B, T, H, W, 3) -> {"first": (N, s*s*3), "rest": (M, tc*s*s*3)} in raster order."""
        b, t, h, w, _ = video.shape
        s, tc = self.s, self.tc
        first = video[:, 0].reshape(b, h // s, s, w // s, s, 3).transpose(0, 1, 3, 2, 4, 5)
        out = {"first": first.reshape(-1, s * s * 3)}
        if t > 1:
            rest = video[:, 1:].reshape(b, (t - 1) // tc, tc, h // s, s, w // s, s, 3)
            out["rest"] = rest.transpose(0, 1, 3, 5, 2, 4, 6, 7).reshape(-1, tc * s * s * 3)
        return out

    def add(self, video: np.ndarray) -> None:
        for kind, x in self.cells(np.asarray(video, np.float64)).items():
            n, total, outer = self.sums.get(kind, (0, 0.0, 0.0))
            self.sums[kind] = (n + len(x), total + x.sum(0), outer + x.T @ x)

    def fit(self) -> dict:
        self.basis = {}
        explained = {}
        for kind, (n, total, outer) in self.sums.items():
            mean = total / n
            cov = outer / n - np.outer(mean, mean)
            vals, vecs = np.linalg.eigh(cov)
            top = vecs[:, ::-1][:, : self.k]
            self.basis[kind] = (mean, top)
            explained[kind] = {"cells": int(n), "dims": int(len(mean)),
                               "variance_kept": float(vals[::-1][: self.k].sum() / max(vals.sum(), 1e-30))}
        return explained

    def reconstruct(self, video: np.ndarray) -> np.ndarray:
        video = np.asarray(video, np.float64)
        b, t, h, w, _ = video.shape
        s, tc = self.s, self.tc
        out = np.empty_like(video)
        for kind, x in self.cells(video).items():
            if kind not in self.basis:
                raise ValueError(f"no {kind!r} cells fitted: add() videos of more than one frame, then fit()")
            mean, top = self.basis[kind]
            y = (x - mean) @ top @ top.T + mean
            if kind == "first":
                out[:, 0] = y.reshape(b, h // s, w // s, s, s, 3).transpose(0, 1, 3, 2, 4, 5).reshape(b, h, w, 3)
            else:
                y = y.reshape(b, (t - 1) // tc, h // s, w // s, tc, s, s, 3).transpose(0, 1, 4, 2, 5, 3, 6, 7)
                out[:, 1:] = y.reshape(b, t - 1, h, w, 3)
        return np.clip(out, -1.0, 1.0).astype(np.float32)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default="configs/vae.py:quick")
    p.add_argument("--fit_batches", type=int, default=64, help="training batches the PCA is fitted on")
    args = p.parse_args(argv)

    import jax.numpy as jnp

    from sora_jax import config_lib
    from sora_jax.models import vae as vae_lib
    from sora_jax.stages import vae as vae_stage

    config = config_lib.load_config(args.config)
    if config.stage != "vae":
        raise ValueError(f"{args.config}: stage is {config.stage!r}, not 'vae'")
    m = vae_lib.vae_config(config.model)
    pca = CellPCA(m.latent_channels, m.temporal_compression, m.spatial_compression)

    class LinearStage(vae_stage.VAEStage):
        def _reconstruct(self, model, video):  # the stage's metrics, PCA's reconstruction
            recon = jnp.asarray(pca.reconstruct(video))
            video = jnp.asarray(video)
            return recon, vae_stage.psnr(recon, video), vae_stage.ssim(recon, video)

    stage = LinearStage(config)
    for i, batch in enumerate(stage.train_batches(0, 1)):
        if i >= args.fit_batches:
            break
        keep = np.asarray(batch["index"]) >= 0
        pca.add(np.asarray(batch["video"])[keep])
    out = {"config": args.config, "latent_channels": pca.k, "cell": [pca.tc, pca.s, pca.s], "fit": pca.fit()}
    out.update(stage.held_out_summaries(None))
    print(json.dumps(out))
    return out


if __name__ == "__main__":
    main()
