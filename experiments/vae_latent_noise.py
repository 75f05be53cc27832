"""How a trained VAE's decoder answers latent errors: PSNR and an 8x8 grid ratio under latent noise.

  python experiments/vae_latent_noise.py --vae_workdir=DIR [--sigmas=0,0.25,0.5] [--clips=8]

A diffusion model never returns the encoder's latents exactly, so what the decoder
makes of a *wrong* latent matters for samples as much as reconstruction PSNR does.
This adds Gaussian noise of std sigma to the normalised latents (the DiT's space,
where every channel has unit variance) of held-out toy-world clips and decodes them.

  psnr        of the noisy decode against the input clip (sigma 0: plain reconstruction)
  grid_ratio  of the error field decode(z + noise) - decode(z): the mean absolute
              difference between neighbouring pixels across latent-cell boundaries
              (every `spatial_compression` pixels) over that within cells. 1 means the
              error has no cell structure; a per-cell linear decoder gives far more.
"""

from __future__ import annotations

import argparse
import json

import numpy as np


def grid_ratio(err: np.ndarray, cell: int) -> float:
    """err (T, H, W, C): boundary over interior neighbour differences, along H and W."""
    ratios = []
    for axis in (1, 2):
        d = np.abs(np.diff(err, axis=axis)).mean(axis=tuple(a for a in range(4) if a != axis))
        boundary = np.arange(1, d.size + 1) % cell == 0
        ratios.append((d[boundary].mean(), d[~boundary].mean()))
    return float(sum(r[0] for r in ratios) / sum(r[1] for r in ratios))


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--vae_workdir", required=True)
    p.add_argument("--sigmas", default="0,0.25,0.5")
    p.add_argument("--clips", type=int, default=8)
    p.add_argument("--frames", type=int, default=9)
    p.add_argument("--size", type=int, default=48, help="square clips of this size (pixels)")
    p.add_argument("--seed", type=int, default=12345, help="toy-world seed (not the training seed 0)")
    args = p.parse_args(argv)

    from sora_jax.data.toy_world import ToyWorld, ToyWorldConfig, default_toy_config
    from sora_jax.models.vae_api import VAEHandle

    vae = VAEHandle.from_workdir(args.vae_workdir)
    toy = default_toy_config()
    toy.update(dict(max_frames=args.frames, frame_step=args.frames - 1, pixel_budget=args.size ** 2,
                    aspect_ratios=["1:1"], image_prob=0.0))
    world = ToyWorld(ToyWorldConfig.from_config(toy), seed=args.seed, num_examples=16 * args.clips)
    clips = [r["video"] for r in (world[i] for i in range(len(world))) if r["video"].shape[0] == args.frames]
    clips = clips[: args.clips]
    if not clips:
        raise ValueError(f"no {args.frames}-frame clips drawn from the toy world (seed {args.seed})")
    cell = vae.cfg.spatial_compression
    rng = np.random.default_rng(0)
    out = {"vae_workdir": args.vae_workdir, "clips": len(clips), "shape": list(clips[0].shape), "sigmas": {}}
    # Encode and decode each clip once; every sigma reuses them.
    coded = []
    for clip in clips:
        x = clip.astype(np.float32) / 127.5 - 1.0
        z = np.asarray(vae.encode(clip))
        coded.append((x, z, np.asarray(vae.decode(z)).reshape(x.shape)))
    for sigma in (float(s) for s in args.sigmas.split(",")):
        psnrs, grids = [], []
        for x, z, clean in coded:
            y = clean if sigma == 0 else np.asarray(
                vae.decode(z + sigma * rng.standard_normal(z.shape).astype(np.float32))).reshape(x.shape)
            psnrs.append(10 * np.log10(4.0 / np.mean((np.clip(y, -1, 1) - x) ** 2)))
            if sigma:
                grids.append(grid_ratio(y - clean, cell))
        out["sigmas"][str(sigma)] = {"psnr": round(float(np.mean(psnrs)), 2),
                                     "grid_ratio": round(float(np.mean(grids)), 2) if grids else None}
    print(json.dumps(out))
    return out


if __name__ == "__main__":
    main()
