"""The shared bucket schedule: simulated processes emit the same shapes at every step, with no communication."""

import collections

import grain
import numpy as np
import pytest

from sora_jax.data import batching, bucket_schedule, config as data_config_lib, pipeline, sources, transforms
from batch_helpers import assert_batches_equal, take


def config(**overrides):
    c = data_config_lib.default_data_config()
    c.num_train, c.num_eval, c.frames, c.pixels = 192, 12, 9, 32 * 32
    c.bucket_lookahead, c.prefetch, c.read_threads = 128, 0, 1
    c.bucket_schedule = "shared"
    for k, v in overrides.items():
        c[k] = v
    return c


# --- pipelines: simulated processes ----------------------------------------------------------


@pytest.mark.parametrize("processes,counted", [(2, 4096), (4, 96)])  # every example counted / a sample
def test_processes_emit_the_same_shapes_every_step(processes, counted):
    c = config(bucket_schedule_examples=counted)
    its = [pipeline.pixel_batches(c, "train", seed=5, process_index=p, process_count=processes)
           for p in range(processes)]
    steps = 30
    batches = [take(it, steps) for it in its]
    shapes = [[b["video"].shape for b in per] for per in batches]
    assert all(s == shapes[0] for s in shapes)  # same (B, T, H, W) at every step on every process
    assert len(set(shapes[0])) >= 4  # and genuinely several buckets
    for per in batches:
        for b in per:
            assert b["text_ids"].shape[0] == b["index"].shape[0] == b["video"].shape[0]
    # Disjoint examples: no real example on two processes (within the first pass over the data).
    seen = [{int(i) for b in per for i in b["index"] if i >= 0} for per in batches]
    for p in range(processes):
        for q in range(p):
            assert not seen[p] & seen[q]
    real = sum(int(np.sum(b["index"] >= 0)) for per in batches for b in per)
    rows = sum(b["index"].shape[0] for per in batches for b in per)
    filler = 1 - real / rows
    states = [it.get_state()["policy"] for it in its]
    print(f"{processes} processes, counted {counted}: filler fraction {filler:.3f} over {rows} rows; {states}")
    assert filler < 0.15
    assert all(s["step"] == steps and s["filler_rows"] + s["real_rows"] == sum(b["index"].shape[0] for b in per)
               for s, per in zip(states, batches))


def test_resume_gives_the_same_next_batches():
    c = config(prefetch=1, read_threads=2)
    it = pipeline.pixel_batches(c, "train", seed=2, process_index=1, process_count=2)
    take(it, 7)
    state = it.get_state()
    rest = take(it, 6)
    resumed = pipeline.pixel_batches(c, "train", seed=2, process_index=1, process_count=2)
    resumed.set_state(state)
    assert_batches_equal(rest, take(resumed, 6))
    # The other process, restored at the same step, stays in lockstep.
    other = pipeline.pixel_batches(c, "train", seed=2, process_index=0, process_count=2)
    take(other, 7)
    assert [b["video"].shape[1:] for b in take(other, 6)] == [b["video"].shape[1:] for b in rest]
    greedy = pipeline.pixel_batches(config(bucket_schedule="greedy"), "train", seed=2)
    next(greedy)
    with pytest.raises(ValueError, match="bucket_schedule"):
        pipeline.pixel_batches(c, "train", seed=2, process_index=0, process_count=2).set_state(greedy.get_state())


def test_eval_plan_covers_the_split_once_in_lockstep():
    c = config()
    runs = [list(pipeline.pixel_batches(c, "eval", process_index=p, process_count=3)) for p in range(3)]
    assert len({len(r) for r in runs}) == 1 and len(runs[0]) > 1
    assert all([b["video"].shape for b in r] == [b["video"].shape for b in runs[0]] for r in runs)
    indices = [int(i) for r in runs for b in r for i in b["index"] if i >= 0]
    assert sorted(indices) == list(range(192, 204))  # every held-out example exactly once
    it = pipeline.pixel_batches(c, "eval", process_index=2, process_count=3)
    next(it)
    state = it.get_state()
    resumed = pipeline.pixel_batches(c, "eval", process_index=2, process_count=3)
    resumed.set_state(state)
    assert_batches_equal(list(it), list(resumed))


def test_one_process_keeps_the_greedy_policy_by_default():
    c = config(bucket_schedule="auto")
    it = pipeline.pixel_batches(c, "train", seed=0)
    next(it)
    assert "policy" not in it.get_state()
    with pytest.raises(ValueError, match="bucket_schedule"):
        pipeline.pixel_batches(config(bucket_schedule="sometimes"), "train")


# --- shapes without pixels ------------------------------------------------------------------------


def test_keys_match_the_transformed_videos(tmp_path):
    c = config()
    src = sources.make_source(c, "train")
    keys = bucket_schedule.pixel_keys(c, src, range(24))
    transform = transforms.VideoTransform(c, train=True)
    rng = np.random.default_rng(0)
    assert keys == [transform(src[i], rng)["video"].shape for i in range(24)]
    # Records read from shards (other sources): fps resampling, odd sizes, square crops, bad records.
    writer = sources.ShardWriter(str(tmp_path), 100, "v")
    shapes = [(13, 40, 72, 24.0), (7, 64, 48, 8.0), (1, 30, 30, 0.0), (0, 16, 16, 8.0), (20, 36, 20, 10.0)]
    for i, (t, h, w, fps) in enumerate(shapes):
        writer.write({"video": np.zeros((t, h, w, 3), np.uint8), "caption": "x", "fps": fps, "index": i})
    writer.close()
    for resolution, fps in (("native", 0.0), ("native", 8.0), ("square_crop", 0.0), ("resize", 4.0)):
        d = config(source="arrayrecord", arrayrecord=str(tmp_path), num_train=0, num_eval=1, resolution=resolution,
                   fps=fps, size=32, on_error="skip")
        split = sources.make_source(d, "train")
        transform = transforms.VideoTransform(d, train=False)
        want = [None if i == 3 else transform(split[i])["video"].shape for i in range(4)]
        assert bucket_schedule.pixel_keys(d, split, range(4)) == want, (resolution, fps)


# --- the pieces ----------------------------------------------------------------------------------


def test_schedule_is_shared_even_and_seeded():
    keys = [(1,), (2,), (3,)]
    schedule = bucket_schedule.SharedSchedule(keys, [5, 3, 1], seed=0)
    epoch = [schedule.index_at(s) for s in range(9)]
    assert collections.Counter(epoch) == {0: 5, 1: 3, 2: 1}
    # Evenly interleaved: never two steps of the rarer keys in a row.
    assert all(not (a == b != 0) for a, b in zip(epoch, epoch[1:]))
    again = bucket_schedule.SharedSchedule(keys, [5, 3, 1], seed=0)
    assert [again.index_at(s) for s in range(60)] == [schedule.index_at(s) for s in range(60)]
    other = bucket_schedule.SharedSchedule(keys, [5, 3, 1], seed=1)
    assert [other.index_at(s) for s in range(90)] != [schedule.index_at(s) for s in range(90)]
    quotas, epochs = bucket_schedule.schedule_quotas([4, 8], [[10, 3], [9, 5]], waste=0.5)
    assert epochs == 2 and quotas == [5, 2]  # 2 passes: ceil(2 * 10 / 4), ceil(2 * 5 / 8)


def test_deal_balances_every_key_over_processes():
    rng = np.random.default_rng(0)
    keys = [tuple(rng.integers(0, 4, 1)) for _ in range(101)] + [None]
    shares = bucket_schedule.deal(keys, 3)
    assert sorted(i for s in shares for i in s) == list(range(102))
    for key in set(keys):
        counts = [sum(keys[i] == key for i in s) for s in shares]
        assert max(counts) - min(counts) <= 1


def synthetic_stream(widths, seed=0):
    """Examples whose key is a tiny (1, 1, W, 3) video: the policy's bookkeeping, without pixels."""
    ds = grain.MapDataset.source(list(widths)).shuffle(seed=seed).repeat()
    return ds.map(lambda w: {"video": np.zeros((1, 1, w, 3), np.float32), "text_ids": np.zeros(2, np.int32),
                             "index": np.int64(w)})


def scheduled(stream, keys, quotas, sizes, lookahead=32):
    schedule = bucket_schedule.SharedSchedule(keys, quotas, seed=0)
    blank = lambda key: {"video": np.zeros(key, np.float32), "text_ids": np.zeros(2, np.int32), "index": np.int64(-1)}
    policy = bucket_schedule.ScheduledBucketPolicy(schedule, sizes, [1 / len(keys)] * len(keys),
                                                   lambda ex: ex["video"].shape, lookahead, batching.stack_bucket, blank)
    return iter(batching.BatchingIterDataset(stream, policy, read_threads=1))


def test_unknown_and_underserved_keys_are_dropped_not_hoarded():
    # Width 3 is not in the schedule; width 2 arrives 3x as often as it is scheduled.
    stream = synthetic_stream([1] * 10 + [2] * 30 + [3] * 2)
    it = scheduled(stream, [(1, 1, 1, 3), (1, 1, 2, 3)], quotas=[10, 10], sizes=[1, 1])
    for _ in range(400):
        b = next(it)
        assert b["video"].shape[0] == 1
    state = it.get_state()
    assert state["policy"]["unscheduled"] > 0 and state["policy"]["dropped"] > 0
    assert len(state["buffer"]) <= 32
    # A key with nothing buffered at all still gets its shape: a blank batch.
    it = scheduled(synthetic_stream([1] * 4), [(1, 1, 1, 3), (1, 1, 5, 3)], quotas=[1, 1], sizes=[2, 2], lookahead=4)
    shapes = [next(it)["video"].shape for _ in range(4)]
    assert sorted(set(shapes)) == [(2, 1, 1, 1, 3), (2, 1, 1, 5, 3)]
    assert it.get_state()["policy"]["empty_batches"] == 2
