"""Multi-host start-up: `jax.distributed.initialize` when the run spans processes.

Auto-detected (no flags needed):
  - Cloud TPU VM pods: every worker sees TPU_WORKER_HOSTNAMES with more than one host;
    JAX finds the coordinator from the TPU metadata.
  - Slurm: SLURM_JOB_ID with SLURM_NTASKS > 1 (one task per node or per GPU, via srun);
    JAX reads the node list and SLURM_PROCID.
Explicit (any other cluster, or several processes on one machine):
  --coordinator=HOST:PORT --num_processes=N --process_id=I [--local_device_ids=0,1]

Must run before anything touches a JAX backend (jax.devices(), a jit, ...).
"""

from __future__ import annotations

import os
from typing import Sequence

import jax


def on_tpu_pod() -> bool:
    hosts = os.environ.get("TPU_WORKER_HOSTNAMES", "")
    return len([h for h in hosts.split(",") if h]) > 1


def on_slurm() -> bool:
    tasks = os.environ.get("SLURM_NTASKS") or os.environ.get("SLURM_NPROCS") or "1"
    return bool(os.environ.get("SLURM_JOB_ID")) and int(tasks) > 1


def initialize(coordinator: str | None = None, num_processes: int | None = None, process_id: int | None = None,
               local_device_ids: Sequence[int] | None = None, cpu_collectives: str = "gloo") -> str:
    """Starts the distributed runtime if needed. Returns how: 'explicit', 'tpu', 'slurm' or 'single'."""
    if jax.distributed.is_initialized():
        return "already"
    # CPU multi-process runs (tests, CPU clusters) need a cross-process collectives backend.
    jax.config.update("jax_cpu_collectives_implementation", cpu_collectives)
    if coordinator:
        if num_processes is None or process_id is None:
            raise ValueError("--coordinator needs --num_processes and --process_id as well")
        jax.distributed.initialize(
            coordinator_address=coordinator,
            num_processes=int(num_processes),
            process_id=int(process_id),
            local_device_ids=list(local_device_ids) if local_device_ids else None,
        )
        return "explicit"
    if on_tpu_pod():
        jax.distributed.initialize()
        return "tpu"
    if on_slurm():
        jax.distributed.initialize()
        return "slurm"
    return "single"
