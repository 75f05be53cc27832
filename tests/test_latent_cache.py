"""Latent caching groups examples by pixel shape into full encode batches, and still writes in source order."""

import collections

import numpy as np
import pytest

from sora_jax.data import config as data_config_lib, latent_cache, sources, transforms


def small_config():
    c = data_config_lib.default_data_config()
    c.num_train, c.num_eval, c.frames, c.pixels = 40, 8, 9, 32 * 32
    return c


class CountingPoolEncode:
    """VAE double (average-pool 4x8x8, first frame alone, C = 4) that records every call's input shape."""

    def __init__(self):
        self.calls = []

    def __call__(self, videos):
        self.calls.append(videos.shape)
        b, t, h, w, _ = videos.shape
        first = videos[:, :1]
        rest = videos[:, 1:].reshape(b, (t - 1) // 4, 4, h, w, 3).mean(2) if t > 1 else videos[:, :0]
        x = np.concatenate([first, rest], 1)
        x = x.reshape(b, x.shape[1], h // 8, 8, w // 8, 8, 3).mean((3, 5))
        return np.concatenate([x, x[..., :1] * 0.5], -1)


def cached(tmp_path, name, **kw):
    c = small_config()
    encode = CountingPoolEncode()
    meta = latent_cache.cache_latents(c, encode, str(tmp_path / name), split="train", progress=False, **kw)
    src = latent_cache.LatentSource(str(tmp_path / name), "train")
    return meta, encode.calls, [src[i] for i in range(len(src))]


def test_one_full_batch_shape_per_pixel_shape_and_source_order(tmp_path):
    c = small_config()
    raw = sources.make_source(c, "train")
    transform = transforms.VideoTransform(c, train=False)
    videos = [transform(raw[i])["video"] for i in range(len(raw))]
    counts = collections.Counter(v.shape for v in videos)
    assert len(counts) > 3  # a real mix of native shapes

    meta, calls, records = cached(tmp_path, "a", batch_size=4, lookahead=64)
    # Every call is a full batch of one shape, so each pixel shape compiles exactly once.
    assert all(shape[0] == 4 for shape in calls)
    assert set(shape[1:] for shape in calls) == set(counts)
    assert len(calls) == sum(-(-n // 4) for n in counts.values()) == meta["encode_calls"]
    assert meta["filler_rows"] == 4 * len(calls) - len(raw) and meta["early_calls"] == 0
    # Records come out in source order with each example's own latent.
    assert [r["index"] for r in records] == [raw[i]["index"] for i in range(len(raw))]
    for record, video in zip(records, videos):
        np.testing.assert_allclose(record["latent"].astype(np.float32), CountingPoolEncode()(video[None])[0], atol=2e-3)
        assert record["pixel_shape"] == list(video.shape[:3])
    assert meta["num_examples"] == len(raw) and sum(meta["latent_shapes"].values()) == len(raw)


def test_short_lookahead_encodes_partial_buckets_early_with_the_same_records(tmp_path):
    _, _, full = cached(tmp_path, "full", batch_size=4, lookahead=64)
    meta, calls, early = cached(tmp_path, "early", batch_size=4, lookahead=5)
    assert meta["early_calls"] > 0 and all(shape[0] == 4 for shape in calls)
    assert len(early) == len(full)
    for a, b in zip(full, early):
        assert a["index"] == b["index"] and a["caption"] == b["caption"]
        np.testing.assert_array_equal(a["latent"], b["latent"])


def test_text_embeddings_follow_their_examples(tmp_path):
    def text_encode(captions):
        assert len(captions) == 3  # padded like the videos: one compile per batch size
        emb = np.stack([np.full((2, 3), len(c), np.float32) for c in captions])
        return emb, np.ones((len(captions), 2), bool)

    meta, _, records = cached(tmp_path, "text", batch_size=3, lookahead=64, num_examples=10,
                              text_encode_fn=text_encode)
    assert meta["text_embeddings"] and len(records) == 10
    for r in records:
        assert r["text_emb"].shape == (2, 3) and float(r["text_emb"][0, 0]) == len(r["caption"])


def test_bad_encoder_output_and_batch_size_are_errors(tmp_path):
    with pytest.raises(ValueError, match="encode_fn returned"):
        latent_cache.cache_latents(small_config(), lambda v: v[:1], str(tmp_path / "x"), split="eval", progress=False)
    with pytest.raises(ValueError, match="batch_size"):
        latent_cache.cache_latents(small_config(), CountingPoolEncode(), str(tmp_path / "y"), split="eval",
                                   batch_size=0, progress=False)
