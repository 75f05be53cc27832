"""The CLIs' one-time re-exec with glibc's malloc hugetlb tunable (sora_jax/hugepages.py)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from sora_jax import hugepages

GLIBC = (2, 36)


@pytest.mark.parametrize("env, mode, glibc, system, expected", [
    ({}, "madvise", GLIBC, "linux", hugepages.TUNABLE),
    ({"GLIBC_TUNABLES": "glibc.malloc.arena_max=2"}, "madvise", GLIBC, "linux",
     "glibc.malloc.arena_max=2:" + hugepages.TUNABLE),  # the user's tunables are kept
    ({"GLIBC_TUNABLES": "glibc.malloc.hugetlb=0"}, "madvise", GLIBC, "linux", None),  # the user's choice wins
    ({"GLIBC_TUNABLES": hugepages.TUNABLE}, "madvise", GLIBC, "linux", None),  # the re-exec'd child: no loop
    ({"SORA_JAX_HUGEPAGES": "0"}, "madvise", GLIBC, "linux", None),
    ({}, "always", GLIBC, "linux", None),  # malloc gets huge pages anyway
    ({}, "never", GLIBC, "linux", None),
    ({}, None, GLIBC, "linux", None),  # no THP file (containers, old kernels)
    ({}, "madvise", (2, 31), "linux", None),  # glibc without the tunable
    ({}, "madvise", None, "linux", None),  # musl
    ({}, "madvise", GLIBC, "darwin", None),
])
def test_when_to_reexec(env, mode, glibc, system, expected):
    assert hugepages.tunables_with_hugepages(env, mode, glibc, system) == expected


def test_enabled_needs_the_tunable_and_a_thp_mode_that_honours_it():
    on = {"GLIBC_TUNABLES": "glibc.malloc.arena_max=2:" + hugepages.TUNABLE}
    assert hugepages.enabled(on, "madvise") and hugepages.enabled({}, "always")
    assert not hugepages.enabled({}, "madvise") and not hugepages.enabled(on, "never")
    assert not hugepages.enabled({"GLIBC_TUNABLES": "glibc.malloc.hugetlb=0"}, "madvise")


def test_thp_mode_reads_the_bracketed_choice(tmp_path):
    f = tmp_path / "enabled"
    f.write_text("always [madvise] never\n")
    assert hugepages.thp_mode(str(f)) == "madvise"
    f.write_text("[always] madvise never\n")
    assert hugepages.thp_mode(str(f)) == "always"
    assert hugepages.thp_mode(str(tmp_path / "missing")) is None


def test_reexec_keeps_the_command_line_and_sets_the_tunable_once():
    env = {k: v for k, v in os.environ.items() if k not in ("GLIBC_TUNABLES", "SORA_JAX_HUGEPAGES")}
    if hugepages.tunables_with_hugepages(env, hugepages.thp_mode(), hugepages.glibc_version()) is None:
        pytest.skip("the re-exec does not apply on this machine (THP mode, glibc or OS)")
    code = ("import os, sys; from sora_jax import hugepages; print('before', flush=True); "
            "hugepages.reexec_with_hugepages(); print(sys.argv[1:], os.environ['GLIBC_TUNABLES'])")
    out = subprocess.run([sys.executable, "-c", code, "a", "--b=1"], env=env, capture_output=True, text=True,
                         timeout=120, cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert out.returncode == 0, out.stderr
    # "before" twice: the original process, then the re-exec'd one, which does not re-exec again.
    assert out.stdout.splitlines() == ["before", "before", f"['a', '--b=1'] {hugepages.TUNABLE}"]
