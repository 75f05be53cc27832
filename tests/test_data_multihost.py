"""Multi-host data: disjoint process shards, and global batches sharded over (data, fsdp) on 8 devices."""

import jax
import numpy as np
from jax.sharding import PartitionSpec as P

from sora_jax import sharding
from sora_jax.data import config as data_config_lib, pipeline


def small_config():
    c = data_config_lib.default_data_config()
    c.num_train, c.num_eval, c.frames, c.pixels, c.prefetch = 24, 4, 5, 32 * 32, 0
    return c


def test_process_shards_are_disjoint_and_cover_the_split():
    c = small_config()
    c.max_batch_size = 2
    seen = []
    for p in range(3):
        batches = list(pipeline.pixel_batches(c, "eval", process_index=p, process_count=3))
        seen.append({int(i) for b in batches for i in b["index"] if i >= 0})
    assert all(s for s in seen) and not (seen[0] & seen[1] or seen[0] & seen[2] or seen[1] & seen[2])
    assert set().union(*seen) == set(range(24, 28))
    # Train: each process's infinite stream stays within its own share of the split:
    # p::n with the greedy policy, the examples of each shape dealt round-robin with
    # the shared schedule (the default with several processes).
    from sora_jax.data import bucket_schedule, sources

    split = sources.make_source(c, "train")
    dealt = bucket_schedule.deal(bucket_schedule.pixel_keys(c, split, range(len(split))), 2)
    for schedule, shares in (("greedy", [range(0, 24, 2), range(1, 24, 2)]), ("auto", dealt)):
        c.bucket_schedule = schedule
        firsts = [{int(i) for _ in range(4) for i in next(it)["index"] if i >= 0} for it in
                  (pipeline.pixel_batches(c, "train", seed=0, process_index=p, process_count=2) for p in range(2))]
        assert not firsts[0] & firsts[1] and firsts[0] and firsts[1]
        assert firsts[0] <= set(shares[0]) and firsts[1] <= set(shares[1]), schedule


def test_global_batch_sharding_on_8_devices():
    assert jax.device_count() == 8
    mesh = sharding.make_mesh({"data": 4, "fsdp": 2})
    rules = sharding.DEFAULT_RULES
    c = small_config()
    batch = next(pipeline.pixel_batches(c, "train", seed=0, batch_multiple=8))
    assert batch["video"].shape[0] % 8 == 0
    g = pipeline.to_global(batch, mesh, rules)
    assert g["video"].shape == batch["video"].shape
    assert g["video"].sharding.spec == P(("data", "fsdp"), None, None, None, None)
    assert g["video"].sharding.shard_shape(g["video"].shape)[0] == batch["video"].shape[0] // 8
    np.testing.assert_array_equal(np.asarray(g["index"]), batch["index"])
    # Token batches: every key's leading dim is sharded the same way.
    tokens = {"tokens": np.zeros((8, 16, 4), np.float32), "segment_ids": np.ones((8, 16), np.int32),
              "positions": np.zeros((8, 16, 3), np.int32), "slot_shape": np.zeros((8, 2, 3), np.int32),
              "text_ids": np.zeros((8, 2, 5), np.int32), "slot_index": np.zeros((8, 2), np.int64)}
    gt = pipeline.to_global(tokens, mesh, rules, pipeline.token_batch_axes())
    for key, value in gt.items():
        assert value.sharding.spec[0] == ("data", "fsdp"), key
        assert len(value.addressable_shards) == 8
