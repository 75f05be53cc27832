"""Transforms, packing, bucketing and the checkpointable pipelines (toy world, tiny sizes)."""

import math

import numpy as np
import pytest

from sora_jax.data import batching, config as data_config_lib, pipeline, sources, transforms
from sora_jax.models import patches
from batch_helpers import assert_batches_equal, take


def small_config(**overrides):
    c = data_config_lib.default_data_config()
    c.num_train, c.num_eval = 48, 8
    c.frames = 9
    c.pixels = 32 * 32
    c.size = 32
    c.batch_size = 4
    c.row_len = 128
    c.max_slots = 8
    c.pack_lookahead = 16
    c.bucket_lookahead = 24
    c.prefetch = 1
    for k, v in overrides.items():
        c[k] = v
    return c


class PoolEncode:
    """Test double for the VAE: average-pool 4x8x8 (first frame alone), channels from RGB."""

    def __call__(self, videos):
        b, t, h, w, _ = videos.shape
        first = videos[:, :1]
        rest = videos[:, 1:].reshape(b, (t - 1) // 4, 4, h, w, 3).mean(2) if t > 1 else videos[:, :0]
        x = np.concatenate([first, rest], 1)
        x = x.reshape(b, x.shape[1], h // 8, 8, w // 8, 8, 3).mean((3, 5))
        return np.concatenate([x, x[..., :1] * 0.5], -1)  # C = 4


# --- transforms -----------------------------------------------------------------


def test_frame_sampling_rounds_to_1_plus_4k():
    for n in range(1, 30):
        idx = transforms.frame_indices(n, 8.0, max_frames=17)
        assert (len(idx) - 1) % 4 == 0 and len(idx) <= min(n, 17) and idx.max() < n
    idx = transforms.frame_indices(40, 24.0, max_frames=9, target_fps=8.0)
    np.testing.assert_array_equal(idx, np.arange(9) * 3)  # 24 -> 8 fps is every 3rd frame
    late = transforms.frame_indices(40, 24.0, max_frames=9, target_fps=8.0, start=1.0)
    np.testing.assert_array_equal(late, 15 + np.arange(9) * 3)  # start=1: the clip ends at the last frame


@pytest.mark.parametrize("hw", [(56, 72), (48, 88), (88, 48), (40, 96), (64, 64), (720, 1280), (1080, 1920)])
def test_native_keeps_aspect_ratio_and_budget(hw):
    h, w = transforms.native_size(*hw, pixels=256 * 256, multiple=16)
    assert h % 16 == 0 and w % 16 == 0 and h * w <= 256 * 256
    assert h * w >= 0.75 * 256 * 256
    # Within rounding: one multiple on the shorter side.
    assert abs(math.log((h / w) / (hw[0] / hw[1]))) <= math.log(1 + 16 / min(h, w))


def test_square_crop_gives_squares_and_resize_fixed():
    video = np.random.default_rng(0).integers(0, 255, (5, 48, 80, 3), dtype=np.uint8)
    c = small_config(resolution="square_crop", size=32)
    out = transforms.apply_resolution(video, c)
    assert out.shape == (5, 32, 32, 3)
    c = small_config(resolution="resize", height=16, width=48)
    assert transforms.apply_resolution(video, c).shape == (5, 16, 48, 3)
    # Centre crop keeps the middle columns.
    video[:, :, :16] = 0
    video[:, :, -16:] = 255
    crop = transforms.centre_crop_square(video)
    assert crop.shape[1:3] == (48, 48) and crop[0, 0, 0, 0] == video[0, 0, 16, 0]


def test_random_crop_keeps_native_scale_and_varies_the_window():
    # Pixel values encode their native (row, col), so a crop must be a contiguous window of the
    # native frame (no rescaling), placed at random in training and centred without an rng.
    rows, cols = np.meshgrid(np.arange(48), np.arange(80), indexing="ij")
    video = np.stack([rows, cols, np.zeros_like(rows)], -1).astype(np.uint8)[None].repeat(5, 0)
    c = small_config(resolution="random_crop", pixels=48 * 80, multiple=16, size=32)
    centre = transforms.apply_resolution(video, c)
    assert centre.shape == (5, 32, 32, 3)
    assert centre[0, 0, 0, 0] == 8 and centre[0, 0, 0, 1] == 24
    tops_lefts = set()
    for seed in range(20):
        out = transforms.apply_resolution(video, c, np.random.default_rng(seed))
        top, left = int(out[0, 0, 0, 0]), int(out[0, 0, 0, 1])
        np.testing.assert_array_equal(out[0, :, :, 0], rows[top : top + 32, left : left + 32])
        np.testing.assert_array_equal(out[0, :, :, 1], cols[top : top + 32, left : left + 32])
        tops_lefts.add((top, left))
    assert len(tops_lefts) > 5
    # A frame smaller than the window is enlarged to cover it, keeping its aspect ratio.
    small = transforms.apply_resolution(video[:, :16, :24], small_config(resolution="random_crop", pixels=48 * 80,
                                                                          multiple=8, size=32))
    assert small.shape == (5, 32, 32, 3)
    # The pipeline's shape bookkeeping agrees with the transform.
    from sora_jax.data import bucket_schedule

    assert bucket_schedule.clip_key(c, 5, 48, 80, 8.0) == (5, 32, 32, 3)
    with pytest.raises(ValueError, match="config.data.resolution"):
        transforms.target_size(48, 80, "crop", pixels=64, size=32, multiple=16)


def test_video_transform_range_and_caption_choice():
    c = small_config(caption="short")
    src = sources.make_source(c, "train")
    ex = transforms.VideoTransform(c, train=False)(src[0])
    assert ex["video"].dtype == np.float32 and -1.0 <= ex["video"].min() and ex["video"].max() <= 1.0
    assert ex["video"].shape[1] % 16 == 0 and (ex["video"].shape[0] - 1) % 4 == 0
    from sora_jax.data.tokenizer import HashTokenizer

    np.testing.assert_array_equal(ex["text_ids"], HashTokenizer(c.vocab_size, c.text_len).encode(src[0]["short_caption"]))


def test_splits_are_disjoint():
    c = small_config()
    train, held = sources.make_source(c, "train"), sources.make_source(c, "eval")
    assert set(train.indices).isdisjoint(held.indices) and len(train) == 48 and len(held) == 8


# --- packing ------------------------------------------------------------------------


def random_token_examples(n, seed=0, dim=6):
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        grid = (int(rng.integers(1, 4)), int(rng.integers(1, 4)), int(rng.integers(1, 5)))
        out.append({"tokens": rng.normal(size=(int(np.prod(grid)), dim)).astype(np.float32),
                    "grid": np.asarray(grid, np.int32), "text_ids": rng.integers(0, 50, (7,)).astype(np.int32),
                    "index": np.int64(100 + i)})
    return out


def test_packing_never_mixes_examples_and_round_trips():
    examples = random_token_examples(40)
    policy = batching.PackPolicy(batch_size=3, row_len=40, max_slots=6, text_len=7, lookahead=10)
    buffer = [(i, ex) for i, ex in enumerate(examples)]
    batches = []
    while buffer:
        batches.append(policy.take(buffer, lambda n: len(buffer) >= n))
    back = {ex["index"]: ex for b in batches for ex in batching.unpack(b)}
    assert sorted(back) == [ex["index"] for ex in examples]
    for b in batches:
        seg, pos = b["segment_ids"], b["positions"]
        for r in range(seg.shape[0]):
            # Segments are contiguous runs 1, 2, ..., then padding (0) at the end.
            ids = seg[r][seg[r] > 0]
            assert np.all(np.diff(ids) >= 0) and np.all(seg[r][len(ids):] == 0)
            for k in range(b["slot_index"].shape[1]):
                if b["slot_index"][r, k] < 0:
                    assert not np.any(seg[r] == k + 1) and np.all(b["slot_shape"][r, k] == 0)
                    continue
                np.testing.assert_array_equal(pos[r][seg[r] == k + 1], patches.grid_positions(b["slot_shape"][r, k]))
    for ex in examples:
        got = back[ex["index"]]
        np.testing.assert_array_equal(got["tokens"], ex["tokens"])
        np.testing.assert_array_equal(got["grid"], ex["grid"])
        np.testing.assert_array_equal(got["text_ids"], ex["text_ids"])
        latent = patches.unpatchify(got["tokens"], got["grid"], (1, 1, 1), 6)
        assert latent.shape[:3] == tuple(ex["grid"])


def test_pixel_tokens_round_trip():
    video = np.random.default_rng(1).normal(size=(5, 32, 48, 3)).astype(np.float32)
    ex = batching.pixel_tokens({"video": video, "text_ids": np.ones(4, np.int32), "index": np.int64(3)}, (1, 16, 16))
    b = batching.pack_rows([[ex]], 40, 2, 4)
    (back,) = batching.unpack(b)
    np.testing.assert_array_equal(patches.unpatchify(back["tokens"], back["grid"], (1, 16, 16), 3), video)


def test_bucket_batch_sizes_keep_tokens_constant():
    assert batching.bucket_batch_size(100, 1000, 64) == 10
    assert batching.bucket_batch_size(5, 1000, 64) == 64
    assert batching.bucket_batch_size(3000, 1000, 64) == 1
    assert batching.bucket_batch_size(100, 1000, 64, multiple=4) == 8


# --- pipelines ------------------------------------------------------------------------


def test_pixel_batches_deterministic_bucketed_and_resumable():
    c = small_config()
    it = pipeline.pixel_batches(c, "train", seed=3)
    first = take(it, 6)
    for b in first:
        assert b["video"].ndim == 5 and b["video"].shape[0] == b["index"].shape[0] == b["text_ids"].shape[0]
    assert len({b["video"].shape[1:] for b in first}) > 1  # several buckets
    assert_batches_equal(first, take(pipeline.pixel_batches(c, "train", seed=3), 6))
    # Checkpoint in the middle, resume in a fresh iterator: exactly the same next batches.
    it = pipeline.pixel_batches(c, "train", seed=3)
    take(it, 3)
    state = it.get_state()
    rest = take(it, 3)
    resumed = pipeline.pixel_batches(c, "train", seed=3)
    resumed.set_state(state)
    assert_batches_equal(rest, take(resumed, 3))
    assert_batches_equal(first[3:], rest)
    other = take(pipeline.pixel_batches(c, "train", seed=4), 1)[0]
    assert not np.array_equal(other["index"], first[0]["index"])


def test_eval_split_is_fixed_and_held_out():
    c = small_config()
    eval_a = list(pipeline.pixel_batches(c, "eval"))
    eval_b = list(pipeline.pixel_batches(c, "eval"))
    assert_batches_equal(eval_a, eval_b)
    seen = sorted(int(i) for b in eval_a for i in b["index"] if i >= 0)
    assert seen == list(range(48, 56))


@pytest.fixture(scope="module")
def latent_dir(tmp_path_factory):
    from sora_jax.data import latent_cache

    out = str(tmp_path_factory.mktemp("latents"))
    c = small_config()
    meta = latent_cache.cache_latents(c, PoolEncode(), out, split="train", num_examples=40, batch_size=4,
                                      progress=False)
    latent_cache.cache_latents(c, PoolEncode(), out, split="eval", num_examples=0, batch_size=4, progress=False)
    assert meta["num_examples"] == 40
    return out


def test_latent_cache_matches_encoder(latent_dir):
    from sora_jax.data import latent_cache

    c = small_config()
    src = latent_cache.LatentSource(latent_dir, "train")
    raw = sources.make_source(c, "train")
    rec = src[5]
    video = transforms.VideoTransform(c, train=False)(raw[5])["video"]
    want = PoolEncode()(video[None])[0]
    np.testing.assert_allclose(rec["latent"].astype(np.float32), want, atol=2e-3)
    assert rec["caption"] == raw[5]["caption"] and rec["index"] == raw[5]["index"]


@pytest.mark.parametrize("mode", ["pack", "bucket"])
def test_token_batches_resume_exactly(latent_dir, mode):
    c = small_config(latents_dir=latent_dir, batching=mode)
    it = pipeline.token_batches(c, "train", seed=1)
    first = take(it, 4)
    b = first[0]
    assert b["tokens"].ndim == 3 and b["segment_ids"].shape == b["tokens"].shape[:2]
    assert b["positions"].shape == b["tokens"].shape[:2] + (3,) and b["text_ids"].shape[-1] == c.text_len
    if mode == "pack":
        assert all(x["tokens"].shape == (c.batch_size, c.row_len, 16) for x in first)
    state = it.get_state()
    rest = take(it, 3)
    resumed = pipeline.token_batches(c, "train", seed=1)
    resumed.set_state(state)
    assert_batches_equal(rest, take(resumed, 3))


def test_packed_token_batches_hold_the_cached_latents(latent_dir):
    from sora_jax.data import latent_cache

    c = small_config(latents_dir=latent_dir)
    src = latent_cache.LatentSource(latent_dir, "train")
    by_index = {int(src[i]["index"]): src[i]["latent"] for i in range(len(src))}
    batches = list(pipeline.token_batches(c, "eval"))
    eval_src = latent_cache.LatentSource(latent_dir, "eval")
    eval_latents = {int(eval_src[i]["index"]): eval_src[i]["latent"] for i in range(len(eval_src))}
    got = [ex for b in batches for ex in batching.unpack(b)]
    assert sorted(e["index"] for e in got) == sorted(eval_latents)
    for ex in got:
        latent = patches.unpatchify(ex["tokens"], ex["grid"], c.patch, 4)
        np.testing.assert_array_equal(latent, eval_latents[ex["index"]].astype(np.float32))
    assert set(by_index).isdisjoint(eval_latents)
