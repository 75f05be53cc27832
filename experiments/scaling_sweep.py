"""Runs (or prints) the points of a compute-scaling sweep and collects their results.

  # locally, one point after another (resumable: rerun the same command after a crash)
  python experiments/scaling_sweep.py --sweep="base|4x|16x,preset=cpu" --root=/tmp/sweep_cpu
  # an isoFLOP sweep: three sizes at 16x compute
  python experiments/scaling_sweep.py --sweep="16x,size_shift=-1|0|1,preset=cpu" --root=/tmp/iso16
  # a TPU pod slice per point through experiments/launch_tpu.py (dry run; --launch to run)
  python experiments/scaling_sweep.py --sweep="base|4x|16x|32x,preset=pod,latents=gs://B/lat" --root=gs://B/sweep \
      --mode=tpu --launcher_args="--zone=Z --accelerator=v5p-64 --version=V --repo=GIT_URL"
  # one sbatch job per point through experiments/launch_slurm.py; --mode=print: plain commands
  python experiments/scaling_sweep.py --sweep=... --root=/shared/sweep --mode=slurm --launcher_args="--nodes=4"
  # results only (after the pods wrote their workdirs; copy a gs:// root locally first)
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
import re
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
    from sora_jax import config_lib

    return config_lib.load_config(f"{CONFIG_FILE}:{arg}")


# --- pod launches --------------------------------------------------------------------


def _load_launcher(name: str):
    """experiments/launch_tpu.py or launch_slurm.py (their main(argv) takes --dry_run)."""
    path = os.path.join(REPO, "experiments", f"{name}.py")
    if not os.path.exists(path):
        raise SystemExit(f"{path} not found; use --mode=print for the plain commands")
    spec = importlib.util.spec_from_file_location(f"_sora_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def pending_points(spec: str, root: str) -> list[tuple[str, str]]:
    """(arg, workdir) of the points without a done marker (remote roots: all points)."""
    out = []
    for arg in scaling.expand_sweep(spec):
        workdir = f"{root.rstrip('/')}/{scaling.point_name(arg)}"
        if "://" in root or not scaling.is_done(workdir):
            out.append((arg, workdir))
    return out


def plain_commands(spec: str, root: str, overrides: Sequence[str] = ()) -> list[str]:
    """The `python -m sora_jax.main` command of each pending point, repo-relative, for any cluster."""
    return [shlex.join(["python", "-m", "sora_jax.main", f"--config=configs/scaling.py:{arg}", f"--workdir={workdir}",
                        *overrides]) for arg, workdir in pending_points(spec, root)]


def launch_points(spec: str, root: str, mode: str, overrides: Sequence[str] = (), launcher_args: str = "",
                  dry_run: bool = True, name_prefix: str = "sora-scaling") -> int:
    """One launcher call per pending point: experiments/launch_tpu.py (a pod slice per point,
    named PREFIX-POINT unless --name is in launcher_args) or launch_slurm.py (one sbatch job
    per point). dry_run prints what the launcher would run. Returns the first non-zero status."""
    launcher = _load_launcher({"tpu": "launch_tpu", "slurm": "launch_slurm"}[mode])
    for arg, workdir in pending_points(spec, root):
        name = re.sub(r"[^a-z0-9-]", "-", f"{name_prefix}-{scaling.point_name(arg)}".lower())[:60].strip("-")
        argv = [f"--name={name}", f"--config=configs/scaling.py:{arg}", f"--workdir={workdir}",
                f"--overrides={shlex.join(overrides)}", *shlex.split(launcher_args)]
        print(f"# point {arg}", flush=True)
        rc = launcher.main(argv + (["--dry_run"] if dry_run else []))
        if rc:
            return rc
    return 0


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sweep", required=True, help='e.g. "base|4x|16x,preset=cpu"')
    parser.add_argument("--root", required=True, help="directory holding one workdir per point and the results")
    parser.add_argument("--mode", default="local", choices=("local", "print", "tpu", "slurm", "collect"),
                        help="local: train here; print/tpu/slurm: print the commands; collect: results only")
    parser.add_argument("--xla_check", action="store_true",
                        help="record XLA cost-analysis FLOPs of each point's forward vs the analytic count")
    parser.add_argument("--launch", action="store_true", help="tpu/slurm: launch instead of printing (dry run)")
    parser.add_argument("--launcher_args", default="",
                        help="tpu: e.g. '--zone=us-east5-a --accelerator=v5p-64 --version=v2-alpha-tpuv5'; "
                             "slurm: e.g. '--nodes=4 --gpus_per_node=8 --partition=P'")
    parser.add_argument("--override", action="append", default=[],
                        help="extra flag for every point, e.g. --override=--config.data.latents_dir=/x (repeatable)")
    args = parser.parse_args(argv)
    if args.mode == "print":
        print("\n".join(plain_commands(args.sweep, args.root, args.override)))
        return
    if args.mode in ("tpu", "slurm"):
        sys.exit(launch_points(args.sweep, args.root, args.mode, args.override, args.launcher_args,
                               dry_run=not args.launch))
    try:
        run_sweep(args.sweep, args.root, overrides=args.override, run=args.mode == "local", xla_check=args.xla_check)
    except SweepError as err:
        raise SystemExit(f"[sweep] {err}") from None


if __name__ == "__main__":
    main()
