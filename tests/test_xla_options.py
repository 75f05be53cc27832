"""config.cpu_dot_fusion: the per-program XLA:CPU option is accepted, changes the fusion, not the numbers."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sora_jax import config_lib, xla_options
from sora_jax.models import dit
from sora_jax.models.attention import recompute_attention
from sora_jax.models.patches import grid_positions

pytestmark = pytest.mark.skipif(jax.default_backend() != "cpu", reason="an XLA:CPU option")


def _ynn_fusion_ops(compiled_text: str) -> list[set[str]]:
    """The HLO opcodes inside each YNNPACK fusion of a compiled program."""
    bodies = {}
    for block in compiled_text.split("\n\n"):
        head = block.strip().splitlines()[0] if block.strip() else ""
        m = re.match(r"(?:ENTRY )?%?([\w.\-]+) ", head)
        if m:
            bodies[m.group(1)] = block
    fusions = re.findall(r"kind=kCustom, calls=%?([\w.\-]+),[^\n]*__ynn_fusion", compiled_text)
    return [set(re.findall(r" (\w+)\(", bodies.get(name, ""))) for name in fusions]


def _attention_program(fusion: str):
    q = jax.random.normal(jax.random.key(0), (2, 64, 2, 16))
    fn = lambda q, k, v: recompute_attention(q, k, v, None)
    return jax.jit(fn).lower(q, q * 0.5, q + 1).compile(compiler_options=xla_options.compiler_options(fusion)), q


def test_individual_keeps_the_softmax_out_of_the_matmul_fusions():
    fused, q = _attention_program("fused")
    individual, _ = _attention_program("individual")
    fused_ops, individual_ops = _ynn_fusion_ops(fused.as_text()), _ynn_fusion_ops(individual.as_text())
    # XLA's default puts exp/reduce of the softmax into a YNNPACK fusion: the slow case the option avoids.
    assert any({"exponential", "reduce"} & ops for ops in fused_ops), fused_ops
    assert individual_ops and all("dot" in ops and not {"exponential", "reduce"} & ops for ops in individual_ops), individual_ops
    np.testing.assert_allclose(np.asarray(individual(q, q * 0.5, q + 1)), np.asarray(fused(q, q * 0.5, q + 1)),
                               rtol=1e-5, atol=1e-5)


def test_dit_gradients_same_under_either_fusion():
    from flax import nnx

    cfg = dit.dit_config("micro")
    cfg.text.encoder, cfg.text.emb_dim = "precomputed", 32
    model = dit.create_dit(cfg)
    graphdef, params = nnx.split(model, nnx.Param)
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(2, 24, model.patch_dim)), jnp.float32)
    t = jnp.asarray([0.3, 0.8], jnp.float32)
    pos = jnp.asarray(np.broadcast_to(grid_positions((2, 3, 4)), (2, 24, 3)))
    emb = jnp.asarray(rng.normal(size=(2, 1, 5, 32)), jnp.float32)
    target = jnp.asarray(rng.normal(size=(2, 24, model.out_dim)), jnp.float32)

    def loss(params):  # the output is 0 at init (adaLN-Zero), its gradient is not
        return jnp.mean((nnx.merge(graphdef, params)(x, t, pos, None, text_emb=emb) - target) ** 2)

    grads = [jax.jit(jax.grad(loss), compiler_options=xla_options.compiler_options(f))(params)
             for f in ("fused", "individual")]
    leaves = list(zip(jax.tree.leaves(grads[0]), jax.tree.leaves(grads[1])))
    assert any(float(jnp.abs(a).max()) > 1e-4 for a, _ in leaves)
    for a, b in leaves:
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-6)


def test_choices_and_overrides(monkeypatch):
    monkeypatch.delenv("XLA_FLAGS", raising=False)
    assert xla_options.compiler_options("fused") is None
    assert xla_options.compiler_options("individual") == {
        "xla_cpu_experimental_ynn_fusion_type": "LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT"}
    with pytest.raises(ValueError, match="config.cpu_dot_fusion='separate'"):
        xla_options.compiler_options("separate")
    # A user's own flag wins over the config.
    monkeypatch.setenv("XLA_FLAGS", "--xla_cpu_experimental_ynn_fusion_type=dot")
    assert xla_options.compiler_options("individual") is None


def test_config_default_and_old_workdirs(monkeypatch):
    monkeypatch.delenv("XLA_FLAGS", raising=False)
    config = config_lib.load_config("configs/dit.py:micro")
    assert config.cpu_dot_fusion == "fused" and xla_options.from_config(config) is None
    config.cpu_dot_fusion = "individual"
    assert xla_options.from_config(config) == xla_options.compiler_options("individual")
    # A workdir config from before the field existed keeps XLA's defaults.
    old = config_lib.base_config()
    del old["cpu_dot_fusion"]
    assert xla_options.from_config(old) is None


def test_init_options_draw_the_same_parameters_up_to_rounding(monkeypatch):
    """The init's low LLVM level changes compile time, not the draws (beyond float rounding);
    a user's own level in XLA_FLAGS wins."""
    monkeypatch.setenv("XLA_FLAGS", "--xla_force_host_platform_device_count=8")  # no level of the user's (conftest sets one)
    options = xla_options.init_compiler_options()
    assert options == {"xla_backend_optimization_level": 0}
    draw = lambda: jax.nn.initializers.truncated_normal(0.02)(jax.random.key(3), (64, 96))  # noqa: E731
    low = jax.jit(draw).lower().compile(compiler_options=options)()
    # XLA's default level, 3, explicitly: conftest runs the test process itself at level 0.
    default = jax.jit(draw).lower().compile(compiler_options={"xla_backend_optimization_level": 3})()
    np.testing.assert_allclose(np.asarray(low), np.asarray(default), rtol=0, atol=1e-7)
    assert float(jnp.std(low)) > 0.01  # a real draw, not zeros
    monkeypatch.setenv("XLA_FLAGS", "--xla_backend_optimization_level=2")
    assert xla_options.init_compiler_options() is None
