"""A bucket schedule shared by all processes: one (T, H, W) and one batch size per step, everywhere.

With bucketing, each process batches its own share of the data; if each picked its
buckets from what it happens to hold (the greedy `batching.BucketPolicy`), two
processes could emit different shapes at the same step and a global jitted step
would fail. Here the bucket of every step is decided in advance, the same on every
process, with no communication. Every process computes the bucket keys of the same
examples of the *global* split from their shapes alone (`pixel_keys`: no rendering
for the toy world, no resizing anywhere), then:

  * exact (the split has at most `config.data.bucket_schedule_examples` examples, and
    always for eval): the examples of each key are dealt round-robin over the
    processes (`deal`), so every process holds the same number of each key, +-1;
  * sampled (bigger train splits): process p keeps the examples p, p + n, ...; key
    shares are estimated from a seeded sample of that many examples.

Train (infinite, reshuffled every epoch): key k gets `quotas[k]` batches per schedule
epoch, enough for each process's examples of k over `epochs` passes over its share
(`schedule_quotas`; several passes so that rounding up to whole batches wastes
little), and `SharedSchedule` interleaves those steps evenly; `ScheduledBucketPolicy`
emits the scheduled key from each process's own lookahead buffer. Eval (finite,
fixed): `finite_plan` lists every process's batches exactly (same keys, sizes and
number of steps; all examples once).

A batch short of examples is filled with rows marked index -1, which the stages mask
out. `config.data.bucket_schedule`: "auto" (shared with several processes, greedy with
one), "shared" or "greedy".
"""

from __future__ import annotations

import collections
import concurrent.futures
import logging
import math
from typing import Any, Callable, Sequence

import grain
import numpy as np

from sora_jax.data import batching, sources, transforms


def mode(data, process_count: int) -> str:
    """"shared" or "greedy" from config.data.bucket_schedule and the number of processes."""
    choice = data.get("bucket_schedule", "auto")
    if choice == "auto":
        return "shared" if process_count > 1 else "greedy"
    if choice not in ("shared", "greedy"):
        raise ValueError(f"config.data.bucket_schedule must be 'auto', 'shared' or 'greedy', got {choice!r}")
    return choice


class SharedSchedule:
    """The bucket key of every step, the same on every process, with no communication.

    An epoch of the schedule has `quotas[k]` steps of key k, evenly spaced over the
    epoch with a random phase per key, drawn from (seed, epoch): at any step each key
    is within about one batch of its share, and every epoch's order differs. The
    inputs are shared and the arithmetic is deterministic, so every host computes the
    same steps.
    """

    def __init__(self, keys: Sequence, quotas: Sequence[int], seed: int):
        if len(keys) != len(quotas) or not keys or min(quotas) < 1:
            raise ValueError(f"need one quota >= 1 per key, got {len(keys)} keys and quotas {list(quotas)}")
        self.keys = [tuple(k) for k in keys]
        self.quotas = np.asarray(quotas, np.int64)
        self.epoch_steps = int(self.quotas.sum())
        self.seed = int(seed)
        self._cache: tuple[int, np.ndarray] = (-1, np.zeros(0, np.int64))

    def index_at(self, step: int) -> int:
        """Index into `keys` of the bucket of global step `step` (0-based)."""
        epoch, offset = divmod(int(step), self.epoch_steps)
        cached_epoch, layout = self._cache  # one tuple: safe to share between iterator threads
        if cached_epoch != epoch:
            layout = self._interleave(epoch)
            self._cache = (epoch, layout)
        return int(layout[offset])

    def _interleave(self, epoch: int) -> np.ndarray:
        # Key k's steps sit at (j + phase_k) / quota_k of the epoch, j = 0 .. quota_k - 1:
        # evenly spaced, with a phase drawn per (seed, epoch); ties go in a shuffled key order.
        rng = np.random.default_rng([self.seed, epoch])
        phase, rank = rng.random(len(self.keys)), rng.permutation(len(self.keys))
        which = np.repeat(np.arange(len(self.keys)), self.quotas)
        nth = np.concatenate([np.arange(q) for q in self.quotas])
        when = (nth + phase[which]) / self.quotas[which]
        return which[np.lexsort((rank[which], when))]


def schedule_quotas(sizes: Sequence[int], counts_per_process: Sequence[Sequence[float]],
                    waste: float = 0.02) -> tuple[list[int], int]:
    """(batches of each key per schedule epoch, passes over the data per schedule epoch).

    counts_per_process[p][k]: (an estimate of) process p's examples of key k in one
    pass over its share; sizes[k]: the per-process batch size of key k. Key k gets
    enough batches for the process with the most examples of it, so no example is
    left behind; rounding up to whole batches wastes at most one batch per key, so a
    schedule epoch spans as many passes as keep that under `waste` of the rows. At
    least one batch per key, so no key is left out.
    """
    rows = min(sum(counts) for counts in counts_per_process)
    epochs = max(1, min(64, math.ceil(sum(sizes) / max(waste * rows, 1e-9))))
    quotas = [max(1, max(math.ceil(epochs * counts[k] / sizes[k] - 1e-6) for counts in counts_per_process))
              for k in range(len(sizes))]
    return quotas, epochs


class ScheduledBucketPolicy:
    """Bucketing where a `SharedSchedule` picks the key of every step (multi-process safe).

    Step s emits key `schedule.keys[i]` (i = schedule.index_at(s)) at its batch size
    `sizes[i]`: the oldest buffered examples of that key, reading on until there are
    enough or `lookahead` examples are buffered. If the key runs short the batch is
    filled with repeats marked index -1 (like the greedy policy's early emit); if none
    is buffered at all, with `blank(key)` rows (zeros, index -1). Examples whose key
    is not in the schedule are dropped on reading.

    A key the schedule under-serves (its share under-estimated from a sample) piles
    up in the buffer until it starves the others. So when the buffer is full and
    short of the scheduled key, the oldest example of a key holding more than 1.5x
    its natural amount (one batch plus its share of the lookahead; `shares[k]` =
    fraction of examples) is dropped to read on. Counted in the state: real_rows,
    filler_rows, empty_batches, dropped, unscheduled.
    """

    def __init__(self, schedule: SharedSchedule, sizes: Sequence[int], shares: Sequence[float], key_fn,
                 lookahead: int, finish: Callable[[list, int], dict], blank: Callable[[Any], dict]):
        self.schedule, self.sizes, self.key_fn = schedule, [int(x) for x in sizes], key_fn
        self.lookahead, self.finish, self.blank = max(int(lookahead), max(self.sizes)), finish, blank
        self.natural = [size + share * self.lookahead for size, share in zip(self.sizes, shares)]
        self.known = {key: i for i, key in enumerate(schedule.keys)}

    @staticmethod
    def initial_state() -> dict:
        return {"step": 0, "real_rows": 0, "filler_rows": 0, "empty_batches": 0, "dropped": 0, "unscheduled": 0}

    def take(self, buffer: list, fill: Callable[[int], bool], state: dict) -> dict | None:
        i = self.schedule.index_at(state["step"])
        key, size = self.schedule.keys[i], self.sizes[i]
        held: dict[Any, list[int]] = {}  # key -> buffer positions, oldest first
        for pos, (_, ex) in enumerate(buffer):
            held.setdefault(self.key_fn(ex), []).append(pos)
        while len(held.get(key, ())) < size:
            if len(buffer) >= self.lookahead:
                if not self._drop_hoarded(buffer, held, key):
                    break
                state["dropped"] += 1
                continue
            if not fill(len(buffer) + 1):
                if not buffer:
                    return None  # a finite stream ended
                break
            new_key = self.key_fn(buffer[-1][1])
            if new_key in self.known:
                held.setdefault(new_key, []).append(len(buffer) - 1)
            else:
                del buffer[-1]
                state["unscheduled"] += 1
        taken = held.get(key, [])[:size]
        examples = [buffer[pos][1] for pos in taken]
        for pos in reversed(taken):
            del buffer[pos]
        state["step"] += 1
        state["real_rows"] += len(examples)
        state["filler_rows"] += size - len(examples)
        if not examples:
            state["empty_batches"] += 1
            examples = [self.blank(key)]
        return self.finish(examples, size)

    def _drop_hoarded(self, buffer: list, held: dict, key) -> bool:
        """Drops the oldest example of the key most over its natural amount (> 1.5x); False if none is."""
        excess = {k: len(p) / self.natural[self.known[k]] for k, p in held.items() if k != key and p}
        worst = max(excess, key=lambda k: (excess[k], -held[k][0]), default=None)
        if worst is None or excess[worst] <= 1.5:
            return False
        gone = held[worst].pop(0)
        del buffer[gone]
        for positions in held.values():
            positions[:] = [p - (p > gone) for p in positions]
        return True


def deal(keys: Sequence, process_count: int) -> list[list[int]]:
    """Split indices of each process: the examples of every key dealt round-robin, in index order.

    Every process gets the same number of examples of each key, +-1 (the dealer moves
    on across keys, so the spare ones spread too); unreadable examples (key None) are
    dealt like a key of their own. Each process's list is sorted.
    """
    by_key: dict[Any, list[int]] = {}
    for i, key in enumerate(keys):
        by_key.setdefault(key, []).append(i)
    shares: list[list[int]] = [[] for _ in range(process_count)]
    turn = 0
    for key in sorted(by_key, key=lambda k: (k is None, k or ())):
        for i in by_key[key]:
            shares[turn].append(i)
            turn = (turn + 1) % process_count
    return [sorted(share) for share in shares]


def finite_plan(keys: Sequence, shares: Sequence[Sequence[int]], sizes: dict,
                process_index: int) -> list[tuple[Any, int, list[int]]]:
    """One process's batches of a finite split; the same (key, size) sequence on every process.

    keys[i]: bucket key of split example i (None = unreadable, left out); shares[p]:
    the split indices process p reads, as its ordinals 0, 1, 2, ... Keys go in order
    of first appearance in the split; key k gets as many batches as the process with
    the most examples of it needs. Returns [(key, batch size, ordinals)]; ordinals
    may be short or empty (filled with index -1 rows).
    """
    first = {}
    for key in keys:
        if key is not None:
            first.setdefault(key, len(first))
    held = [{key: [] for key in first} for _ in shares]  # process -> key -> ordinals
    for p, share in enumerate(shares):
        for ordinal, i in enumerate(share):
            if keys[i] is not None:
                held[p][keys[i]].append(ordinal)
    plan = []
    for key in first:
        size = sizes[key]
        mine = held[process_index][key]
        batches = max(math.ceil(len(h[key]) / size) for h in held)
        plan.extend((key, size, mine[b * size : (b + 1) * size]) for b in range(batches))
    return plan


class PlannedIterDataset(grain.IterDataset):
    """A fixed list of batches (`finite_plan`) read from a random-access `grain.MapDataset`.

    Each step reads its ordinals (with `read_threads` threads), stacks them with
    `finish(examples, size)` (short batches filled with index -1 repeats) or, when no
    example is left, `blank(key)` rows. The state is the next step; unreadable
    examples (None) are counted as skipped.
    """

    def __init__(self, parent: grain.MapDataset, plan: Sequence[tuple[Any, int, list[int]]],
                 finish: Callable[[list, int], dict], blank: Callable[[Any], dict], read_threads: int = 2):
        super().__init__(parent)
        self._map_parent, self.plan, self.finish, self.blank = parent, list(plan), finish, blank
        self.read_threads = max(1, read_threads)

    def __iter__(self):
        return _PlannedIterator(self)

    def __str__(self) -> str:
        return f"PlannedIterDataset(steps={len(self.plan)})"


class _PlannedIterator(grain.DatasetIterator):
    def __init__(self, spec: PlannedIterDataset):
        super().__init__()
        self._spec, self._step, self.num_skipped = spec, 0, 0
        self._pool = concurrent.futures.ThreadPoolExecutor(spec.read_threads) if spec.read_threads > 1 else None

    def __next__(self):
        if self._step >= len(self._spec.plan):
            raise StopIteration
        key, size, ordinals = self._spec.plan[self._step]
        read = self._spec._map_parent.__getitem__
        examples = list(self._pool.map(read, ordinals) if self._pool else map(read, ordinals))
        self.num_skipped += sum(ex is None for ex in examples)
        examples = [ex for ex in examples if ex is not None] or [self._spec.blank(key)]
        self._step += 1
        return self._spec.finish(examples, size)

    def get_state(self) -> dict:
        return {"step": int(self._step), "skipped": int(self.num_skipped)}

    def set_state(self, state: dict) -> None:
        self._step, self.num_skipped = int(state["step"]), int(state.get("skipped", 0))

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
        super().close()


# --- example shapes without the pixels ----------------------------------------------------


def clip_key(data, frames: int, height: int, width: int, fps: float) -> tuple[int, int, int, int]:
    """(T, H, W, 3) that `transforms.VideoTransform` makes of a (frames, height, width) video at `fps`.

    The clip length does not depend on the (random) clip start, so train and eval agree.
    """
    t = len(transforms.frame_indices(frames, fps, max_frames=data.frames, frame_stride=data.frame_stride,
                                     target_fps=data.fps))
    if data.resolution == "square_crop":
        height = width = min(height, width)
    h, w = transforms.target_size(height, width, data.resolution, pixels=data.pixels, size=data.size,
                                  multiple=data.multiple, out_height=data.height, out_width=data.width)
    return t, h, w, 3


def _record_key(data, record) -> tuple[int, int, int, int]:
    video = record["video"]
    if video.ndim != 4 or video.shape[0] == 0:
        raise sources.DataError(f"{transforms.where_of(record)}: expected a non-empty (T, H, W, 3) video, "
                                f"got {video.shape}")
    return clip_key(data, video.shape[0], video.shape[1], video.shape[2], float(record.get("fps") or 0.0))


def pixel_keys(data, source, indices: Sequence[int]) -> list:
    """The pixel key (T, H, W, 3) of source[i] for i in `indices`; None for a bad record (on_error=skip).

    The toy world's shapes come from its scene sampler, without rendering; other
    sources read the record (its video is decoded, nothing is resized).
    """
    if data.source == "toy" and isinstance(source, sources.IndexedSource):
        from sora_jax.data import toy_world

        world = toy_world.ToyWorld(data.toy, seed=data.toy_seed, num_examples=data.num_train + data.num_eval)

        def key_of(i):
            scene = world.scene(int(source.indices[int(i)]))  # the ground truth only, not rendered
            return clip_key(data, scene["num_frames"], scene["height"], scene["width"], float(world.config.fps))

        if len(indices) and key_of(indices[0]) != _record_key(data, source[indices[0]]):
            raise RuntimeError("toy world scenes no longer match their rendered videos: update "
                               "bucket_schedule.pixel_keys to ToyWorld's seeding")
    else:
        key_of = lambda i: _record_key(data, source[int(i)])
    return [transforms.skip_or_raise(key_of, data.on_error)(i) for i in indices]


# --- wiring for the pipelines ---------------------------------------------------------------


def train_dataset(ds: grain.MapDataset, keys: Sequence, shares: Sequence[Sequence[int]] | None, split_size: int,
                  process_count: int, seed: int, size_of: Callable[[Any], int], key_fn, blank, finish,
                  lookahead: int, read_threads: int) -> grain.IterDataset:
    """Scheduled buckets over one process's infinite, shuffled stream `ds`.

    `keys`: the keys of the split examples counted: all of them with `shares` (each
    process's split indices, from `deal`), or a sample (shares None: process p reads
    p::n); `size_of(key)`: per-process batch size.
    """
    counts = collections.Counter(k for k in keys if k is not None)
    if not counts:
        raise sources.DataError("no readable example to build the bucket schedule from")
    ordered = sorted(counts)
    sizes = [size_of(k) for k in ordered]
    if shares is not None:  # every example counted: each process's exact share
        per_process = [collections.Counter(keys[i] for i in share) for share in shares]
        counts_per_process = [[c[k] for k in ordered] for c in per_process]
    else:
        scale = split_size / len(keys) / process_count
        counts_per_process = [[counts[k] * scale for k in ordered]]
    quotas, epochs = schedule_quotas(sizes, counts_per_process)
    schedule = SharedSchedule(ordered, quotas, seed)
    rows = sum(q * s for q, s in zip(quotas, sizes))
    logging.info("bucket schedule: %d keys, %d steps per %d pass(es) over the data, %.1f%% filler rows from "
                 "rounding", len(ordered), schedule.epoch_steps, epochs,
                 100 * (1 - epochs * min(sum(c) for c in counts_per_process) / rows))
    if lookahead < sum(sizes):
        logging.warning("bucket schedule: config.data.bucket_lookahead=%d < the sum of the bucket batch sizes (%d): "
                        "expect many filler rows", lookahead, sum(sizes))
    shares_of_examples = [counts[k] / sum(counts.values()) for k in ordered]
    policy = ScheduledBucketPolicy(schedule, sizes, shares_of_examples, key_fn, lookahead, finish, blank)
    return batching.BatchingIterDataset(ds, policy, read_threads)


def sample_indices(split_size: int, num: int, seed: int) -> np.ndarray:
    """The split examples whose keys make the train schedule: all, or `num` drawn by `seed`."""
    if num <= 0 or num >= split_size:
        return np.arange(split_size)
    return np.sort(np.random.default_rng([seed, 0x5C4ED]).choice(split_size, num, replace=False))
