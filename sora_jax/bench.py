"""Benchmarks: `python -m sora_jax.bench NAME [args...]` prints one JSON line.

NAME is data | vae | dit | sample; each lives in `sora_jax/bench_<name>.py` with a
`run(args: list[str]) -> dict` function, imported only when asked for (so the data
benchmark does not pay for compiling models, and vice versa).
"""

from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys

BENCHMARKS = ("data", "vae", "dit", "sample")
# The peer timings (diffusers' Wan 2.1 VAE and transformer, PyTorch) live beside the checkout.
PEER_SCRIPT = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "bench", "run_peer.sh")


def run_peer(kind: str, runs: int) -> dict:
    """The peer's JSON line from `run_peer.sh KIND RUNS` (kind "vae" or "dit"); raises with its stderr."""
    script = os.environ.get("SORA_PEER_SCRIPT", os.path.abspath(PEER_SCRIPT))
    if not os.path.exists(script):
        script = "/work/shared/bench/run_peer.sh"
    out = subprocess.run(["bash", script, kind, str(runs)], capture_output=True, text=True, timeout=3600)
    if out.returncode != 0:
        raise RuntimeError(f"peer benchmark failed ({script} {kind}): {out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in BENCHMARKS:
        print(f"usage: python -m sora_jax.bench {{{'|'.join(BENCHMARKS)}}} [args...]", file=sys.stderr)
        return 2
    name, rest = argv[0], argv[1:]
    try:
        module = importlib.import_module(f"sora_jax.bench_{name}")
    except ModuleNotFoundError as e:
        if e.name != f"sora_jax.bench_{name}":
            raise
        print(f"benchmark {name!r} is not available yet (no module sora_jax/bench_{name}.py)", file=sys.stderr)
        return 2
    result = module.run(rest)
    # The peer (run_peer.sh) inherits this process's environment, huge pages included.
    from sora_jax import hugepages

    result.setdefault("malloc_hugepages", hugepages.enabled())
    print(json.dumps({"bench": name, **result}, sort_keys=True))
    return 0


if __name__ == "__main__":
    from sora_jax import hugepages

    hugepages.reexec_with_hugepages()  # before JAX starts: see sora_jax/hugepages.py
    sys.exit(main())
