"""Latent caching: encode a data set once with the trained VAE, train the DiT on latents.

The DiT never sees pixels. `cache_latents` runs the eval-mode transforms (clip from
frame 0, resolution policy) over a split, encodes each video with `encode_fn`, and
writes ArrayRecord shards of latent records (record format: data/sources.py):

    {"latent": float16 (T', H', W', C) normalised latents, "caption": str,
     "short_caption": str, "index": int, "pixel_shape": [T, H, W],
     optional "text_emb": float16 (S, D), "text_mask": bool (S,)}

to OUT_DIR/{train,eval}/latents-NNNNN.array_record plus OUT_DIR/{split}/meta.json.
`LatentSource(out_dir, split)` reads them back for `pipeline.token_batches`.

`encode_fn` takes float32 videos [B, T, H, W, 3] in [-1, 1] (B examples of one shape,
B <= batch_size) and returns normalised latents [B, T', H', W', C]. The VAE stage
provides it (its latent_stats.json supplies the normalisation). `text_encode_fn`,
for a frozen text encoder, maps a list of B captions to (emb [B, S, D], mask [B, S]).
"""

from __future__ import annotations

import collections
import json
import os
from typing import Callable, Sequence

import numpy as np
import tqdm

from sora_jax.data import sources, transforms

SHARD_SIZE = 1024


def cache_latents(data_config, encode_fn: Callable[[np.ndarray], np.ndarray], out_dir: str, *, split: str,
                  num_examples: int = 0, batch_size: int = 8,
                  text_encode_fn: Callable[[Sequence[str]], tuple[np.ndarray, np.ndarray]] | None = None,
                  dtype: str = "float16", progress: bool = True) -> dict:
    """Encodes up to `num_examples` (0 = all) of `split` and writes latent shards. Returns meta."""
    source = sources.make_source(data_config, split)
    n = len(source) if num_examples <= 0 else min(num_examples, len(source))
    transform = transforms.VideoTransform(data_config, train=False)
    directory = os.path.join(out_dir, split)
    os.makedirs(directory, exist_ok=True)
    for stale in (p for p in os.listdir(directory) if p.endswith(".array_record")):
        os.remove(os.path.join(directory, stale))  # a re-run replaces, never mixes, the cache
    writer = sources.ShardWriter(directory, SHARD_SIZE, "latents")
    shapes: collections.Counter = collections.Counter()
    skipped: dict[str, int] = {}
    pending: list[tuple[dict, np.ndarray]] = []  # (record, video) of one pixel shape

    def flush():
        if not pending:
            return
        videos = np.stack([v for _, v in pending])
        latents = np.asarray(encode_fn(videos))
        if latents.ndim != 5 or latents.shape[0] != len(pending):
            raise ValueError(f"encode_fn returned {latents.shape} for videos {videos.shape}; want [B,T',H',W',C]")
        embs = masks = None
        if text_encode_fn is not None:
            embs, masks = text_encode_fn([r["caption"] for r, _ in pending])
        for b, (record, video) in enumerate(pending):
            out = {"latent": latents[b].astype(dtype), "caption": record["caption"],
                   "short_caption": record.get("short_caption", ""), "index": int(record["index"]),
                   "pixel_shape": list(video.shape[:3])}
            if embs is not None:
                out["text_emb"] = np.asarray(embs[b]).astype(dtype)
                out["text_mask"] = np.asarray(masks[b], bool)
            writer.write(out)
            shapes[str(tuple(latents[b].shape))] += 1
        pending.clear()

    for i in tqdm.tqdm(range(n), desc=f"caching {split} latents", disable=not progress):
        try:
            record = source[i]
            video = transform(record)["video"]
        except sources.DataError as e:
            if data_config.on_error == "raise":
                raise
            skipped[str(e)] = skipped.get(str(e), 0) + 1
            continue
        if pending and (video.shape != pending[0][1].shape or len(pending) == batch_size):
            flush()
        pending.append((record, video))
    flush()
    writer.close()
    meta = {"split": split, "num_examples": sum(shapes.values()), "shards": [os.path.basename(p) for p in writer.paths],
            "latent_shapes": dict(shapes), "dtype": dtype, "skipped": skipped,
            "text_embeddings": text_encode_fn is not None}
    with open(os.path.join(directory, "meta.json"), "w") as f:
        json.dump(meta, f, indent=1)
    return meta


class LatentSource(sources.ArrayRecordSource):
    """The latent records of one split of a cache written by `cache_latents`."""

    def __init__(self, latents_dir: str, split: str):
        if not latents_dir:
            raise sources.DataError("config.data.latents_dir is empty: run latent caching first (docs/data.md)")
        directory = os.path.join(latents_dir, split)
        if not os.path.isdir(directory):
            raise sources.DataError(f"no {split} latents at {directory}: run latent caching first (docs/data.md)")
        super().__init__(directory)

    def __getitem__(self, index: int) -> dict:
        record = super().__getitem__(index)
        if "latent" not in record:
            path, local = self.locate(int(index))
            raise sources.DataError(f"{path} record {local}: not a latent record (keys {sorted(record)})")
        return record
