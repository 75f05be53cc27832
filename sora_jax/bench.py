"""Benchmarks: `python -m sora_jax.bench NAME [args...]` prints one JSON line.

NAME is data | vae | dit | sample; each lives in `sora_jax/bench_<name>.py` with a
`run(args: list[str]) -> dict` function, imported only when asked for (so the data
benchmark does not pay for compiling models, and vice versa).
"""

from __future__ import annotations

import importlib
import json
import sys

BENCHMARKS = ("data", "vae", "dit", "sample")


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
    print(json.dumps({"bench": name, **result}, sort_keys=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
