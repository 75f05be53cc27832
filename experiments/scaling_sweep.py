"""Runs (or prints) the points of a compute-scaling sweep and collects their results.

  # locally, one point after another (resumable: rerun the same command after a crash)
  python experiments/scaling_sweep.py --sweep="base|4x|16x,preset=cpu" --root=/tmp/sweep_cpu
  # an isoFLOP sweep: three sizes at 16x compute
  python experiments/scaling_sweep.py --sweep="16x,size_shift=-1|0|1,preset=cpu" --root=/tmp/iso16
  # the pod commands (TPU / Slurm launchers when present, else the plain commands)
  python experiments/scaling_sweep.py --sweep="base|4x|16x|32x,preset=pod" --root=gs://B/sweep --mode=tpu
  # results only (e.g. after pod runs wrote their workdirs)
  python experiments/scaling_sweep.py --sweep=... --root=... --mode=collect

A sweep spec is a configs/scaling.py argument in which any item may list
alternatives with "|" (sora_jax.scaling.expand_sweep). Each point trains in
ROOT/<point name> through the one loop, `python -m sora_jax.main`.

Resume: a point whose workdir holds scaling_done.json is skipped. Any other point
is (re)started with the same command; the loop resumes from the newest
checkpoint in its workdir, so an interrupted point continues where it stopped.
A point is marked done only when its command exits 0 *and* its metrics reached
the planned last step. Results go to ROOT/results.json and ROOT/results.csv
(see sora_jax.scaling.summarize_point for what each column is and where it comes from).
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import shlex
import subprocess
import sys
import time
from typing import Callable, Sequence

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
from sora_jax import scaling  # noqa: E402

CONFIG_FILE = os.path.join(REPO, "configs", "scaling.py")
TRAIN_LOG = scaling.TRAIN_LOG

CommandFn = Callable[[str, str], list]


class SweepError(RuntimeError):
    """A point failed; the sweep stops there and resumes from it when rerun."""


def train_command(arg: str, workdir: str, overrides: Sequence[str] = ()) -> list[str]:
    """The one training loop for one point."""
    return [sys.executable, "-m", "sora_jax.main", f"--config={CONFIG_FILE}:{arg}", f"--workdir={workdir}", *overrides]


def _tail(path: str, lines: int = 30) -> str:
    try:
        with open(path, errors="replace") as f:
            return "".join(f.readlines()[-lines:])
    except OSError:
        return ""


def run_point(arg: str, workdir: str, command: list[str], plan: dict, log: Callable[[str], None] = print) -> dict:
    """Runs one point to completion (resuming), verifies it and writes its done marker."""
    os.makedirs(workdir, exist_ok=True)
    log_path = os.path.join(workdir, TRAIN_LOG)
    start_step = scaling.last_logged_step(workdir)
    log(f"[sweep] {arg}: {'resuming after step ' + str(start_step) if start_step else 'starting'} "
        f"({plan['steps']} steps) -> {workdir}")
    start = time.time()
    with open(log_path, "a") as out:
        out.write(f"\n=== {time.strftime('%Y-%m-%d %H:%M:%S')} {shlex.join(command)}\n")
        out.flush()
        proc = subprocess.run(command, stdout=out, stderr=subprocess.STDOUT, cwd=REPO)
    scaling.add_wall_seconds(workdir, time.time() - start)
    if proc.returncode != 0:
        raise SweepError(
            f"point {arg!r} failed (exit code {proc.returncode}); rerun the sweep to resume it. "
            f"Last lines of {log_path}:\n{_tail(log_path)}"
        )
    last = scaling.last_logged_step(workdir)
    if last is None or last < plan["steps"]:
        raise SweepError(
            f"point {arg!r}: the command exited 0 but {os.path.join(workdir, 'metrics.jsonl')} stops at step "
            f"{last}, not the planned {plan['steps']}; not marking it done. Last lines of {log_path}:\n{_tail(log_path)}"
        )
    row = scaling.summarize_point(arg, workdir, plan)
    scaling.mark_done(workdir, row)
    return row


def run_sweep(
    spec: str,
    root: str,
    command_fn: CommandFn | None = None,
    plan_fn: Callable[[str], dict] | None = None,
    overrides: Sequence[str] = (),
    log: Callable[[str], None] = print,
    run: bool = True,
    xla_check: bool = False,
) -> list[dict]:
    """Runs the pending points of `spec` in order (if `run`), then collects every finished one.

    `command_fn(arg, workdir)` gives the training command of a point (default:
    `python -m sora_jax.main` with configs/scaling.py); `plan_fn(arg)` what the
    rule planned for it (default: scaling.plan_from_config). Tests inject both.
    `xla_check`: compile each point's forward (layers unrolled) once and record
    XLA's FLOPs over the analytic count (scaling.xla_check).
    """
    command_fn = command_fn or (lambda arg, wd: train_command(arg, wd, overrides))
    plan_fn = plan_fn or scaling.plan_from_config
    points = scaling.expand_sweep(spec)
    rows = []
    for arg in points:
        workdir = os.path.join(root, scaling.point_name(arg))
        plan = plan_fn(arg)
        if scaling.is_done(workdir):
            log(f"[sweep] {arg}: done, skipped")
        elif not run:
            log(f"[sweep] {arg}: not finished ({workdir})")
            continue
        else:
            run_point(arg, workdir, command_fn(arg, workdir), plan, log)
        if xla_check:
            config = load_config(arg)
            ratio = scaling.xla_check(workdir, config.model, config.flops.latent_thw)
            log(f"[sweep] {arg}: XLA / analytic forward FLOPs = {ratio:.4f} (layers unrolled)")
        rows.append(scaling.summarize_point(arg, workdir, plan))
    if rows:
        json_path, csv_path = scaling.write_results(rows, root, sweep=spec)
        log(f"[sweep] {len(rows)}/{len(points)} points finished; results: {json_path}, {csv_path}")
    return rows


def load_config(arg: str):
    spec = importlib.util.spec_from_file_location("_sora_configs_scaling", CONFIG_FILE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(arg)


# --- pod launches --------------------------------------------------------------------


def _load_launcher(name: str):
    """experiments/launch_tpu.py or launch_slurm.py (written by the loop contributor), if present."""
    path = os.path.join(REPO, "experiments", f"{name}.py")
    if not os.path.exists(path):
        return None
    spec = importlib.util.spec_from_file_location(f"_sora_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def pod_commands(spec: str, root: str, mode: str, overrides: Sequence[str] = (), launch: bool = False) -> list[str]:
    """One launch per point: through the launcher's dry-run (or launch) function when it exists.

    Finished points are left out, as in a local run. Without a launcher module
    the plain `python -m sora_jax.main` command of each point is returned, to be
    run on every host of the pod (the loop initialises jax.distributed itself).
    """
    launcher = _load_launcher({"tpu": "launch_tpu", "slurm": "launch_slurm"}[mode]) if mode in ("tpu", "slurm") else None
    lines = []
    for arg in scaling.expand_sweep(spec):
        workdir = os.path.join(root, scaling.point_name(arg))
        if not root.startswith("gs://") and scaling.is_done(workdir):
            continue
        command = train_command(arg, workdir, overrides)
        command[0] = "python"
        config_arg = f"configs/scaling.py:{arg}"
        command[3] = f"--config={config_arg}"
        fn = getattr(launcher, "launch" if launch else "dry_run", None) if launcher is not None else None
        if fn is not None:
            try:
                out = fn(config=config_arg, workdir=workdir, extra_args=list(overrides))
            except TypeError as err:  # the launcher's signature differs from the one assumed here
                raise SystemExit(f"experiments/launch_{mode}.py: {fn.__name__}(config=, workdir=, extra_args=) "
                                 f"failed ({err}); use --mode=print for the plain commands") from None
            lines.append(out if isinstance(out, str) else shlex.join(out) if isinstance(out, list) else str(out))
        elif launch:
            raise SystemExit(f"--launch: experiments/launch_{mode}.py with a launch() function is not available")
        else:
            lines.append(shlex.join(command))
    return lines


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sweep", required=True, help='e.g. "base|4x|16x,preset=cpu"')
    parser.add_argument("--root", required=True, help="directory holding one workdir per point and the results")
    parser.add_argument("--mode", default="local", choices=("local", "print", "tpu", "slurm", "collect"),
                        help="local: train here; print/tpu/slurm: print the commands; collect: results only")
    parser.add_argument("--xla_check", action="store_true",
                        help="record XLA cost-analysis FLOPs of each point's forward vs the analytic count")
    parser.add_argument("--launch", action="store_true", help="tpu/slurm: launch instead of printing")
    parser.add_argument("--override", action="append", default=[],
                        help="extra flag for every point, e.g. --override=--config.data.latents_dir=/x (repeatable)")
    args = parser.parse_args(argv)
    if args.mode in ("print", "tpu", "slurm"):
        for line in pod_commands(args.sweep, args.root, args.mode if args.mode != "print" else "", args.override, args.launch):
            print(line)
        return
    try:
        run_sweep(args.sweep, args.root, overrides=args.override, run=args.mode == "local", xla_check=args.xla_check)
    except SweepError as err:
        raise SystemExit(f"[sweep] {err}") from None


if __name__ == "__main__":
    main()
