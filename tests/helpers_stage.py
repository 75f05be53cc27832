"""A small but real stage for the loop's tests: an MLP regressing a fixed random map.

It depends on nothing but the Stage protocol, so the loop is tested apart from
the VAE and DiT. Its data is a grain pipeline over synthetic numpy examples
(checkpointable iterator), and its parameters carry logical annotations, so the
sharding tests see FSDP and tensor parallelism. Usable from the CLI:

  python -m sora_jax.main --config=tests/helpers_stage.py:steps=6 --workdir=/tmp/w
"""

from __future__ import annotations

import os
import time

import grain
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from sora_jax import config_lib, sharding
from sora_jax.train.stage import Stage

D_IN, D_HIDDEN, D_OUT = 8, 16, 8


def _example(seed: int, index: int) -> dict:
    rng = np.random.default_rng([seed, int(index)])
    x = rng.normal(size=(D_IN,)).astype(np.float32)
    w = np.random.default_rng(1234).normal(size=(D_IN, D_OUT)).astype(np.float32) / np.sqrt(D_IN)
    y = np.tanh(x @ w) + 0.01 * rng.normal(size=(D_OUT,)).astype(np.float32)
    return {"x": x, "y": y.astype(np.float32)}


class MLP(nnx.Module):
    def __init__(self, rngs: nnx.Rngs):
        init = nnx.initializers.lecun_normal()
        self.up = nnx.Linear(D_IN, D_HIDDEN, rngs=rngs, kernel_init=sharding.partitioned(init, ("embed", "mlp")),
                             bias_init=sharding.partitioned(nnx.initializers.zeros, ("mlp",)))
        self.down = nnx.Linear(D_HIDDEN, D_OUT, rngs=rngs, kernel_init=sharding.partitioned(init, ("mlp", "embed")),
                               bias_init=sharding.partitioned(nnx.initializers.zeros, ("embed",)))
        self.norm = nnx.LayerNorm(D_HIDDEN, rngs=rngs, scale_init=sharding.partitioned(nnx.initializers.ones, ("norm",)),
                                  bias_init=sharding.partitioned(nnx.initializers.zeros, ("norm",)))

    def __call__(self, x):
        h = sharding.constrain(self.up(x), ("activation_batch", "activation_mlp"))
        return self.down(jax.nn.gelu(self.norm(h)))


class RegressionStage(Stage):
    name = "regression"

    def create_model(self, rngs):
        return MLP(rngs)

    def train_batches(self, process_index, process_count):
        c = self.config.data
        if c.batch_size % process_count:
            raise ValueError(f"data.batch_size {c.batch_size} not divisible by {process_count} processes")
        local = c.batch_size // process_count
        seed, nan_at, sleep_s = int(self.config.seed), int(c.nan_at_step), float(c.sleep_s)

        def finish(index, batch):
            # Each process keeps its slice of the global batch.
            batch = {k: v[process_index * local:(process_index + 1) * local] for k, v in batch.items()}
            if nan_at and index + 1 == nan_at:  # batch `index` feeds step index + 1
                batch["x"] = np.full_like(batch["x"], np.nan)
            return batch

        ds = (grain.MapDataset.range(c.num_examples).shuffle(seed=seed).repeat(None)
              .map(lambda i: _example(seed, i)).batch(c.batch_size).map_with_index(finish))
        def throttle(batch):
            time.sleep(sleep_s)  # on the consuming thread: lets process tests (kill, SIGTERM) act mid-run
            return batch

        ids = ds.to_iter_dataset()  # prefetches in background threads
        return iter(ids.map(throttle) if sleep_s else ids)

    def eval_batches(self):
        """1.5 global batches of held-out examples; the last is half padding, flagged by "real".

        Each process keeps its slice of every global batch, so with 2 processes the second
        process's part of the last batch is all padding: the eval must weight batches by
        their global count (metrics.weighted_eval_mean), not by what one host holds.
        """
        c = self.config.data
        examples = [_example(10_000 + int(self.config.seed), i) for i in range(3 * c.batch_size // 2)]
        n = jax.process_count()
        local = c.batch_size // n
        batches = []
        for start in range(0, len(examples), c.batch_size):
            chunk = examples[start:start + c.batch_size]
            real = np.arange(c.batch_size) < len(chunk)
            chunk = chunk + [chunk[0]] * (c.batch_size - len(chunk))  # padding: any finite values
            batch = {k: np.stack([e[k] for e in chunk]) for k in chunk[0]} | {"real": real.astype(np.float32)}
            batches.append({k: v[jax.process_index() * local:(jax.process_index() + 1) * local]
                            for k, v in batch.items()})
        return batches

    def loss(self, model, batch, key):
        pred = model(batch["x"])
        mse = jnp.mean((pred.astype(jnp.float32) - batch["y"]) ** 2)
        return mse, {"mse": mse}

    def eval_metrics(self, model, batch, key):
        per_example = jnp.mean((model(batch["x"]).astype(jnp.float32) - batch["y"]) ** 2, axis=-1)
        count = jnp.sum(batch["real"])
        mse = jnp.sum(per_example * batch["real"]) / count
        return {"loss": mse, "mse": mse, "count": count}

    def train_flops_per_batch(self, batch):
        return 6.0 * (D_IN * D_HIDDEN + D_HIDDEN * D_OUT) * batch["x"].shape[0]

    def on_eval(self, model, workdir, step, writer):
        if jax.process_count() > 1:
            return  # a real stage would build global inputs here (sharding.global_batch)
        pred = np.asarray(model(jnp.asarray(self.eval_batches()[0]["x"])))
        os.makedirs(os.path.join(workdir, "samples"), exist_ok=True)
        np.save(os.path.join(workdir, "samples", f"pred_{step}.npy"), pred)


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    """Args: steps, batch, micro (microbatches), nan_at (step fed NaN inputs), sleep (s per batch),
    quiet (no eval or samples: tests about the state alone skip their compiles)."""
    a = config_lib.parse_arg(arg, steps=6, batch=16, micro=1, nan_at=0, sleep=0.0, quiet=False)
    c = config_lib.base_config()
    c.stage = "tests.helpers_stage:RegressionStage"
    c.seed = 0
    c.data = ml_collections.ConfigDict(dict(batch_size=a.batch, num_examples=256, nan_at_step=a.nan_at, sleep_s=a.sleep))
    c.optim.lr = 3e-2
    c.optim.warmup_steps = 2
    c.optim.weight_decay = 0.01
    c.optim.ema_decay = 0.9
    c.optim.microbatches = a.micro
    c.train.steps = a.steps
    c.train.log_every = 1
    c.train.eval_every = 3
    c.train.checkpoint_every = 2
    c.train.keep_checkpoints = 3
    c.train.sample_every = 3
    c.train.num_eval_batches = 2
    c.train.progress = False
    c.mesh.data = -1
    if a.quiet:
        c.train.update(eval_every=-1, sample_every=-1)
    return c


# --- helpers for the loop tests ---------------------------------------------------------

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def backend_level_flag() -> str:
    """The LLVM level in this process's XLA_FLAGS (conftest's 0, or the user's), for subprocesses; "" if none."""
    return " ".join(f for f in os.environ.get("XLA_FLAGS", "").split() if f.startswith("--xla_backend_optimization_level"))


def cli_env(devices: int = 8) -> dict:
    env = dict(os.environ)
    env.update(JAX_PLATFORMS="cpu", XLA_FLAGS=f"--xla_force_host_platform_device_count={devices} {backend_level_flag()}",
               PYTHONPATH=REPO + os.pathsep + env.get("PYTHONPATH", ""), PYTHONWARNINGS="ignore",
               # Subprocesses share compiled steps through JAX's persistent cache (keyed by the program).
               JAX_COMPILATION_CACHE_DIR=os.path.join("/tmp", f"sora_jax_test_jax_cache_{os.getuid()}"),
               JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")
    return env


def cli_command(workdir: str, arg: str = "", overrides: tuple = ()) -> list[str]:
    import sys

    return [sys.executable, "-m", "sora_jax.main", f"--config=tests/helpers_stage.py:{arg}",
            f"--workdir={workdir}", *overrides]


def _metric_rows(workdir: str):
    import json

    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def train_losses(workdir: str) -> dict[int, float]:
    """step -> train loss from metrics.jsonl; a resumed run's later entry for a step wins."""
    return {row["step"]: row["train/loss"] for row in _metric_rows(workdir) if "train/loss" in row}


def eval_metrics(workdir: str) -> dict[int, dict[str, float]]:
    """step -> the loop's held-out metrics ("eval/..." and "eval_ema/...") from metrics.jsonl."""
    out = {}
    for row in _metric_rows(workdir):
        evals = {k: v for k, v in row.items() if k.startswith(("eval/", "eval_ema/"))}
        if evals:
            out.setdefault(row["step"], {}).update(evals)
    return out
