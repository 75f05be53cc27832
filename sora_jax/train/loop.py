"""The one training loop, for every stage.

  train(config, workdir)

1. Mesh and logical rules from the config; the stage from the registry.
2. Train state from its abstract shapes, sharded at creation (state.py).
3. Resume from the newest readable checkpoint in the workdir (checkpoint.py),
   including the data iterator, or start fresh.
4. Preflight: the step is compiled ahead of time; parameters, FLOPs, compile
   time and compiled memory vs device memory are printed; a run that cannot
   fit is refused here (preflight.py).
5. The loop. Metrics are read one step late, so the host never waits on the
   step it just dispatched; it syncs only at eval, checkpoint and the end.
   Non-finite loss/grad norm stops the run with a diagnostic (the step itself
   refuses the update, and nothing is saved). SIGTERM saves and exits cleanly.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import signal
import time
from typing import Any

import jax
import ml_collections
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from sora_jax import sharding, xla_options
from sora_jax.train import checkpoint as ckpt_lib
from sora_jax.train import metrics as metrics_lib
from sora_jax.train import preflight
from sora_jax.train import stages as stages_lib
from sora_jax.train import state as state_lib


class NonFiniteError(RuntimeError):
    """Loss or gradient norm became NaN/inf; the message is the diagnostic."""


@dataclasses.dataclass
class RunResult:
    status: str  # "done" | "preempted"
    step: int
    last_metrics: dict
    checkpoint_steps: list


class _Preemption:
    """SIGTERM -> save and exit. Multi-process runs agree through JAX's preemption sync point."""

    def __init__(self):
        self.requested = False
        self.previous = None
        if jax.process_count() == 1:
            try:
                self.previous = signal.signal(signal.SIGTERM, self._handler)
            except ValueError:  # not in the main thread: no handler, nothing to restore
                self.previous = None

    def _handler(self, signum, frame):
        self.requested = True

    def reached(self, step: int) -> bool:
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            try:
                return bool(multihost_utils.reached_preemption_sync_point(step))
            except Exception:  # preemption service unavailable: never preempt
                return False
        return self.requested

    def close(self):
        if self.previous is not None:
            signal.signal(signal.SIGTERM, self.previous)


def write_config(config: ml_collections.ConfigDict, workdir: str) -> None:
    if jax.process_index() == 0:
        os.makedirs(workdir, exist_ok=True)
        with open(os.path.join(workdir, "config.json"), "w") as f:
            f.write(config.to_json(indent=2, sort_keys=True))


def _every(step: int, period: int, last: int) -> bool:
    return step == last or (period > 0 and step % period == 0)


def _shape_key(batch) -> tuple:
    return tuple(sorted((k, tuple(v.shape), str(v.dtype)) for k, v in batch.items()))


def train(config: ml_collections.ConfigDict, workdir: str) -> RunResult:
    workdir = os.path.abspath(workdir)
    write_config(config, workdir)
    stage = stages_lib.get_stage_class(config.stage)(config)
    stage_name = stage.name or str(config.stage)
    tcfg = config.train
    total_steps = int(tcfg.steps)

    # --- mesh, stage, state --------------------------------------------------------
    mesh = sharding.make_mesh(dict(config.mesh))
    rules = sharding.rules_from_config(config.sharding_rules)
    replicated = NamedSharding(mesh, P())
    peak = metrics_lib.peak_flops_per_device()  # measured on CPU: before the mesh context
    with jax.set_mesh(mesh), nnx.logical_axis_rules(rules):
        setup = state_lib.build_train_setup(stage, config, mesh, rules)
        iterator = stage.train_batches(jax.process_index(), jax.process_count())
        checkpointer = ckpt_lib.Checkpointer(
            workdir, keep=int(tcfg.keep_checkpoints), keep_best=int(tcfg.get("keep_best", 1)),
            async_save=bool(tcfg.get("async_checkpoints", True)),
        )
        found = checkpointer.restore_latest(setup.abstract_state, iterator)
        writer = metrics_lib.MetricsWriter(workdir, total_steps, found[1] if found else 0,
                                           progress=bool(tcfg.get("progress", True)))
        if found:
            state, start_step = found
            writer.log(f"Resumed {stage_name} from {checkpointer.directory}/{start_step}")
        else:
            state, start_step = setup.init(), 0
        try:
            return _run(config, workdir, stage, stage_name, setup, state, start_step, iterator, checkpointer,
                        writer, mesh, rules, replicated, peak)
        finally:
            checkpointer.close()
            writer.close()


def _run(config, workdir, stage, stage_name, setup, state, start_step, iterator, checkpointer, writer,
         mesh, rules, replicated, peak_info) -> RunResult:
    tcfg = config.train
    total_steps = int(tcfg.steps)
    axes = stage.batch_axes()
    nproc = jax.process_count()
    if start_step >= total_steps:
        writer.log(f"Nothing to do: checkpoint step {start_step} >= config.train.steps={total_steps}.")
        return RunResult("done", start_step, {}, checkpointer.all_steps())

    train_step = state_lib.make_train_step(stage, setup, config)
    jitted: dict[tuple, Any] = {}  # batch key set -> jitted step
    options = xla_options.from_config(config)
    eval_jit = jax.jit(state_lib.make_eval_step(stage, setup, config), out_shardings=replicated,
                       compiler_options=options)
    compiled: dict[tuple, Any] = {}

    def to_global(local_batch):
        return sharding.global_batch(local_batch, mesh, rules, axes)

    def compile_for(gbatch) -> tuple[Any, float]:
        key = _shape_key(gbatch)
        if key not in compiled:
            keys = tuple(sorted(gbatch))
            if keys not in jitted:
                jitted[keys] = jax.jit(
                    train_step,
                    in_shardings=(setup.shardings, {k: v.sharding for k, v in gbatch.items()}),
                    out_shardings=(setup.shardings, replicated),
                    donate_argnums=(0,),
                )
            start = time.perf_counter()
            compiled[key] = jitted[keys].lower(state, gbatch).compile(compiler_options=options)
            seconds = time.perf_counter() - start
            if len(compiled) > 1:
                writer.log(f"compiled the train step for a new batch shape {key} in {seconds:.1f} s")
            return compiled[key], seconds
        return compiled[key], 0.0

    # --- preflight -----------------------------------------------------------------------
    local_batch = next(iterator)
    gbatch = to_global(local_batch)
    global_batch_size = int(next(iter(gbatch.values())).shape[0])
    batch_shards = mesh.shape["data"] * mesh.shape["fsdp"]
    preflight.check_batch_split(global_batch_size, int(config.optim.microbatches), batch_shards)
    step_fn, compile_seconds = compile_for(gbatch)
    flops_per_step = float(stage.train_flops_per_batch(local_batch)) * nproc
    cost = None
    try:
        analysis = step_fn.cost_analysis()
        analysis = analysis[0] if isinstance(analysis, (list, tuple)) else analysis
        cost = float(analysis.get("flops", 0.0)) if analysis else None
    except Exception:
        cost = None
    num_params = state_lib.count_params(setup.abstract_state["params"])
    summary = preflight.report(
        stage_name=stage_name, num_params=num_params, flops_per_step=flops_per_step, compiled=step_fn,
        compile_seconds=compile_seconds, cost_flops=cost, enforce=bool(tcfg.get("check_memory", True)),
    )
    writer.log(summary + f"\n[preflight] global batch {global_batch_size}, mesh {dict(mesh.shape)}, "
               f"microbatches {config.optim.microbatches}, steps {start_step}->{total_steps}")
    peak, peak_source = peak_info
    eval_batches = [to_global(b) for b in list(stage.eval_batches())[: int(tcfg.num_eval_batches)]]

    # --- the loop ------------------------------------------------------------------------
    preemption = _Preemption()
    pending = None  # (step, device metrics, tokens so far): read one step late
    clock = dict(time=time.perf_counter(), step=start_step, tokens=0.0)  # throughput window start
    tokens_so_far = 0.0
    last_metrics: dict = {}
    last_print_step = start_step
    # Without a progress bar (log files, tests) print a throughput line every 10 logs by default.
    print_every = int(tcfg.get("print_every", 0) or (10**9 if writer.has_progress_bar else 10 * int(tcfg.log_every)))

    def read(pending_item) -> dict:
        step, device_metrics, _ = pending_item
        values = {k: float(v) for k, v in jax.device_get(device_metrics).items()}
        bad = [k for k in ("train/loss", "train/grad_norm") if not math.isfinite(values.get(k, 0.0))]
        if bad or values.get("ok", 1.0) < 0.5:
            good = checkpointer.latest_step()
            checkpointer.wait()
            raise NonFiniteError(
                f"stage {stage_name!r}: non-finite {', '.join(bad) or 'metric'} at step {step} "
                f"({', '.join(f'{k}={values[k]}' for k in bad)}). The update of that step was not applied "
                f"and no checkpoint was written after it. Last good checkpoint: "
                + (f"step {good} in {checkpointer.directory}" if good is not None else "none")
                + ". Lower config.optim.lr, check the data, or raise config.optim.grad_clip strictness."
            )
        values.pop("ok", None)
        return values

    def log_train(step: int, values: dict, tokens: float) -> None:
        nonlocal last_print_step
        steps = step - clock["step"]
        if steps <= 0:
            return
        perf = metrics_lib.throughput(steps, time.perf_counter() - clock["time"], (tokens - clock["tokens"]) / steps,
                                      flops_per_step, jax.device_count(), peak)
        clock.update(time=time.perf_counter(), step=step, tokens=tokens)
        writer.write(step, {**values, **perf})
        writer.progress(step, values["train/loss"], perf["perf/steps_per_s"])
        if step - last_print_step >= print_every or step == total_steps:
            mfu = f", MFU {100 * perf['perf/mfu']:.3g}% of {peak / 1e12:.3g} TFLOP/s ({peak_source})" if "perf/mfu" in perf else ""
            writer.log(f"step {step}: loss {values['train/loss']:.5g}, {perf['perf/steps_per_s']:.3g} steps/s, "
                       f"{perf['perf/tokens_per_s']:.4g} tokens/s, {perf['perf/tflops_per_device']:.4g} TFLOP/s/device{mfu}")
            last_print_step = step

    def restart_clock(step: int) -> None:
        """Eval, checkpoint and sample time is not training throughput."""
        clock.update(time=time.perf_counter(), step=step, tokens=tokens_so_far)

    def handle(pending_item) -> None:
        nonlocal last_metrics
        step = pending_item[0]
        values = read(pending_item)
        last_metrics = values
        if _every(step, int(tcfg.log_every), total_steps):
            log_train(step, values, pending_item[2])

    def run_eval(step: int) -> float | None:
        if not eval_batches:
            return None
        results = {}
        for name, params in [("eval", state["params"])] + ([("eval_ema", state["ema"])] if "ema" in state else []):
            per_batch = [eval_jit(params, state["frozen"], batch, i) for i, batch in enumerate(eval_batches)]
            per_batch = jax.device_get(per_batch)  # one transfer, after every batch was dispatched
            results.update({f"{name}/{k}": v for k, v in metrics_lib.weighted_eval_mean(per_batch).items()})
        writer.write(step, results)
        writer.log(f"step {step}: " + ", ".join(f"{k} {v:.5g}" for k, v in sorted(results.items())))
        return results.get("eval/loss")

    def side_outputs(step: int) -> None:
        # Every process: on a pod the parameters are sharded across hosts (the stage writes on process 0).
        params = state["ema"] if "ema" in state else state["params"]
        stage.on_eval(nnx.merge(setup.graphdef, params, state["frozen"]), workdir, step, writer)

    status = "done"
    step = start_step
    try:
        while step < total_steps:
            if step > start_step:
                local_batch = next(iterator)
                gbatch = to_global(local_batch)
                step_fn, _ = compile_for(gbatch)
            state, device_metrics = step_fn(state, gbatch)
            tokens_so_far += stage.tokens_in_batch(local_batch) * nproc
            if pending is not None:
                handle(pending)  # the previous step's metrics, while this step runs
            step += 1
            pending = (step, device_metrics, tokens_so_far)
            preempted = preemption.reached(step)
            do_eval = int(tcfg.eval_every) >= 0 and _every(step, int(tcfg.eval_every), total_steps)
            do_save = _every(step, int(tcfg.checkpoint_every), total_steps) or preempted
            do_samples = int(tcfg.sample_every) >= 0 and _every(step, int(tcfg.sample_every), total_steps)
            if do_eval or do_save or do_samples:
                handle(pending)  # sync: never checkpoint or evaluate an unchecked state
                pending = None
                eval_loss = run_eval(step) if do_eval else None
                if do_samples:
                    side_outputs(step)
                if do_save:
                    checkpointer.save(step, state, iterator, config, eval_loss)
                restart_clock(step)
            if preempted:
                writer.log(f"SIGTERM: saved checkpoint {step}; exiting cleanly.")
                status = "preempted"
                break
        if pending is not None:
            handle(pending)
    finally:
        preemption.close()
    checkpointer.wait()
    if status == "done":
        params = state["ema"] if "ema" in state else state["params"]
        stage.on_finish(nnx.merge(setup.graphdef, params, state["frozen"]), workdir)
        best = checkpointer.best_step()
        if jax.process_index() == 0:
            with open(os.path.join(workdir, "run_summary.json"), "w") as f:
                json.dump({"step": step, "status": status, "best_checkpoint": best, **last_metrics}, f, indent=2)
    return RunResult(status, step, last_metrics, checkpointer.all_steps())
