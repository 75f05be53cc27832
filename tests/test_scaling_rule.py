"""The multiple-to-size rule, with the real DiT config and the analytic FLOPs/params (eval_shape only).

Tolerances (stated in docs/scaling.md):
  * training FLOPs of a point = multiple x base within 2% (steps are rounded to integers);
  * DiT parameters = multiple^(1 - data_frac) x base within 20% (width moves in whole
    heads; at 3-5 heads one head is 20-33% of the width, the rule picks the closest);
  * the config builds a model whose exact parameter count is the one recorded.
"""

import importlib.util
import math
import os

import pytest

from sora_jax import flops, scaling

_CONFIG = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs", "scaling.py")


def _configs():
    spec = importlib.util.spec_from_file_location("_scaling_config_under_test", _CONFIG)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def cfgs():
    return _configs()


def _totals(config):
    model = config.model
    per_example = flops.dit_flops(model, tuple(config.flops.latent_thw))["train_flops"]
    return flops.dit_params(model)["dit_params"], per_example * config.train.steps


@pytest.mark.parametrize("preset", ["cpu", "pod"])
def test_base_4x_16x_grow_params_and_flops_by_the_declared_factors(cfgs, preset):
    base = cfgs.get_config(f"base,preset={preset}")
    base_params, base_flops = _totals(base)
    previous_width = base.model.width
    for name, multiple in (("4x", 4.0), ("16x", 16.0)):
        config = cfgs.get_config(f"{name},preset={preset}")
        params, total = _totals(config)  # recomputed from the model config, not read from config.scaling
        assert total / base_flops == pytest.approx(multiple, rel=0.02), name
        assert params / base_params == pytest.approx(multiple**0.5, rel=0.20), name
        assert config.scaling.dit_params == params
        # Width and depth grow together; the batch, data and eval do not change.
        assert config.model.width > previous_width and config.model.depth >= base.model.depth
        assert config.model.width % config.model.heads == 0
        assert config.model.width // config.model.heads == base.model.width // base.model.heads
        assert config.model.mlp_dim == 4 * config.model.width
        for key in ("batch_size", "row_len", "num_eval", "latents_dir"):
            assert config.data[key] == base.data[key], key
        assert config.train.num_eval_batches == base.train.num_eval_batches
        assert tuple(config.diffusion.eval_times) == tuple(base.diffusion.eval_times)
        assert config.model.text.to_dict() == base.model.text.to_dict()
        previous_width = config.model.width


def test_data_frac_moves_the_split_and_isoflop_points_share_the_budget(cfgs):
    base_params, base_flops = _totals(cfgs.get_config("base,preset=cpu"))
    all_params = cfgs.get_config("16x,preset=cpu,data_frac=0")  # all compute into parameters
    all_data = cfgs.get_config("16x,preset=cpu,data_frac=1")  # all compute into tokens
    assert all_data.model.width == cfgs.get_config("base,preset=cpu").model.width
    assert all_data.train.steps == 16 * cfgs.get_config("base,preset=cpu").train.steps
    p, f = _totals(all_params)
    assert p / base_params == pytest.approx(16.0, rel=0.2) and f / base_flops == pytest.approx(16.0, rel=0.02)

    sizes = []
    for shift in (-1, 0, 1):
        config = cfgs.get_config(f"16x,preset=cpu,size_shift={shift}")
        params, total = _totals(config)
        assert total / base_flops == pytest.approx(16.0, rel=0.02), shift
        sizes.append(params)
    assert sizes[0] < sizes[1] < sizes[2]
    assert sizes[2] / sizes[0] == pytest.approx(16.0, rel=0.35)  # two steps of size_step=4


def test_model_built_from_the_config_has_the_recorded_size(cfgs):
    import jax
    from flax import nnx

    from sora_jax.models.dit import DiT

    config = cfgs.get_config("4x,preset=micro")
    with nnx.use_eager_sharding(False):
        abstract = nnx.eval_shape(lambda: DiT(config.model, rngs=nnx.Rngs(0)))
    total = sum(math.prod(a.shape) for a in jax.tree.leaves(nnx.state(abstract, nnx.Param)))
    assert total == config.scaling.params
    assert config.scaling.steps == config.train.steps
    assert config.train.eval_every <= config.train.steps and config.train.checkpoint_every == config.train.eval_every


def test_scale_shape_is_monotone_and_plan_is_exact_for_a_toy_counter():
    base = scaling.Shape(depth=4, heads=4, head_dim=16, mlp_ratio=4.0)

    def count(s):  # 12 d^2 per layer, the textbook transformer count
        return 12 * s.width**2 * s.depth

    widths = [scaling.scale_shape(base, p, count).width for p in (1, 2, 4, 8, 16, 64)]
    assert widths == sorted(widths) and widths[0] == base.width
    plan = scaling.plan_point(base, 100, 8.0, 0.5, count, lambda s: 6.0 * count(s))
    assert plan.shape.depth == round(4 * 8**(0.5 / 3))
    assert plan.flops_factor == pytest.approx(8.0, rel=0.01)
    assert plan.param_factor * plan.token_factor == pytest.approx(plan.flops_factor, rel=1e-9)


def test_bad_arguments_are_clear_errors(cfgs):
    with pytest.raises(ValueError, match="declares a sweep"):
        cfgs.get_config("base|4x,preset=cpu")
    with pytest.raises(ValueError, match="unknown preset"):
        cfgs.get_config("4x,preset=tpu")
    with pytest.raises(ValueError, match="compute multiple"):
        cfgs.get_config("four,preset=cpu")
    with pytest.raises(ValueError, match="data_frac"):
        cfgs.get_config("4x,preset=cpu,data_frac=2")
