"""Data pipeline benchmark on the default native-size toy-world mix.

    python -m sora_jax.bench data [--seconds=10] [--config.data.KEY=VALUE ...]

Measures, single process with the default threads:
  * pixel pipeline (toy world -> transforms -> buckets): examples/s, pixel tokens/s,
    and the padded-bucket efficiency (real rows / rows, as tokens);
  * token pipeline (cached latents -> NaViT packing): examples/s, tokens/s and the
    packing efficiency (real tokens / row tokens). Latents come from a stand-in
    encoder (area pooling with the VAE's strides) written to a temp cache, so this
    benchmark measures the data path, not the VAE.
Also reports `pad_to_max_efficiency`: what padding every example to the largest
shape would keep (the baseline that bucketing and packing avoid).
"""

from __future__ import annotations

import tempfile
import time

import numpy as np

from sora_jax.data import batching, config as data_config_lib, latent_cache, pipeline


def pool_encode(vae_stride, channels: int = 4):
    """Stand-in encoder with the VAE's shapes: first frame alone, then 4x8x8 area pooling."""
    st, sh, sw = vae_stride

    def encode(videos):
        b, t, h, w, _ = videos.shape
        frames = [videos[:, :1]] + ([videos[:, 1:].reshape(b, (t - 1) // st, st, h, w, 3).mean(2)] if t > 1 else [])
        x = np.concatenate(frames, 1).reshape(b, -1, h // sh, sh, w // sw, sw, 3).mean((3, 5))
        return np.concatenate([x, x[..., :channels - 3]], -1).astype(np.float32)

    return encode


def _parse(args):
    seconds = 10.0
    overrides = {}
    for a in args:
        key, _, value = a.lstrip("-").partition("=")
        if key == "seconds":
            seconds = float(value)
        elif key.startswith("config.data."):
            overrides[key[len("config.data."):]] = value
        else:
            raise SystemExit(f"unknown argument {a!r}")
    return seconds, overrides


def _timed(iterator, seconds: float, count_fn):
    next(iterator)  # warm-up: fills buffers and thread pools
    start, n, stats = time.perf_counter(), 0, []
    while time.perf_counter() - start < seconds or n < 3:
        stats.append(count_fn(next(iterator)))
        n += 1
    return time.perf_counter() - start, stats


def run(args) -> dict:
    seconds, overrides = _parse(args)
    c = data_config_lib.default_data_config()
    for k, v in overrides.items():
        c[k] = type(c[k])(v)
    tpb = pipeline.tokens_per_batch(c)

    def pixel_stats(b):
        real = b["index"] >= 0
        per_example = batching.num_tokens(batching.latent_grid(b["video"].shape[1:4], c.vae_stride, c.patch))
        return int(real.sum()), per_example * int(real.sum()), per_example * len(real)

    elapsed, stats = _timed(pipeline.pixel_batches(c, "train", seed=0), seconds, pixel_stats)
    examples, real_tokens, padded_tokens = map(sum, zip(*stats))
    pixel = {"pixel_examples_per_s": examples / elapsed, "pixel_latent_tokens_per_s": real_tokens / elapsed,
             "padded_bucket_efficiency": real_tokens / padded_tokens,
             "bucket_budget_fill": float(np.mean([s[2] for s in stats]) / tpb), "pixel_batches": len(stats)}

    with tempfile.TemporaryDirectory() as tmp:
        n_cache = min(c.num_train, 512)
        latent_cache.cache_latents(c, pool_encode(c.vae_stride), tmp, split="train", num_examples=n_cache,
                                   batch_size=8, progress=False)
        c.latents_dir = tmp
        src = latent_cache.LatentSource(tmp, "train")
        sizes = [batching.num_tokens(batching.latent_grid(src[i]["pixel_shape"], c.vae_stride, c.patch))
                 for i in range(len(src))]

        def token_stats(b):
            return int((b["slot_index"] >= 0).sum()), int((b["segment_ids"] > 0).sum()), b["segment_ids"].size

        elapsed, stats = _timed(pipeline.token_batches(c, "train", seed=0), seconds, token_stats)
    examples, real_tokens, row_tokens = map(sum, zip(*stats))
    return {
        **pixel,
        "examples_per_s": examples / elapsed,
        "tokens_per_s": real_tokens / elapsed,
        "packing_efficiency": real_tokens / row_tokens,
        "pad_to_max_efficiency": float(np.mean(sizes) / np.max(sizes)),
        "token_batches": len(stats),
        "row_len": c.row_len, "batch_size": c.batch_size, "pixels": c.pixels, "frames": c.frames,
        "seconds": seconds,
    }
