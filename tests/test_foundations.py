import numpy as np
import pytest

from sora_jax import sharding
from sora_jax.data.tokenizer import HashTokenizer
from sora_jax.models import patches


@pytest.mark.parametrize("shape,patch", [((1, 6, 10, 4), (1, 2, 2)), ((3, 4, 14, 16), (1, 2, 2)), ((4, 8, 4, 2), (2, 4, 2))])
def test_patchify_roundtrip_numpy_and_jax(shape, patch):
    import jax.numpy as jnp

    x = np.random.default_rng(0).normal(size=(2,) + shape).astype(np.float32)
    tok = patches.patchify(x, patch)
    grid = patches.grid_shape(shape[:3], patch)
    assert tok.shape == (2, int(np.prod(grid)), int(np.prod(patch)) * shape[3])
    np.testing.assert_array_equal(patches.unpatchify(tok, grid, patch, shape[3]), x)
    np.testing.assert_array_equal(np.asarray(patches.patchify(jnp.asarray(x), patch)), tok)
    # Token order matches grid_positions: token k holds the patch at positions[k].
    pos = patches.grid_positions(grid)
    k = len(pos) - 1
    t, h, w = pos[k] * np.array(patch)
    np.testing.assert_array_equal(tok[0, k, : shape[3]], x[0, t, h, w])


def test_patchify_rejects_indivisible():
    with pytest.raises(ValueError, match="not divisible"):
        patches.patchify(np.zeros((3, 5, 4, 2)), (1, 2, 2))


def test_tokenizer_pads_truncates_and_is_stable():
    tok = HashTokenizer(vocab_size=4096, max_len=8)
    ids = tok.encode("A red circle, bouncing.")
    assert ids.dtype == np.int32 and ids.shape == (8,)
    assert (ids[:6] > 1).all() and ids[6] == 1 and ids[7] == 0  # a red circle , bouncing . EOS PAD
    assert (tok.encode("a RED circle , bouncing .") == ids).all()
    long = tok.encode(" ".join(["word"] * 50))
    assert long[-1] == 1 and (long > 0).all()


def test_mesh_resolution_and_errors():
    assert sharding.resolve_mesh_shape({"data": -1, "fsdp": 2}, 8) == (4, 2, 1, 1)
    with pytest.raises(ValueError, match="unknown axes"):
        sharding.resolve_mesh_shape({"dta": 2}, 8)
    with pytest.raises(ValueError, match="needs 4 devices"):
        sharding.resolve_mesh_shape({"data": 2, "fsdp": 2}, 8)


def test_logical_to_spec_never_reuses_an_axis():
    rules = (("activation_batch", ("data", "fsdp")), ("embed", "fsdp"), ("mlp", "tensor"))
    spec = sharding.logical_to_spec(("activation_batch", "embed", "mlp"), rules)
    assert tuple(spec) == (("data", "fsdp"), None, "tensor")


def test_constrain_applies_logical_rules_inside_jit():
    import jax
    import jax.numpy as jnp
    from flax import nnx

    mesh = sharding.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    rules = (("activation_batch", ("data", "fsdp")), ("activation_embed", "tensor"))
    with jax.set_mesh(mesh), nnx.logical_axis_rules(rules):
        y = jax.jit(lambda x: sharding.constrain(x * 2, ("activation_batch", "activation_embed")))(jnp.ones((8, 4)))
    assert tuple(y.sharding.spec) == (("data", "fsdp"), "tensor")
    # Outside a mesh it is a no-op, so models run unsharded in plain scripts.
    assert sharding.constrain(jnp.ones(3), ("activation_batch",)).shape == (3,)
