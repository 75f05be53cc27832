"""Variable-size batching: bucketing by shape, and NaViT packing of token sequences.

Examples come in many shapes (aspect ratios x durations, 1-frame images included).
Two ways to batch them, chosen by `config.data.batching`:

  * **bucketing** (Open-Sora): group examples of equal (T, H, W); a bucket's batch size
    is `tokens_per_batch // tokens(T, H, W)`, so every batch costs about the same.
    No padding inside a batch, but one compiled step per bucket shape.
  * **packing** (NaViT): concatenate the token sequences of several examples into
    rows of a fixed `row_len`, with `segment_ids` (which example a token belongs to)
    and per-token (t, h, w) `positions` restarting at 0 for every example. One
    static shape under jit; the padding is only what is left at the end of a row.

Both work on any example that has `tokens` (N, D) and a `grid` (gt, gh, gw): latents
patchified with models/patches.py, or pixels patchified with a pixel patch
(`pixel_tokens`). `BatchingIterDataset` runs a policy over a random-access grain
dataset with a lookahead buffer whose state (read position + ordinals still in the
buffer + the policy's counters) is checkpointable: a restored iterator refetches the
buffered examples and continues with exactly the next batch.

Several processes each batch their own slice of the data. `BucketPolicy` (greedy)
lets each process pick its buckets, so processes can hold different shapes at the
same step; data/bucket_schedule.py fixes the bucket of every step in advance,
identically on every process, with no communication.
"""

from __future__ import annotations

import concurrent.futures
from typing import Any, Callable, Sequence

import grain
import numpy as np

from sora_jax.models import patches

# --- token accounting ----------------------------------------------------------


def latent_grid(thw: Sequence[int], vae_stride: Sequence[int], patch: Sequence[int]) -> tuple[int, int, int]:
    """Patch grid of a pixel clip (T, H, W) after the VAE (T' = 1 + (T-1)/st) and patchify."""
    t, h, w = thw
    st, sh, sw = vae_stride
    pt, ph, pw = patch
    return ((t - 1) // st + 1) // pt, h // sh // ph, w // sw // pw


def num_tokens(grid: Sequence[int]) -> int:
    return int(np.prod(grid))


def bucket_batch_size(tokens: int, tokens_per_batch: int, max_batch_size: int, multiple: int = 1) -> int:
    """Open-Sora style: about constant tokens per batch, rounded down to `multiple` (>= multiple)."""
    size = min(max_batch_size, max(1, tokens_per_batch // max(1, tokens)))
    return max(multiple, size // multiple * multiple)


# --- examples as token sequences ------------------------------------------------------


def token_example(latent: np.ndarray, patch: Sequence[int], text_ids: np.ndarray, index: int, **extra) -> dict:
    """A latent (T', H', W', C) -> {tokens (N, D), grid, text_ids, index, ...}."""
    grid = patches.grid_shape(latent.shape[:3], patch)
    return {"tokens": patches.patchify(np.asarray(latent, np.float32), patch), "grid": np.asarray(grid, np.int32),
            "text_ids": text_ids, "index": np.int64(index), **extra}


def pixel_tokens(example: dict, pixel_patch: Sequence[int]) -> dict:
    """A pixel example {video (T,H,W,3), ...} -> a token example (pixel patches as tokens)."""
    video = example["video"]
    grid = patches.grid_shape(video.shape[:3], pixel_patch)
    out = {k: v for k, v in example.items() if k != "video"}
    out.update(tokens=patches.patchify(video, pixel_patch), grid=np.asarray(grid, np.int32))
    return out


# --- packing --------------------------------------------------------------------------


def choose_row(sizes: Sequence[int], row_len: int, max_slots: int) -> list[int]:
    """Buffer positions to pack into one row.

    The oldest example goes first (so no example waits forever), then best fit:
    repeatedly the largest example that still fits (earliest on ties).
    """
    if sizes[0] > row_len:
        raise ValueError(f"an example has {sizes[0]} tokens > row_len={row_len}; raise config.data.row_len")
    chosen, free = [0], row_len - sizes[0]
    order = sorted(range(1, len(sizes)), key=lambda i: (-sizes[i], i))
    for i in order:
        if len(chosen) == max_slots or free == 0:
            break
        if sizes[i] <= free:
            chosen.append(i)
            free -= sizes[i]
    return chosen


def pack_rows(rows: Sequence[Sequence[dict]], row_len: int, max_slots: int, text_len: int) -> dict:
    """Rows of token examples -> a token batch (docs/architecture.md contract)."""
    b = len(rows)
    dim = next(ex["tokens"].shape[-1] for row in rows for ex in row)
    out = {
        "tokens": np.zeros((b, row_len, dim), np.float32),
        "segment_ids": np.zeros((b, row_len), np.int32),
        "positions": np.zeros((b, row_len, 3), np.int32),
        "slot_shape": np.zeros((b, max_slots, 3), np.int32),
        "text_ids": np.zeros((b, max_slots, text_len), np.int32),
        "slot_index": np.full((b, max_slots), -1, np.int64),
    }
    has_emb = any("text_emb" in ex for row in rows for ex in row)
    if has_emb:
        s, d = next(ex["text_emb"].shape for row in rows for ex in row if "text_emb" in ex)
        out["text_emb"] = np.zeros((b, max_slots, s, d), np.float32)
        out["text_mask"] = np.zeros((b, max_slots, s), bool)
    for r, row in enumerate(rows):
        if len(row) > max_slots:
            raise ValueError(f"row {r} has {len(row)} examples > max_slots={max_slots}")
        start = 0
        for k, ex in enumerate(row):
            n = ex["tokens"].shape[0]
            if start + n > row_len:
                raise ValueError(f"row {r} overflows row_len={row_len}")
            out["tokens"][r, start : start + n] = ex["tokens"]
            out["segment_ids"][r, start : start + n] = k + 1
            out["positions"][r, start : start + n] = patches.grid_positions(ex["grid"])
            out["slot_shape"][r, k] = ex["grid"]
            out["text_ids"][r, k] = ex["text_ids"]
            out["slot_index"][r, k] = ex["index"]
            if has_emb:
                out["text_emb"][r, k] = ex["text_emb"]
                out["text_mask"][r, k] = ex.get("text_mask", np.ones(ex["text_emb"].shape[0], bool))
            start += n
    return out


def unpack(batch: dict) -> list[dict]:
    """A token batch -> its examples {tokens, positions, grid, text_ids, index}, row-major order."""
    examples = []
    for r in range(batch["segment_ids"].shape[0]):
        for k in range(batch["slot_index"].shape[1]):
            if batch["slot_index"][r, k] < 0:
                continue
            mask = batch["segment_ids"][r] == k + 1
            examples.append({
                "tokens": batch["tokens"][r][mask], "positions": batch["positions"][r][mask],
                "grid": batch["slot_shape"][r, k], "text_ids": batch["text_ids"][r, k],
                "index": int(batch["slot_index"][r, k]),
            })
    return examples


def packing_efficiency(batch: dict) -> float:
    """Fraction of real (non-padding) tokens in a token batch."""
    return float(np.mean(batch["segment_ids"] > 0))


def stack_bucket(examples: Sequence[dict], batch_size: int) -> dict:
    """Same-shape examples -> one batch; a short bucket is filled with repeats (index -1)."""
    fill = [examples[i % len(examples)] for i in range(batch_size)]
    out = {k: np.stack([ex[k] for ex in fill]) for k in examples[0] if k not in ("grid",)}
    out["index"] = out["index"].astype(np.int64)
    out["index"][len(examples) :] = -1
    return out


# --- policies: which buffered examples form the next batch ---------------------------


class PackPolicy:
    """Fixed (batch_size, row_len) token batches, greedy best-fit over the buffer."""

    def __init__(self, batch_size: int, row_len: int, max_slots: int, text_len: int, lookahead: int):
        self.batch_size, self.row_len, self.max_slots = batch_size, row_len, max_slots
        self.text_len, self.lookahead = text_len, max(lookahead, max_slots)

    def take(self, buffer: list, fill: Callable[[int], bool]) -> dict | None:
        rows = []
        for _ in range(self.batch_size):
            fill(self.lookahead)
            if not buffer:
                break
            chosen = choose_row([ex["tokens"].shape[0] for _, ex in buffer], self.row_len, self.max_slots)
            rows.append([buffer[i][1] for i in chosen])
            for i in sorted(chosen, reverse=True):
                del buffer[i]
        if not rows:
            return None
        while len(rows) < self.batch_size:  # End of a finite (eval) set: empty rows.
            rows.append([])
        return pack_rows(rows, self.row_len, self.max_slots, self.text_len) if any(rows) else None


class BucketPolicy:
    """Batches of one shape; size from the token budget; partial buckets flushed on overflow.

    `key_fn(example)` is the bucket key and `tokens_fn(example)` its token count;
    `finish(examples, batch_size)` builds the batch (pixel: stack_bucket; tokens: rows).
    """

    def __init__(self, key_fn, tokens_fn, tokens_per_batch: int, max_batch_size: int, lookahead: int,
                 finish: Callable[[list, int], dict], batch_multiple: int = 1):
        self.key_fn, self.tokens_fn, self.finish = key_fn, tokens_fn, finish
        self.tokens_per_batch, self.max_batch_size = tokens_per_batch, max_batch_size
        self.lookahead, self.batch_multiple = lookahead, batch_multiple

    def size_of(self, example) -> int:
        return bucket_batch_size(self.tokens_fn(example), self.tokens_per_batch, self.max_batch_size,
                                 self.batch_multiple)

    def take(self, buffer: list, fill: Callable[[int], bool]) -> dict | None:
        while True:
            groups: dict[Any, list[int]] = {}
            for pos, (_, ex) in enumerate(buffer):
                groups.setdefault(self.key_fn(ex), []).append(pos)
            # A full bucket, the one whose oldest example is oldest, goes first.
            for key, members in sorted(groups.items(), key=lambda kv: kv[1][0]):
                size = self.size_of(buffer[members[0]][1])
                if len(members) >= size:
                    return self._emit(buffer, members[:size], size)
            more = fill(len(buffer) + 1) if len(buffer) < self.lookahead else False
            if not more:
                if not buffer:
                    return None
                # Overflow or end of data: flush the bucket of the oldest example, padded.
                members = groups[self.key_fn(buffer[0][1])]
                return self._emit(buffer, members, self.size_of(buffer[0][1]))

    def _emit(self, buffer: list, members: list[int], size: int) -> dict:
        examples = [buffer[i][1] for i in members]
        for i in sorted(members, reverse=True):
            del buffer[i]
        return self.finish(examples, size)


# --- the checkpointable grain transformation -------------------------------------------


class BatchingIterDataset(grain.IterDataset):
    """Runs a batching policy over a random-access `grain.MapDataset` of examples.

    Examples are read in order (ordinal 0, 1, 2, ...) by `read_threads` threads
    ahead of use; `None` elements (skipped bad records) are dropped. The state is
    {"next": next ordinal to read, "buffer": ordinals waiting in the buffer,
    "skipped", and "policy": the counters of a policy that keeps some (its
    `initial_state()`)}, so a restored iterator rebuilds the same buffer and yields
    exactly the next batch.
    """

    def __init__(self, parent: grain.MapDataset, policy, read_threads: int = 2):
        super().__init__(parent)
        self._map_parent, self.policy, self.read_threads = parent, policy, read_threads

    def __iter__(self):
        return _BatchingIterator(self._map_parent, self.policy, self.read_threads)

    def __str__(self) -> str:
        return f"BatchingIterDataset(policy={type(self.policy).__name__})"


class _BatchingIterator(grain.DatasetIterator):
    def __init__(self, parent: grain.MapDataset, policy, read_threads: int):
        super().__init__()
        self._ds, self._policy, self._threads = parent, policy, max(1, read_threads)
        self._length = len(parent)
        self._next = 0
        self._buffer: list[tuple[int, dict]] = []
        self._pool = concurrent.futures.ThreadPoolExecutor(self._threads) if self._threads > 1 else None
        self._futures: dict[int, concurrent.futures.Future] = {}
        self.num_skipped = 0
        self._policy_state = policy.initial_state() if hasattr(policy, "initial_state") else None

    def _read(self, ordinal: int):
        if self._pool is None:
            return self._ds[ordinal]
        # Keep up to 2 x threads reads in flight ahead of the cursor.
        for o in range(ordinal, min(self._length, ordinal + 2 * self._threads)):
            if o not in self._futures:
                self._futures[o] = self._pool.submit(self._ds.__getitem__, o)
        return self._futures.pop(ordinal).result()

    def _fill(self, target: int) -> bool:
        """Reads until the buffer holds `target` examples; False if the data ran out first."""
        while len(self._buffer) < target:
            if self._next >= self._length:
                return False
            ordinal, self._next = self._next, self._next + 1
            example = self._read(ordinal)
            if example is None:
                self.num_skipped += 1
                continue
            self._buffer.append((ordinal, example))
        return True

    def __next__(self):
        if self._policy_state is None:
            batch = self._policy.take(self._buffer, self._fill)
        else:
            batch = self._policy.take(self._buffer, self._fill, self._policy_state)
        if batch is None:
            raise StopIteration
        return batch

    def get_state(self) -> dict:
        state = {"next": int(self._next), "buffer": [int(o) for o, _ in self._buffer],
                 "skipped": int(self.num_skipped)}
        if self._policy_state is not None:
            state["policy"] = {k: int(v) for k, v in self._policy_state.items()}
        return state

    def set_state(self, state: dict) -> None:
        for future in self._futures.values():
            future.cancel()
        self._futures = {}
        self._next = int(state["next"])
        self.num_skipped = int(state.get("skipped", 0))
        if self._policy_state is not None:
            if "policy" not in state:
                raise ValueError(f"data iterator state {sorted(state)} has no 'policy' entry: it was saved with "
                                 f"another batching policy than {type(self._policy).__name__} "
                                 f"(config.data.bucket_schedule changed?)")
            self._policy_state = {k: int(v) for k, v in state["policy"].items()}
        self._buffer = []
        for ordinal in state["buffer"]:
            example = self._ds[int(ordinal)]
            if example is not None:
                self._buffer.append((int(ordinal), example))

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
        super().close()

