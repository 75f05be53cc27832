"""Where a trained VAE's reconstruction error sits: by scene content, and on edges or flat areas.

  python experiments/vae_error_breakdown.py --workdir=W [--config=configs/vae.py:quick] [--num_eval=128]

Why: the quick VAE's held-out PSNR (~22-25 dB) is far from the 30 dB target, and one mean
over the loop's eval clips (8 until 2026-12-07, 32 since) says neither what content costs the error nor how noisy the mean is. This
reconstructs (posterior mean) every held-out toy-world example of --config's eval split
(indices [num_train, num_train + num_eval)), looks up each one's ground truth, and prints
one JSON object:

- "all": PSNR over all clips (mean of the per-clip PSNRs, as the stage's eval, with its
  standard error) and the pooled PSNR (of the mean squared error over all pixels);
- "by_background", "by_pan", "by_objects", "by_kind": the same per group (kind is image or video);
- "edges": the pixels whose value differs from a spatial neighbour (4-neighbourhood, any
  channel) by more than --edge_threshold in the input: their share of the pixels and of
  the squared error, the PSNR on edge and on flat pixels alone, and the pooled PSNR the
  clips would reach if the edge pixels' error were zero;
- "per_clip_psnr": {example index: PSNR}, so that two models scored on the same clips can be
  compared pair by pair (the standard error of a paired difference is far below "psnr_sem").

The toy world's content is procedural and exact, so its edges are exact too: stripes,
checkers and object outlines are hard steps between two colours.
"""

from __future__ import annotations

import argparse
import json
import math

import numpy as np

from vae_rescore import add_scoring_args, load_scorer


def edge_mask(video: np.ndarray, threshold: float) -> np.ndarray:
    """[B, T, H, W] bool: a pixel differs from a 4-neighbour in H or W by more than threshold."""
    dh = np.max(np.abs(np.diff(video, axis=2)), axis=-1) > threshold  # [B, T, H-1, W]
    dw = np.max(np.abs(np.diff(video, axis=3)), axis=-1) > threshold  # [B, T, H, W-1]
    mask = np.zeros(video.shape[:-1], bool)
    mask[:, :, 1:] |= dh
    mask[:, :, :-1] |= dh
    mask[:, :, :, 1:] |= dw
    mask[:, :, :, :-1] |= dw
    return mask


def psnr_of_mse(mse: float) -> float:
    """dB for videos in [-1, 1] (peak-to-peak 2), as sora_jax.stages.vae.psnr."""
    return 10.0 * math.log10(4.0 / max(mse, 1e-10))


def group_summary(psnrs: list, sq_errs: list, counts: list) -> dict:
    """Mean per-clip PSNR, its standard error, and the pooled PSNR of one group of clips."""
    p = np.asarray(psnrs, np.float64)
    sem = float(np.std(p, ddof=1) / math.sqrt(len(p))) if len(p) > 1 else float("nan")
    return {"clips": len(p), "psnr": round(float(p.mean()), 3), "psnr_sem": round(sem, 3),
            "pooled_psnr": round(psnr_of_mse(float(np.sum(sq_errs)) / float(np.sum(counts))), 3)}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_scoring_args(p)  # --workdir, --config, --step, --ema, --num_train, --num_eval
    p.add_argument("--edge_threshold", type=float, default=0.05, help="edge: a neighbour step above this, in [-1, 1] units")
    args = p.parse_args(argv)

    from sora_jax.data import pipeline, toy_world

    stage, model, _ = load_scorer(args.workdir, args.config, step=args.step, ema=args.ema,
                                  num_train=args.num_train, num_eval=args.num_eval)
    data = stage.config.data
    if data.source != "toy":
        raise ValueError(f"{args.config}: data.source is {data.source!r}; the breakdown needs the toy world's ground truth")
    world = toy_world.ToyWorld(data.toy, seed=data.toy_seed, num_examples=data.num_train + data.num_eval)

    clips, seen = [], set()
    for batch in pipeline.pixel_batches(stage.config, "eval", seed=int(stage.config.seed)):  # one pass
        video = np.asarray(batch["video"], np.float32)
        recon = np.clip(np.asarray(stage._reconstruct(model, video)[0]), -1, 1)
        sq = np.square(recon - np.clip(video, -1, 1)).sum(-1)  # [B, T, H, W], summed over RGB
        edges = edge_mask(video, args.edge_threshold)
        for i, index in enumerate(np.asarray(batch["index"])):
            if index < 0 or int(index) in seen:
                continue
            seen.add(int(index))
            scene = world.scene(int(index))
            n = sq[i].size * 3
            clips.append(dict(
                index=int(index), kind="image" if video.shape[1] == 1 else "video",
                background=scene["background"]["kind"], pan=bool(any(scene["camera"]["pan_velocity"])),
                objects=len(scene["objects"]), sq=float(sq[i].sum()), n=n, psnr=psnr_of_mse(float(sq[i].sum()) / n),
                edge_sq=float(sq[i][edges[i]].sum()), edge_n=int(edges[i].sum()) * 3))
    if len(seen) < int(data.num_eval):
        raise RuntimeError(f"{args.config}: saw {len(seen)} of {data.num_eval} eval examples")

    def summary(group):
        return group_summary([c["psnr"] for c in group], [c["sq"] for c in group], [c["n"] for c in group])

    def by(key):
        values = sorted({c[key] for c in clips}, key=str)
        return {str(v): summary([c for c in clips if c[key] == v]) for v in values}

    sq, n = sum(c["sq"] for c in clips), sum(c["n"] for c in clips)
    edge_sq, edge_n = sum(c["edge_sq"] for c in clips), sum(c["edge_n"] for c in clips)
    out = {
        "workdir": args.workdir, "config": args.config, "num_train": int(data.num_train), "num_eval": len(clips),
        "all": summary(clips),
        "by_kind": by("kind"), "by_background": by("background"), "by_pan": by("pan"), "by_objects": by("objects"),
        "edges": {"threshold": args.edge_threshold, "pixel_share": round(edge_n / n, 4),
                  "error_share": round(edge_sq / max(sq, 1e-12), 4),
                  "psnr_edge_pixels": round(psnr_of_mse(edge_sq / max(edge_n, 1)), 3),
                  "psnr_flat_pixels": round(psnr_of_mse((sq - edge_sq) / max(n - edge_n, 1)), 3),
                  "pooled_psnr_if_edges_exact": round(psnr_of_mse((sq - edge_sq) / n), 3)},
        "per_clip_psnr": {str(c["index"]): round(c["psnr"], 3) for c in clips},
    }
    print(json.dumps(out))
    return out


if __name__ == "__main__":
    main()
