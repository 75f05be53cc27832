"""Test setup: 8 fake CPU devices, so sharding tests see a real mesh, and cheap compiles.

XLA_FLAGS must be set before JAX initialises its backend, hence here. A user's own XLA_FLAGS win.

`--xla_backend_optimization_level=0` runs LLVM unoptimised on the code XLA emits. The tests are
dominated by compiling, not running, and they check behaviour, not speed: this halves
tests/test_vae.py (146 s -> 81 s on 2 cores). XLA's HLO passes (fusion, layout, remat) are the
same at every level, so what is computed is the same up to float rounding; the model code in
sora_jax/ itself uses level 0 for its one-off init compiles (sora_jax/xla_options.py). To run
the suite at XLA's default level: XLA_FLAGS=--xla_force_host_platform_device_count=8 pytest.
Subprocesses get the same level through tests/helpers_stage.backend_level_flag().
"""
import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8 --xla_backend_optimization_level=0")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
