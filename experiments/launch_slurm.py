"""Launch a sora_jax run on a Slurm GPU cluster: writes an sbatch script and submits it.

  python experiments/launch_slurm.py --name=dit-b2 --nodes=4 --gpus_per_node=8 \
      --config=configs/dit.py:B/2 --workdir=/shared/runs/dit-b2 [--partition=P] [--account=A] \
      [--time=24:00:00] [--env_setup='source ~/venv/bin/activate'] [--dry_run]

One Slurm task per node, each owning all GPUs of its node; `srun` starts them and
jax.distributed.initialize() reads the Slurm environment (node list, SLURM_PROCID),
so no coordinator flags are needed. `--signal=TERM@120` sends SIGTERM two minutes
before the time limit: the loop saves a checkpoint and exits cleanly, and
`--requeue` lets Slurm restart the job, which resumes from the workdir.
The workdir must be on a filesystem every node sees. --dry_run prints the script
and the sbatch command without writing or submitting anything.
"""

from __future__ import annotations

import argparse
import os
import shlex
import subprocess
import sys


def parse(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--name", required=True)
    p.add_argument("--nodes", type=int, default=1)
    p.add_argument("--gpus_per_node", type=int, default=8)
    p.add_argument("--cpus_per_node", type=int, default=32)
    p.add_argument("--time", default="24:00:00")
    p.add_argument("--partition", default=None)
    p.add_argument("--account", default=None)
    p.add_argument("--config", required=True)
    p.add_argument("--workdir", required=True, help="on a filesystem shared by all nodes")
    p.add_argument("--overrides", default="", help="extra '--config.a.b=V' flags, space separated")
    p.add_argument("--env_setup", default="", help="shell line run before training, e.g. activate a venv")
    p.add_argument("--repo_dir", default=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    p.add_argument("--dry_run", action="store_true")
    args = p.parse_args(argv)
    if args.nodes < 1 or args.gpus_per_node < 1:
        p.error("--nodes and --gpus_per_node must be >= 1")
    return args


def sbatch_script(args) -> str:
    lines = [
        "#!/bin/bash",
        f"#SBATCH --job-name={args.name}",
        f"#SBATCH --nodes={args.nodes}",
        "#SBATCH --ntasks-per-node=1",
        f"#SBATCH --gpus-per-node={args.gpus_per_node}",
        f"#SBATCH --cpus-per-task={args.cpus_per_node}",
        f"#SBATCH --time={args.time}",
        f"#SBATCH --output={args.workdir}/slurm-%j.out",
        "#SBATCH --signal=TERM@120",
        "#SBATCH --requeue",
        "#SBATCH --exclusive",
    ]
    if args.partition:
        lines.append(f"#SBATCH --partition={args.partition}")
    if args.account:
        lines.append(f"#SBATCH --account={args.account}")
    train = ["python", "-m", "sora_jax.main", f"--config={args.config}", f"--workdir={args.workdir}"]
    train += shlex.split(args.overrides)
    lines += [
        "set -euo pipefail",
        f"cd {shlex.quote(args.repo_dir)}",
        *([args.env_setup] if args.env_setup else []),
        "export XLA_PYTHON_CLIENT_MEM_FRACTION=0.92",
        "# One process per node; JAX reads SLURM_* to find its peers.",
        "srun --kill-on-bad-exit=1 --ntasks-per-node=1 " + shlex.join(train),
        "",
    ]
    return "\n".join(lines)


def main(argv=None) -> int:
    args = parse(sys.argv[1:] if argv is None else argv)
    script = sbatch_script(args)
    path = os.path.join(args.workdir, f"launch_{args.name}.sbatch")
    if args.dry_run:
        print(f"# would write {path}:")
        print(script)
        print(shlex.join(["sbatch", path]))
        return 0
    os.makedirs(args.workdir, exist_ok=True)
    with open(path, "w") as f:
        f.write(script)
    print(shlex.join(["sbatch", path]), flush=True)
    return subprocess.run(["sbatch", path]).returncode


if __name__ == "__main__":
    sys.exit(main())
