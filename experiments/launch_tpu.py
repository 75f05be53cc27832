"""Launch a sora_jax run on a Cloud TPU VM pod slice (every worker runs the same command).

  python experiments/launch_tpu.py --name=sora-dit --zone=us-east5-b --accelerator=v5litepod-16 \
      --version=v2-alpha-tpuv5-lite --config=configs/dit.py:B/2 --workdir=gs://BUCKET/runs/dit-b2 \
      [--project=P] [--spot] --repo=GIT_URL [--ref=main] [--steps=create,setup,train,delete] [--dry_run]

Steps (default: all four, in order):
  create  gcloud compute tpus tpu-vm create (a pod slice: one VM per 4 or 8 chips)
  setup   on every worker: clone the repo at --ref and pip install it with jax[tpu]
  train   on every worker: python -m sora_jax.main ... ; jax.distributed.initialize() finds the
          other workers from the TPU metadata, so no coordinator flags are needed
  delete  gcloud compute tpus tpu-vm delete --quiet
The workdir must be visible to every worker (a gs:// bucket): all workers write checkpoints.
Re-running `--steps=train` after a preemption resumes from the workdir's latest checkpoint.
--dry_run prints the exact commands instead of running them.
"""

from __future__ import annotations

import argparse
import os
import shlex
import subprocess
import sys

STEPS = ("create", "setup", "train", "delete")


def parse(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--name", required=True, help="TPU VM name")
    p.add_argument("--zone", required=True)
    p.add_argument("--accelerator", required=True, help="e.g. v4-32, v5litepod-16, v5p-64, v6e-16")
    p.add_argument("--version", required=True, help="TPU VM runtime, e.g. tpu-ubuntu2204-base, v2-alpha-tpuv5-lite")
    p.add_argument("--config", required=True, help="configs/X.py:ARG, relative to the repo")
    p.add_argument("--workdir", required=True, help="shared by all workers, e.g. gs://bucket/runs/name")
    p.add_argument("--overrides", default="", help="extra '--config.a.b=V' flags, space separated")
    p.add_argument("--project", default=None)
    p.add_argument("--spot", action="store_true", help="spot capacity (preemptible; the run resumes)")
    p.add_argument("--repo", default=None, help="git URL the workers clone (default: this checkout's origin)")
    p.add_argument("--ref", default="main", help="git branch, tag or commit to run")
    p.add_argument("--steps", default=",".join(STEPS), help=f"comma-separated subset of {STEPS}")
    p.add_argument("--dry_run", action="store_true", help="print the commands, run nothing")
    args = p.parse_args(argv)
    steps = [s for s in args.steps.split(",") if s]
    bad = [s for s in steps if s not in STEPS]
    if bad:
        p.error(f"--steps: unknown {bad}; choose from {STEPS}")
    if args.workdir.startswith("/") and steps != ["delete"]:
        print(f"warning: --workdir={args.workdir} is a local path; each worker would write its own copy. "
              "Use a gs:// bucket for pods.", file=sys.stderr)
    args.steps = steps
    if "setup" in steps and not args.repo:
        args.repo = _origin_url()
        if not args.repo:
            p.error("--repo is required for the setup step (the git URL every worker clones)")
    return args


def _origin_url() -> str | None:
    try:
        out = subprocess.run(["git", "config", "--get", "remote.origin.url"], capture_output=True, text=True,
                             cwd=os.path.dirname(os.path.abspath(__file__)))
    except OSError:
        return None
    return out.stdout.strip() or None


def commands(args) -> list[list[str]]:
    base = ["gcloud", "compute", "tpus", "tpu-vm"]
    where = [f"--zone={args.zone}"] + ([f"--project={args.project}"] if args.project else [])
    setup_script = " && ".join([
        f"(test -d sora_jax || git clone {shlex.quote(args.repo)} sora_jax)",
        "cd sora_jax",
        "git fetch --all --tags",
        f"git checkout {shlex.quote(args.ref)}",
        "python3 -m pip install -U pip",
        "python3 -m pip install -e . 'jax[tpu]>=0.10.2,<0.11'",
    ])
    train_cmd = ["python3", "-m", "sora_jax.main", f"--config={args.config}", f"--workdir={args.workdir}"]
    train_cmd += shlex.split(args.overrides)
    train_script = "cd sora_jax && " + shlex.join(train_cmd)
    out = {
        "create": base + ["create", args.name] + where + [f"--accelerator-type={args.accelerator}",
                                                         f"--version={args.version}"]
        + (["--spot"] if args.spot else []),
        "setup": base + ["ssh", args.name] + where + ["--worker=all", f"--command={setup_script}"],
        "train": base + ["ssh", args.name] + where + ["--worker=all", f"--command={train_script}"],
        "delete": base + ["delete", args.name] + where + ["--quiet"],
    }
    return [out[s] for s in args.steps]


def main(argv=None) -> int:
    args = parse(sys.argv[1:] if argv is None else argv)
    for cmd in commands(args):
        print(shlex.join(cmd), flush=True)
        if not args.dry_run:
            result = subprocess.run(cmd)
            if result.returncode:
                print(f"failed ({result.returncode}): {shlex.join(cmd)}", file=sys.stderr)
                return result.returncode
    return 0


if __name__ == "__main__":
    sys.exit(main())
