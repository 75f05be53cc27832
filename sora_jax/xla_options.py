"""Per-program XLA compiler options, chosen in the config (`config.cpu_dot_fusion`).

XLA:CPU hands dots to YNNPACK and, by default ("fused"), fuses a dot's elementwise
and reduce neighbours into the same YNNPACK call. For an unmasked attention that
makes the score matmul, the softmax and the PV matmul one call, which runs far
below the matmul rate: bench-small's self-attention (4x6x320x320x64) takes 13.7 ms
forward that way and 5.2-5.9 ms with "individual" (every dot its own call). A
masked attention (packed rows) is not fused like that (4.9 ms either way), and on
the whole bench-small DiT training step the two were level in paired rounds with
the peer (1.16x vs 1.13x), while the convolution-heavy VAE is 1.5x slower without
the fusion (docs/dit.md). So XLA's default stays the default and "individual" is
there for forward-heavy, unmasked programs and for measuring.

The option is passed per compiled program (`jax.jit(..., compiler_options=...)`),
not through XLA_FLAGS, so one process can run both kinds. A user's own
`--xla_cpu_experimental_ynn_fusion_type` in XLA_FLAGS wins; on GPU and TPU nothing
is passed.
"""

from __future__ import annotations

import os

import jax

_YNN_OPTION = "xla_cpu_experimental_ynn_fusion_type"
CPU_DOT_FUSION = {
    "fused": None,  # XLA's default fusion types
    "individual": "LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT",  # every dot its own YNNPACK call, nothing fused in
}


def compiler_options(cpu_dot_fusion: str) -> dict[str, str] | None:
    """Compiler options for `jax.jit(compiler_options=...)`, or None for XLA's defaults."""
    if cpu_dot_fusion not in CPU_DOT_FUSION:
        raise ValueError(f"config.cpu_dot_fusion={cpu_dot_fusion!r}; choose one of {sorted(CPU_DOT_FUSION)}")
    value = CPU_DOT_FUSION[cpu_dot_fusion]
    if value is None or jax.default_backend() != "cpu" or _YNN_OPTION in os.environ.get("XLA_FLAGS", ""):
        return None
    return {_YNN_OPTION: value}


def from_config(config) -> dict[str, str] | None:
    """The config's choice; configs written before the field existed get XLA's defaults."""
    return compiler_options(str(config.get("cpu_dot_fusion", "fused")))


def init_compiler_options() -> dict[str, int] | None:
    """Compiler options for the programs that draw initial parameters (run once, elementwise).

    XLA:CPU spends most of an init's compile in LLVM optimising the fused threefry +
    truncated-normal loop of every differently shaped kernel: the micro VAE's init compiles
    in 9.0-9.8 s at the default level and 1.8-2.0 s at level 0, and then runs in ~16 ms
    instead of 5-16 ms. The draws can differ in the last bit (measured max 1.2e-7; float rounding of
    erfinv), so an init is reproducible for a given XLA version and these options, as
    before. On GPU and TPU nothing is passed."""
    if jax.default_backend() != "cpu" or "xla_backend_optimization_level" in os.environ.get("XLA_FLAGS", ""):
        return None
    return {"xla_backend_optimization_level": 0}
