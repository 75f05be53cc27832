"""The input pipelines every stage calls: source -> shard -> shuffle -> transform -> batch.

  pixel_batches(config, split, ...)  bucketed pixel batches (stages vae, captioner)
  token_batches(config, split, ...)  packed or bucketed token batches from cached
                                     latents (stage dit)

Both return a grain `DatasetIterator` of process-local numpy batches whose
`get_state()` / `set_state()` resume a run with exactly the next batch. Each process
reads only its own slice of the split (`process_index::process_count`), the train
split repeats forever (reshuffled every epoch), and the eval split is a fixed,
finite, unshuffled set of held-out examples disjoint from train.
"""

from __future__ import annotations

import itertools
from typing import Any, Mapping, Sequence

import grain
import numpy as np

from sora_jax import sharding
from sora_jax.data import batching, bucket_schedule, sources, transforms
from sora_jax.data.tokenizer import HashTokenizer


def _data_and_seed(config, seed):
    data = config.data if "data" in config else config
    if seed is None:
        seed = int(config.get("seed", 0)) if "data" in config else 0
    return data, seed


class _SkippingSource:
    """Reads a source; with on_error='skip' a bad record becomes None (logged, counted)."""

    def __init__(self, source, on_error: str):
        self.source = source
        self._get = transforms.skip_or_raise(source.__getitem__, on_error)

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, i):
        return self._get(i)


def _examples(data, source, split: str, seed: int, process_index: int, process_count: int, fn,
              share: Sequence[int] | None = None) -> grain.MapDataset:
    """This process's examples: `share` (split indices) or, by default, process_index::process_count."""
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index {process_index} not in [0, {process_count})")
    if share is not None:
        source = sources.IndexedSource(source, share)
    ds = grain.MapDataset.source(_SkippingSource(source, data.on_error))
    if share is None:
        ds = ds[process_index::process_count]
    if len(ds) == 0:
        raise sources.DataError(f"process {process_index}/{process_count} has no {split} examples in {source!r}")
    if split == "train":
        ds = ds.shuffle(seed=seed).repeat()
    return ds.random_map(transforms.skip_or_raise(fn, data.on_error), seed=seed)


def _finalise(ds: grain.IterDataset, data) -> grain.IterDataset:
    if data.prefetch > 0:
        ds = grain.experimental.ThreadPrefetchIterDataset(ds, prefetch_buffer_size=int(data.prefetch))
    return ds


def max_latent_tokens(data) -> int:
    """Latent tokens of the largest clip the config allows (sets the default token budget)."""
    t = transforms.round_frames(data.frames)
    if data.resolution == "native":
        hw = data.pixels
    elif data.resolution == "square_crop":
        hw = data.size * data.size
    else:
        hw = (data.height or data.size) * (data.width or data.size)
    st, sh, sw = data.vae_stride
    pt, ph, pw = data.patch
    return max(1, ((t - 1) // st + 1) // pt * hw // (sh * ph * sw * pw))


def tokens_per_batch(data) -> int:
    return int(data.tokens_per_batch) or int(data.batch_size) * max_latent_tokens(data)


# --- pixel batches -----------------------------------------------------------------


def pixel_dataset(config, split: str, *, seed: int | None = None, process_index: int = 0,
                  process_count: int = 1, batch_multiple: int = 1) -> grain.IterDataset:
    data, seed = _data_and_seed(config, seed)
    transform = transforms.VideoTransform(data, train=split == "train")
    source = sources.make_source(data, split)
    tokens_of = lambda thw: batching.num_tokens(batching.latent_grid(thw, data.vae_stride, data.patch))
    key_fn = lambda ex: ex["video"].shape
    if bucket_schedule.mode(data, process_count) == "greedy":
        ds = _examples(data, source, split, seed, process_index, process_count, transform)
        policy = batching.BucketPolicy(
            key_fn=key_fn, tokens_fn=lambda ex: tokens_of(ex["video"].shape[:3]),
            tokens_per_batch=tokens_per_batch(data), max_batch_size=data.max_batch_size,
            lookahead=data.bucket_lookahead, finish=batching.stack_bucket, batch_multiple=batch_multiple)
        return _finalise(batching.BatchingIterDataset(ds, policy, data.read_threads), data)
    # Shared schedule (data/bucket_schedule.py): the same (T, H, W) and batch size on every process.
    size_of = lambda key: batching.bucket_batch_size(tokens_of(key[:3]), tokens_per_batch(data),
                                                     data.max_batch_size, batch_multiple)
    blank = lambda key: {"video": np.zeros(key, np.float32), "text_ids": np.zeros(data.text_len, np.int32),
                         "index": np.int64(-1)}
    counted = (range(len(source)) if split != "train" else
               bucket_schedule.sample_indices(len(source), int(data.bucket_schedule_examples), seed))
    keys = bucket_schedule.pixel_keys(data, source, counted)
    shares = bucket_schedule.deal(keys, process_count) if len(keys) == len(source) else None
    ds = _examples(data, source, split, seed, process_index, process_count, transform,
                   share=None if shares is None else shares[process_index])
    if split == "train":
        out = bucket_schedule.train_dataset(
            ds, keys, shares, len(source), process_count, seed, size_of, key_fn=key_fn, blank=blank,
            finish=batching.stack_bucket, lookahead=data.bucket_lookahead, read_threads=data.read_threads)
    else:
        sizes = {k: size_of(k) for k in set(keys) if k is not None}
        plan = bucket_schedule.finite_plan(keys, shares, sizes, process_index)
        out = bucket_schedule.PlannedIterDataset(ds, plan, batching.stack_bucket, blank, data.read_threads)
    return _finalise(out, data)


def pixel_batches(config, split: str = "train", *, seed: int | None = None, process_index: int = 0,
                  process_count: int = 1, batch_multiple: int = 1):
    """Iterator of {video f32 (B,T,H,W,3), text_ids (B,S), index (B,)}; one (T,H,W) per batch.

    B varies by bucket (constant tokens per batch) and is a multiple of `batch_multiple`
    (pass the number of local data shards). Rows that only fill a short bucket repeat
    an example of the batch and carry index -1. With `config.data.bucket_schedule`
    "shared" (the default "auto" with several processes) every process emits the same
    (T, H, W) and B at every step (data/bucket_schedule.py).
    """
    return iter(pixel_dataset(config, split, seed=seed, process_index=process_index,
                              process_count=process_count, batch_multiple=batch_multiple))


# --- token batches (cached latents) ------------------------------------------------------


class LatentExample:
    """A latent record -> a token example (patchified latent, caption tokens, text embedding)."""

    def __init__(self, data):
        self.data = data
        self.tokenizer = HashTokenizer(data.vocab_size, data.text_len)

    def __call__(self, record, rng=None) -> dict:
        extra = {}
        if "text_emb" in record:
            extra["text_emb"] = np.asarray(record["text_emb"], np.float32)
            extra["text_mask"] = np.asarray(record.get("text_mask", np.ones(extra["text_emb"].shape[0], bool)), bool)
        caption = transforms.caption_of(record, self.data)
        return batching.token_example(record["latent"], self.data.patch, self.tokenizer.encode(caption),
                                      record["index"], **extra)


def _bucket_rows(text_len: int):
    def finish(examples: list, size: int) -> dict:
        rows = [[examples[i % len(examples)]] for i in range(size)]
        batch = batching.pack_rows(rows, examples[0]["tokens"].shape[0], 1, text_len)
        batch["slot_index"][len(examples) :] = -1  # repeated filler rows
        return batch

    return finish


def token_dataset(config, split: str, *, seed: int | None = None, process_index: int = 0,
                  process_count: int = 1, batch_multiple: int = 1, source=None) -> grain.IterDataset:
    data, seed = _data_and_seed(config, seed)
    if source is None:
        from sora_jax.data import latent_cache

        source = latent_cache.LatentSource(data.latents_dir, split)
    ds = _examples(data, source, split, seed, process_index, process_count, LatentExample(data))
    if data.batching == "pack":
        policy = batching.PackPolicy(data.batch_size, data.row_len, data.max_slots, data.text_len,
                                     data.pack_lookahead)
    elif data.batching == "bucket":
        policy = batching.BucketPolicy(
            key_fn=lambda ex: tuple(ex["grid"]), tokens_fn=lambda ex: ex["tokens"].shape[0],
            tokens_per_batch=tokens_per_batch(data), max_batch_size=data.max_batch_size,
            lookahead=data.bucket_lookahead, finish=_bucket_rows(data.text_len), batch_multiple=batch_multiple)
    else:
        raise ValueError(f"config.data.batching must be 'pack' or 'bucket', got {data.batching!r}")
    return _finalise(batching.BatchingIterDataset(ds, policy, data.read_threads), data)


def token_batches(config, split: str = "train", *, seed: int | None = None, process_index: int = 0,
                  process_count: int = 1, batch_multiple: int = 1, source=None):
    """Iterator of token batches (docs/architecture.md) from the latents in config.data.latents_dir.

    pack: fixed (batch_size, row_len); bucket: one example per row, row length = its
    token count, batch size from the token budget. `source` overrides the latent source.
    """
    return iter(token_dataset(config, split, seed=seed, process_index=process_index, process_count=process_count,
                              batch_multiple=batch_multiple, source=source))


# --- helpers for stages ----------------------------------------------------------------


def fixed_batches(iterator, num_batches: int) -> list[dict]:
    """The first `num_batches` batches (e.g. of the eval split) as a list, for repeatable eval."""
    return list(itertools.islice(iterator, num_batches))


def token_batch_axes() -> dict[str, tuple]:
    """Logical axes of the token batch entries (the leading dim is the batch)."""
    return {k: ("activation_batch",) for k in
            ("tokens", "segment_ids", "positions", "slot_shape", "text_ids", "slot_index", "text_emb", "text_mask")}


def to_global(batch: Mapping[str, np.ndarray], mesh, rules: Sequence[tuple[str, Any]],
              axes: Mapping[str, Sequence[str | None]] | None = None) -> dict:
    """Process-local numpy batch -> global jax.Arrays sharded over (data, fsdp)."""
    return sharding.global_batch(batch, mesh, sharding.rules_from_config(rules), axes or {})
