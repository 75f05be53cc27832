"""The VAE builds and encodes identically on an 8-device (data, fsdp, tensor) mesh."""

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from sora_jax import config_lib, sharding
from sora_jax.models import vae as vae_lib
from model_helpers import fast_rngs


def test_vae_encodes_the_same_on_a_fsdp_tensor_mesh():
    cfg = config_lib.load_config("configs/vae.py:micro").model
    x = np.random.default_rng(0).uniform(-1, 1, (4, 5, 32, 32, 3)).astype(np.float32)
    encode = nnx.jit(lambda m, v: m.encode(v)[0])
    mesh = sharding.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    with jax.set_mesh(mesh), nnx.logical_axis_rules(sharding.DEFAULT_RULES):
        # Used to fail here: the 3-channel RGB conv's output dim was sharded over fsdp.
        sharded = np.asarray(encode(vae_lib.CausalVAE(cfg, rngs=fast_rngs(0)), jnp.asarray(x)))
    with nnx.use_eager_sharding(False):
        plain = np.asarray(encode(vae_lib.CausalVAE(cfg, rngs=fast_rngs(0)), x))
    np.testing.assert_allclose(sharded, plain, atol=1e-5)
