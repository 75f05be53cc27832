"""Latent caching: encode a data set once with the trained VAE, train the DiT on latents.

The DiT never sees pixels. `cache_latents` runs the eval-mode transforms (clip from
frame 0, resolution policy) over a split, encodes each video with `encode_fn`, and
writes ArrayRecord shards of latent records (record format: data/sources.py):

    {"latent": float16 (T', H', W', C) normalised latents, "caption": str,
     "short_caption": str, "index": int, "pixel_shape": [T, H, W],
     optional "text_emb": float16 (S, D), "text_mask": bool (S,)}

to OUT_DIR/{train,eval}/latents-NNNNN.array_record plus OUT_DIR/{split}/meta.json.
`LatentSource(out_dir, split)` reads them back for `pipeline.token_batches`.

`encode_fn` takes float32 videos [B, T, H, W, 3] in [-1, 1] (B = batch_size examples
of one shape) and returns normalised latents [B, T', H', W', C]. The VAE stage
provides it (its latent_stats.json supplies the normalisation). `text_encode_fn`,
for a frozen text encoder, maps a list of B captions to (emb [B, S, D], mask [B, S]).

Batching by shape. A jitted encoder compiles once per input shape, and a mix of
native sizes has tens of (T, H, W) shapes, so examples wait in one bucket per
shape and a bucket is encoded when it holds `batch_size` examples. Every call has
exactly `batch_size` rows (a partial bucket is filled with repeats of its last
example, whose outputs are dropped), so each shape compiles once. A partial bucket
is encoded early when `lookahead` examples are unwritten (memory stays bounded:
waiting clips are held as uint8), and at the end of the split. Records are still
written in source order, so the cache's record i is the split's example i (less
skipped ones) whatever the batch size.
"""

from __future__ import annotations

import collections
import os
from typing import Callable, Sequence

import numpy as np
import tqdm

from sora_jax import jsonio
from sora_jax.data import sources, transforms

SHARD_SIZE = 1024


class _ShapeBatcher:
    """Examples -> encode calls of `batch_size` same-shape clips -> records, in source order."""

    def __init__(self, encode_fn, text_encode_fn, batch_size: int, lookahead: int, dtype: str, write):
        self.encode_fn, self.text_encode_fn, self.write = encode_fn, text_encode_fn, write
        self.batch_size, self.lookahead, self.dtype = batch_size, max(lookahead, batch_size), dtype
        self.unwritten: collections.deque[dict] = collections.deque()  # slots, oldest first
        self.buckets: dict[tuple, list[tuple[dict, np.ndarray]]] = {}  # shape -> (slot, uint8 clip)
        self.stats = {"encode_calls": 0, "early_calls": 0, "filler_rows": 0}

    def add(self, record: dict, clip: np.ndarray) -> None:
        slot = {"caption": record["caption"], "short_caption": record.get("short_caption", ""),
                "index": int(record["index"]), "pixel_shape": list(clip.shape[:3]), "shape": clip.shape, "out": None}
        self.unwritten.append(slot)
        bucket = self.buckets.setdefault(clip.shape, [])
        bucket.append((slot, clip))
        if len(bucket) == self.batch_size:
            self._encode(clip.shape)
        elif len(self.unwritten) > self.lookahead:  # the oldest example has waited long enough
            self.stats["early_calls"] += 1
            self._encode(self.unwritten[0]["shape"])
        self._drain()

    def finish(self) -> None:
        while self.unwritten:  # partial buckets, oldest first, so writing never stalls
            self._encode(self.unwritten[0]["shape"])
            self._drain()

    def _encode(self, shape: tuple) -> None:
        items = self.buckets.pop(shape)
        n = len(items)
        rows = [items[min(i, n - 1)][1] for i in range(self.batch_size)]  # filler rows repeat the last clip
        videos = transforms.normalise(np.stack(rows))
        latents = np.asarray(self.encode_fn(videos))
        if latents.ndim != 5 or latents.shape[0] != len(rows):
            raise ValueError(f"encode_fn returned {latents.shape} for videos {videos.shape}; want [B,T',H',W',C]")
        embs = masks = None
        if self.text_encode_fn is not None:
            captions = [items[min(i, n - 1)][0]["caption"] for i in range(self.batch_size)]
            embs, masks = self.text_encode_fn(captions)
        for b, (slot, _) in enumerate(items):
            out = {"latent": latents[b].astype(self.dtype), "caption": slot["caption"],
                   "short_caption": slot["short_caption"], "index": slot["index"], "pixel_shape": slot["pixel_shape"]}
            if embs is not None:
                out["text_emb"] = np.asarray(embs[b]).astype(self.dtype)
                out["text_mask"] = np.asarray(masks[b], bool)
            slot["out"] = out
        self.stats["encode_calls"] += 1
        self.stats["filler_rows"] += self.batch_size - n

    def _drain(self) -> None:
        while self.unwritten and self.unwritten[0]["out"] is not None:
            self.write(self.unwritten.popleft()["out"])


def cache_latents(data_config, encode_fn: Callable[[np.ndarray], np.ndarray], out_dir: str, *, split: str,
                  num_examples: int = 0, batch_size: int = 8,
                  text_encode_fn: Callable[[Sequence[str]], tuple[np.ndarray, np.ndarray]] | None = None,
                  dtype: str = "float16", lookahead: int = 0, progress: bool = True) -> dict:
    """Encodes up to `num_examples` (0 = all) of `split` and writes latent shards. Returns meta.

    `lookahead` (0 = `data_config.bucket_lookahead`) bounds the examples held unwritten
    while their shape's bucket fills (see the module doc).
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
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

    def write(record: dict) -> None:
        writer.write(record)
        shapes[str(tuple(record["latent"].shape))] += 1

    batcher = _ShapeBatcher(encode_fn, text_encode_fn, batch_size,
                            int(lookahead or data_config.get("bucket_lookahead", 256)), dtype, write)
    for i in tqdm.tqdm(range(n), desc=f"caching {split} latents", disable=not progress):
        try:
            record = source[i]
            clip = transform.clip_uint8(record)  # eval transform: clip from frame 0, no rng
        except sources.DataError as e:
            if data_config.on_error == "raise":
                raise
            skipped[str(e)] = skipped.get(str(e), 0) + 1
            continue
        batcher.add(record, clip)
    batcher.finish()
    writer.close()
    meta = {"split": split, "num_examples": sum(shapes.values()), "shards": [os.path.basename(p) for p in writer.paths],
            "latent_shapes": dict(shapes), "dtype": dtype, "skipped": skipped,
            "text_embeddings": text_encode_fn is not None, "batch_size": batch_size, **batcher.stats}
    jsonio.write_json(os.path.join(directory, "meta.json"), meta)
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
