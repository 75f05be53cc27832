"""What a training stage gives the one training loop.

The loop (sora_jax/train/loop.py) is the same for the VAE, the DiT and the
captioner. A stage only says what is specific to it: how to build its model,
where its batches come from, its loss, its eval metrics and what it writes to
the workdir for a human to look at. Everything else (mesh, shardings, optimizer,
checkpoints, resume, logging, throughput, NaN guards) belongs to the loop.

The boundary is pure-functional: `loss` and `eval_metrics` receive an nnx model
that the loop has merged from (graphdef, params) inside the jitted step, and
they must not mutate it or touch the host.
"""

from __future__ import annotations

import abc
from typing import Any, Callable, Iterator, Mapping, Sequence

import jax
import ml_collections
import numpy as np
from flax import nnx

Batch = Mapping[str, np.ndarray]


class Stage(abc.ABC):
    """Base class of the stages; registered by name in sora_jax/train/stages.py."""

    name: str = ""

    def __init__(self, config: ml_collections.ConfigDict):
        self.config = config

    # --- model -----------------------------------------------------------
    @abc.abstractmethod
    def create_model(self, rngs: nnx.Rngs) -> nnx.Module:
        """Builds the model. Called under the mesh and the logical-axis rules."""

    # --- data --------------------------------------------------------------
    @abc.abstractmethod
    def train_batches(self, process_index: int, process_count: int) -> Any:
        """A checkpointable grain iterator (DatasetIterator) of process-local numpy batches."""

    @abc.abstractmethod
    def eval_batches(self) -> Sequence[Batch]:
        """A fixed held-out set of numpy batches (same every call), process-local."""

    # Shared plumbing: every stage reads its batches through sora_jax.data.pipeline.
    def batch_multiple(self, process_count: int) -> int:
        """Rows per local batch must split evenly over this process's data-parallel shards."""
        from sora_jax import sharding

        mesh = sharding.resolve_mesh_shape(dict(self.config.mesh), jax.device_count())
        return max(1, mesh[0] * mesh[1] // max(process_count, 1))

    def pipeline_batches(self, make: Callable, split: str, process_index: int, process_count: int) -> Any:
        """`make` is pipeline.pixel_batches or pipeline.token_batches."""
        return make(self.config, split, seed=int(self.config.seed), process_index=process_index,
                    process_count=process_count, batch_multiple=self.batch_multiple(process_count))

    def fixed_eval_batches(self, make: Callable) -> Sequence[Batch]:
        """The first `config.train.num_eval_batches` eval batches, built once and reused."""
        if getattr(self, "_fixed_eval", None) is None:
            from sora_jax.data import pipeline

            it = self.pipeline_batches(make, "eval", jax.process_index(), jax.process_count())
            self._fixed_eval = pipeline.fixed_batches(it, int(self.config.train.num_eval_batches))
        return self._fixed_eval

    def batch_axes(self) -> Mapping[str, Sequence[str | None]]:
        """Logical axis names of each batch entry; default: leading dim is the batch."""
        return {}

    # --- objective ---------------------------------------------------------
    @abc.abstractmethod
    def loss(self, model: nnx.Module, batch: Mapping[str, jax.Array], key: jax.Array) -> tuple[jax.Array, dict]:
        """Scalar training loss and a dict of scalar metrics. Pure; runs inside jit."""

    def eval_metrics(self, model: nnx.Module, batch: Mapping[str, jax.Array], key: jax.Array) -> dict:
        """Scalar held-out metrics (low variance: fixed times / fixed noise). Pure; runs inside jit.

        Each metric is a mean over the batch's real units (examples, or tokens). Return their
        number under "count" too: the loop weights every batch by it (metrics.weighted_eval_mean),
        so the eval is the mean over all units of the split. Without "count" each batch weighs
        1, and a last batch of 1 example would weigh as much as a full one.
        """
        loss, metrics = self.loss(model, batch, key)
        return {"loss": loss, **metrics}

    # --- accounting --------------------------------------------------------
    def tokens_in_batch(self, batch: Batch) -> int:
        """Real (non-padding) tokens or pixels-equivalent units in a batch, for throughput."""
        return int(next(iter(batch.values())).shape[0])

    def train_flops_per_batch(self, batch: Batch) -> float:
        """Analytic training FLOPs (1 multiply-add = 2 FLOPs) of one step on this batch."""
        return 0.0

    def trainable_filter(self) -> Any:
        """nnx filter of the parameters the optimizer updates (default: all nnx.Param).

        Variables outside the filter (frozen encoders, buffers) are kept in the
        train state's `frozen` entry: checkpointed and sharded, never updated.
        """
        return nnx.Param

    def weight_decay_mask(self, params: Any) -> Any:
        """Pytree of bools like `params`: True where AdamW applies weight decay.

        Default: matrices only; nothing whose path names a norm, bias or embedding
        (sora_jax.train.optim.default_decay_mask).
        """
        from sora_jax.train import optim

        return optim.default_decay_mask(params)

    def muon_dimension_numbers(self, params: Any) -> Any:
        """For `optim.name="muon"`: prefix tree of `params`, MuonDimensionNumbers (which axes
        of a weight form Muon's matrix) or None (AdamW) per parameter.

        Default: every kernel under `weight_decay_mask`, viewed through its logical axis names
        (sora_jax.train.optim.default_muon_dimension_numbers).
        """
        from sora_jax.train import optim

        return optim.default_muon_dimension_numbers(params, self.weight_decay_mask)

    # --- side outputs --------------------------------------------------------
    def on_eval(self, model: nnx.Module, workdir: str, step: int, writer: Any) -> None:
        """Host-side: write samples or reconstructions for a human.

        Called every config.train.sample_every steps and after the last step, with
        the EMA parameters when the run keeps them. Called on every process,
        because on a pod the model's parameters are sharded across hosts and
        running it takes all of them; write files from process 0 only
        (`jax.process_index() == 0`); the writer is silent on other processes. `writer` is the loop's
        sora_jax.train.metrics.MetricsWriter: `writer.write(step, {name: scalar})`,
        `writer.add_video(tag, video_NTHWC, step)`, `writer.log(text)`.
        """

    def on_finish(self, model: nnx.Module, workdir: str) -> None:
        """Host-side, after the last step: e.g. the VAE writes its latent statistics.

        Called on every process (so it may run sharded computations); write files
        from process 0 only (`jax.process_index() == 0`).
        """
