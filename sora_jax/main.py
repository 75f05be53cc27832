"""Entry point: python -m sora_jax.main --config=configs/X.py:ARG --workdir=DIR [--config.a.b=V]

Any config field can be overridden on the command line (`--config.optim.lr=3e-4`);
a misspelt field is an error, not a silently ignored flag. The run resumes
automatically if DIR already holds checkpoints. Multi-host runs: see
docs/launching.md (auto-detected on TPU pods and Slurm; explicit flags otherwise).
"""

from __future__ import annotations

import sys

from absl import app, flags, logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file, e.g. configs/quickstart.py:runlocal", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, logs and samples (resumes if it has checkpoints).")
_COORDINATOR = flags.DEFINE_string("coordinator", None, "host:port of process 0, for explicit multi-process runs.")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Number of processes (explicit multi-process runs).")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index (explicit multi-process runs).")
_LOCAL_DEVICES = flags.DEFINE_list("local_device_ids", None, "Devices this process uses (explicit runs, optional).")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    logging.set_verbosity(logging.WARNING)  # orbax logs every file operation at INFO
    # Distributed start-up must come before anything touches a JAX backend.
    from sora_jax.train import distributed

    how = distributed.initialize(
        _COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value,
        [int(i) for i in _LOCAL_DEVICES.value] if _LOCAL_DEVICES.value else None,
    )
    import jax

    from sora_jax import hugepages
    from sora_jax.train import loop, preflight

    if jax.process_index() == 0:
        print(f"[sora_jax] {jax.process_count()} process(es) ({how}), {jax.device_count()} devices "
              f"({jax.devices()[0].device_kind}), malloc huge pages {'on' if hugepages.enabled() else 'off'}; "
              f"workdir {_WORKDIR.value}", flush=True)
    try:
        result = loop.train(_CONFIG.value, _WORKDIR.value)
    except (loop.NonFiniteError, preflight.PreflightError) as err:
        print(f"[sora_jax] STOPPED: {err}", file=sys.stderr, flush=True)
        sys.exit(3 if isinstance(err, loop.NonFiniteError) else 2)
    if jax.process_index() == 0:
        print(f"[sora_jax] {result.status} at step {result.step}; checkpoints {result.checkpoint_steps}", flush=True)


if __name__ == "__main__":
    from sora_jax import hugepages

    hugepages.reexec_with_hugepages()  # before JAX starts: see sora_jax/hugepages.py
    app.run(main)
