"""Test setup: 8 fake CPU devices, so sharding tests see a real mesh.

XLA_FLAGS must be set before JAX initialises its backend, hence here.
"""
import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
