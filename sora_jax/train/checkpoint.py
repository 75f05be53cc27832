"""Orbax checkpoints: train state + data-iterator state + config, resume, fallback.

Layout of a workdir:

  workdir/config.json                 the config the run was started with
  workdir/checkpoints/<step>/state    the train state (step, params, frozen, opt_state, ema, rng)
  workdir/checkpoints/<step>/data     grain iterator state, one JSON per process
  workdir/checkpoints/<step>/config   the config, so a checkpoint is self-describing
  workdir/corrupt_checkpoints/<step>  checkpoints that failed to restore (moved aside, never deleted)

Saves are asynchronous: the arrays are copied off the devices, then written in
a background thread while training continues; orbax writes into a temporary
directory and renames it on success, so a step directory that exists is
complete. Damage after the fact (a truncated file, a lost shard) shows up as a
restore error: `restore_latest` then moves that step aside, says so, and tries
the previous one.

Restoring onto another mesh or device count works because the restore target
is the *new* run's abstract state with its shardings: orbax reads each array
straight into the new layout.
"""

from __future__ import annotations

import json
import logging as std_logging
import math
import os
import shutil
import time
from typing import Any

import grain
import jax
import ml_collections
import orbax.checkpoint as ocp
from absl import logging
from orbax.checkpoint import checkpoint_managers as ocp_policies

BEST_METRIC = "eval_loss"


class _QuietMissingMetrics(std_logging.Filter):
    """Checkpoints saved between evals have no eval loss by design; orbax warns about each one."""

    def filter(self, record):
        return "did not provide metrics" not in record.getMessage()


logging.get_absl_logger().addFilter(_QuietMissingMetrics())


def _log(msg: str) -> None:
    logging.warning(msg)
    if jax.process_index() == 0:
        print(msg, flush=True)


class Checkpointer:
    """A CheckpointManager keeping the last `keep` checkpoints plus the best by eval loss."""

    def __init__(self, workdir: str, keep: int = 3, keep_best: int = 1, async_save: bool = True):
        self.workdir = os.path.abspath(workdir)
        self.directory = os.path.join(self.workdir, "checkpoints")
        policies = [ocp_policies.LatestN(n=max(int(keep), 1))]
        if keep_best:
            policies.append(
                ocp_policies.BestN(
                    get_metric_fn=lambda m: m[BEST_METRIC],
                    reverse=True,  # BestN keeps the tail of the sorted list: sort descending, keep the lowest loss
                    n=int(keep_best),
                    keep_checkpoints_without_metrics=False,
                )
            )
        self._options = ocp.CheckpointManagerOptions(
            preservation_policy=ocp_policies.AnyPreservationPolicy(policies),
            # best_fn makes orbax write each checkpoint's metrics to disk, so "best" survives restarts.
            best_fn=(lambda m: m[BEST_METRIC]) if keep_best else None,
            best_mode="min",
            enable_async_checkpointing=async_save,
            create=True,
        )
        self.manager = self._new_manager()

    def _new_manager(self) -> ocp.CheckpointManager:
        return ocp.CheckpointManager(self.directory, options=self._options)

    # --- queries ---------------------------------------------------------------
    def all_steps(self) -> list[int]:
        return sorted(self.manager.all_steps())

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def best_step(self) -> int | None:
        """Step with the lowest saved eval loss (None before the first eval)."""
        best = None
        for step in self.all_steps():
            path = os.path.join(self.directory, str(step), "metrics", "metrics")
            try:
                with open(path) as f:
                    loss = float(json.load(f)[BEST_METRIC])
            except (OSError, ValueError, KeyError, TypeError):
                continue
            if best is None or loss < best[1]:
                best = (step, loss)
        return best[0] if best else None

    # --- save ------------------------------------------------------------------
    def save(self, step: int, state: Any, iterator: Any, config: ml_collections.ConfigDict,
             eval_loss: float | None = None) -> bool:
        """Starts an async save (all processes must call it). Returns False if the step exists."""
        if step in self.manager.all_steps():
            return False
        items = dict(
            state=ocp.args.StandardSave(state),
            config=ocp.args.JsonSave(json.loads(config.to_json())),
        )
        if iterator is not None:
            items["data"] = grain.checkpoint.CheckpointSave(iterator)
        # A non-finite eval loss must not rank as "best".
        finite = eval_loss is not None and math.isfinite(float(eval_loss))
        metrics = {BEST_METRIC: float(eval_loss)} if finite else None
        return self.manager.save(int(step), args=ocp.args.Composite(**items), metrics=metrics, force=True)

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()

    # --- restore -----------------------------------------------------------------
    def restore(self, step: int, abstract_state: Any, iterator: Any = None) -> Any:
        """Restores one step onto the abstract state's shardings (and the iterator in place)."""
        items = dict(state=ocp.args.StandardRestore(abstract_state))
        if iterator is not None:
            if self._has_iterator_state_for_this_process(step):
                items["data"] = grain.checkpoint.CheckpointRestore(iterator)
            else:
                _log(
                    f"checkpoint {step}: no data-iterator state for process {jax.process_index()} of "
                    f"{jax.process_count()} (saved with a different process count?); the data "
                    "iterator restarts from its beginning, so resume is not sample-exact."
                )
        restored = self.manager.restore(int(step), args=ocp.args.Composite(**items))
        return restored["state"]

    def _has_iterator_state_for_this_process(self, step: int) -> bool:
        name = f"process_{jax.process_index()}-of-{jax.process_count()}.json"
        return os.path.exists(os.path.join(self.directory, str(step), "data", name))

    def restore_latest(self, abstract_state: Any, iterator: Any = None) -> tuple[Any, int] | None:
        """Restores the newest readable checkpoint; newer unreadable ones are moved aside with a message.

        If no checkpoint restores, nothing is moved and the error is raised: that
        is a config that no longer matches the workdir (a changed model), not damage.
        """
        steps = sorted(self.manager.all_steps(), reverse=True)
        failures: list[tuple[int, Exception]] = []
        for step in steps:
            try:
                state = self.restore(step, abstract_state, iterator)
            except Exception as err:  # orbax/tensorstore raise many types for damaged files
                _log(f"WARNING: checkpoint {step} in {self.directory} does not restore "
                     f"({type(err).__name__}: {str(err)[:300]}); trying the previous one.")
                failures.append((step, err))
                continue
            for bad, _ in failures:
                _log(f"WARNING: checkpoint {bad} is incomplete or corrupt; moved to "
                     f"{self.workdir}/corrupt_checkpoints/, falling back to checkpoint {step}.")
                self._quarantine(bad)
            if failures:
                _log(f"Resumed from checkpoint {step} (fallback from corrupt checkpoint {failures[0][0]}).")
            return state, step
        if failures:
            newest, err = failures[0]
            difference = self._tree_difference(newest, abstract_state)
            raise RuntimeError(
                f"none of the checkpoints {steps} in {self.directory} restores into the state this config "
                "builds (did the model config change, or the model code since the checkpoint was written?)."
                + (f"\nArrays that differ:\n  {difference}\n" if difference else " ")
                + "Retrain with a new --workdir, or move the checkpoints away. "
                f"Newest error: {type(err).__name__}: {str(err)[:600 if difference else 2000]}"
            ) from err
        return None

    def _tree_difference(self, step: int, abstract_state: Any, limit: int = 8) -> str:
        """Names the arrays that the checkpoint and the target state do not share, for the error above.

        orbax's own tree-mismatch message dumps both trees; a researcher who changed the code
        wants the few paths that differ ("params/media_embed: in this code's state, not in checkpoint 600").
        """
        try:
            saved = self.manager.item_metadata(step)["state"]
            saved = _flat_shapes(getattr(saved, "tree", saved))
        except Exception:  # no readable metadata (the damaged case): the orbax error has to do
            return ""
        target = _flat_shapes(abstract_state)

        def order(keys):  # the parameters first: ema and opt_state repeat their paths
            return sorted(keys, key=lambda k: (not k.startswith("params/"), k))

        lines = [f"{k}: in this code's state, not in checkpoint {step}" for k in order(target.keys() - saved.keys())]
        lines += [f"{k}: in checkpoint {step}, not in this code's state" for k in order(saved.keys() - target.keys())]
        lines += [f"{k}: shape {saved[k]} in checkpoint {step}, {target[k]} in this code's state"
                  for k in order(saved.keys() & target.keys()) if saved[k] != target[k]]
        if not lines:
            return ""
        more = f"\n  ... and {len(lines) - limit} more" if len(lines) > limit else ""
        return "\n  ".join(lines[:limit]) + more

    def _quarantine(self, step: int) -> None:
        if jax.process_index() == 0:
            target = os.path.join(self.workdir, "corrupt_checkpoints", f"{step}-{int(time.time())}")
            os.makedirs(os.path.dirname(target), exist_ok=True)
            shutil.move(os.path.join(self.directory, str(step)), target)
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            multihost_utils.sync_global_devices(f"quarantine_checkpoint_{step}")
        self.manager.reload()  # forget the moved step


def _flat_shapes(tree: Any) -> dict[str, tuple | None]:
    """{"params/up/kernel": shape} over a state or orbax metadata tree (None where a leaf has no shape)."""

    def name(key) -> str:
        for attr in ("key", "name", "idx"):
            if hasattr(key, attr):
                return str(getattr(key, attr))
        return str(key)

    flat = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        key = "/".join(name(k) for k in path)
        key = key[:-len("/value")] if key.endswith("/value") else key  # nnx Variables store {"value": array}
        shape = getattr(leaf, "shape", None)
        flat[key] = tuple(shape) if shape is not None else None
    return flat


def read_config(workdir: str) -> ml_collections.ConfigDict:
    """The config a workdir was trained with (workdir/config.json)."""
    path = os.path.join(workdir, "config.json")
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path} not found: is {workdir!r} a sora_jax training workdir?")
    with open(path) as f:
        return ml_collections.ConfigDict(json.load(f))


def restore_model(workdir: str, step: int | None = None, use_ema: bool = True, mesh=None):
    """Rebuilds a stage's trained model from its workdir: returns (config, nnx model).

    Used by the VAE API, latent caching and the sampler. `step=None` takes the
    latest readable checkpoint; `use_ema` picks the EMA parameters when the run
    kept them. The model is built on `mesh` (default: all devices, data axis
    only, so parameters are replicated) under the config's logical rules.
    """
    from flax import nnx

    from sora_jax import sharding
    from sora_jax.train import state as state_lib
    from sora_jax.train import stages

    config = read_config(workdir)
    stage = stages.get_stage_class(config.stage)(config)
    mesh = mesh if mesh is not None else sharding.make_mesh({"data": -1})
    rules = sharding.rules_from_config(config.sharding_rules)
    with jax.set_mesh(mesh), nnx.logical_axis_rules(rules):
        setup = state_lib.build_train_setup(stage, config, mesh, rules)
        ckpt = Checkpointer(workdir, keep=10**6)
        try:
            if step is None:
                found = ckpt.restore_latest(setup.abstract_state)
                if found is None:
                    raise FileNotFoundError(f"no readable checkpoint in {ckpt.directory}")
                state, step = found
            else:
                if step not in ckpt.all_steps():
                    raise FileNotFoundError(f"checkpoint {step} not in {ckpt.directory}; have {ckpt.all_steps()}")
                state = ckpt.restore(step, setup.abstract_state)
        finally:
            ckpt.close()
        params = state["ema"] if (use_ema and "ema" in state) else state["params"]
        model = nnx.merge(setup.graphdef, params, state["frozen"])
    return config, model
