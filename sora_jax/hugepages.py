"""Transparent huge pages for XLA:CPU's buffers: the command-line tools re-exec once with them.

Why. XLA:CPU allocates each execution's large buffers with malloc (sprint 6 counted ~276 MiB
of freshly mapped pages per bench-small DiT step), in 4 KiB pages. glibc's `glibc.malloc.hugetlb=1` tunable makes
malloc ask for transparent huge pages (madvise), so those buffers come in 2 MiB pages: fewer
page faults and TLB misses (which of the two matters was not separated; removing the faults
alone, with malloc's mmap off, gave no gain: docs/dit.md, sprint 6). Measured on a 2-core
Intel Xeon (AVX-512, AMX), runs alternated with and without:
- `bench dit` (bench-small training step): 0.86-0.91 -> 0.79-0.87 s; in its profile the
  zero fill of the scan's stacked buffers fell from 80 to 45 thunk-ms per step, the rest
  of the ~80 ms gained is spread over the matmuls and fusions;
- `bench vae`: encode 78-88 -> 88-96 frames/s, decode within noise;
- the quick VAE config's value-and-gradient: 0.228-0.230 -> 0.218-0.220 s.
The peer of the benchmarks (PyTorch, run as a child process) inherits the setting and gains too.

A glibc tunable is read once, when the process starts, so it cannot be switched on from
inside Python: the CLIs (train, sample, bench, ...) call `reexec_with_hugepages()` first,
which replaces the process (same pid, same arguments) with one started with the tunable
set. Library use (tests, notebooks) is never re-executed. It does nothing
- off Linux or glibc < 2.35 (the first glibc with the tunable),
- when the kernel's THP mode is "never" (no huge pages) or "always" (malloc gets them anyway),
- when GLIBC_TUNABLES already sets glibc.malloc.hugetlb (the user's choice, or the re-exec'd child),
- with SORA_JAX_HUGEPAGES=0.
"""

from __future__ import annotations

import os
import platform
import sys

TUNABLE = "glibc.malloc.hugetlb=1"
THP_MODE_FILE = "/sys/kernel/mm/transparent_hugepage/enabled"


def thp_mode(path: str = THP_MODE_FILE) -> str | None:
    """The kernel's transparent-huge-page mode ("always" | "madvise" | "never"), None if unknown."""
    try:
        with open(path) as f:
            text = f.read()
    except OSError:
        return None
    start, end = text.find("["), text.find("]")
    return text[start + 1 : end] if 0 <= start < end else None


def glibc_version() -> tuple[int, int] | None:
    lib, version = platform.libc_ver()
    if lib != "glibc":
        return None
    try:
        major, minor = version.split(".")[:2]
        return int(major), int(minor)
    except ValueError:
        return None


def tunables_with_hugepages(env: dict, mode: str | None, glibc: tuple[int, int] | None,
                            system: str = sys.platform) -> str | None:
    """The GLIBC_TUNABLES value to re-exec with, or None if a re-exec would not help (see module doc)."""
    current = env.get("GLIBC_TUNABLES", "")
    if (system != "linux" or glibc is None or glibc < (2, 35) or mode != "madvise"
            or env.get("SORA_JAX_HUGEPAGES", "1") == "0" or "glibc.malloc.hugetlb" in current):
        return None
    return f"{current}:{TUNABLE}" if current else TUNABLE


def enabled(env=None, mode: str | None = None) -> bool:
    """True if this process's malloc gets transparent huge pages (reported by the CLIs and benchmarks)."""
    env = os.environ if env is None else env
    mode = thp_mode() if mode is None else mode
    return mode == "always" or (mode == "madvise" and TUNABLE in env.get("GLIBC_TUNABLES", "").split(":"))


def reexec_with_hugepages() -> None:
    """Replaces this process with the same command under glibc.malloc.hugetlb=1, when that helps.

    Call it first thing in a CLI's main, before JAX starts threads or opens files. Returns
    (and the program goes on as is) whenever the re-exec does not apply.
    """
    tunables = tunables_with_hugepages(os.environ, thp_mode(), glibc_version())
    argv = getattr(sys, "orig_argv", None)  # the command as typed: [python, -m, sora_jax.main, ...]
    if tunables is None or not argv or sys.flags.interactive:
        return
    env = dict(os.environ, GLIBC_TUNABLES=tunables)
    sys.stdout.flush()
    sys.stderr.flush()
    try:
        os.execve(sys.executable, [sys.executable, *argv[1:]], env)
    except OSError as err:  # e.g. no exec permission in a sandbox: run on without huge pages
        print(f"[sora_jax] could not re-exec with {TUNABLE} ({err}); running without huge pages", file=sys.stderr)
