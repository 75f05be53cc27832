"""FLOPs counter: DiT-paper table, parameter counts, agreement with XLA's cost_analysis, CLI."""

import json

import pytest

from sora_jax import flops
from sora_jax.models import dit

# Peebles & Xie, Table 4 (Gflops at 256x256, multiply-add = 1, forward).
PAPER_GFLOPS = {"S/8": 0.36, "S/4": 1.41, "S/2": 6.06, "B/8": 1.42, "B/4": 5.56, "B/2": 23.01,
                "L/4": 19.70, "XL/8": 7.39, "XL/4": 29.05, "XL/2": 118.64}
# Two values given to us for the table do not fit the architecture: L/8 = 5.44 and L/2 = 77.52.
# The same formula that matches the ten others within 1% gives 5.01 and 80.70 (L/2 must be
# 4x L/4's token-linear part plus attention; 77.52 is L/2 without attention, which XL/2's
# 118.64 does include).
# We check our figures against that arithmetic instead; see docs/dit.md.
L_FAMILY_OURS = {"L/8": 5.01, "L/2": 80.70}
PAPER_PARAMS_M = {"S/2": 33, "B/2": 130, "L/2": 458, "XL/2": 675}


def paper_config(variant):
    return flops.load_config(f"configs/dit_paper.py:{variant}")


@pytest.mark.parametrize("variant", sorted(PAPER_GFLOPS))
def test_dit_paper_gflops(variant):
    got = flops.dit_flops(paper_config(variant).model, (1, 32, 32))["dit_paper_gflops"]
    assert got == pytest.approx(PAPER_GFLOPS[variant], rel=0.015)


def test_dit_paper_l_family_consistency():
    got = {v: flops.dit_flops(paper_config(v).model, (1, 32, 32))["dit_paper_gflops"] for v in ("L/8", "L/4", "L/2")}
    for v, want in L_FAMILY_OURS.items():
        assert got[v] == pytest.approx(want, rel=0.002)
    assert got["L/2"] > 4 * got["L/4"] - 0.5  # quadrupling tokens at least quadruples the linear layers


@pytest.mark.parametrize("variant", sorted(PAPER_PARAMS_M))
def test_dit_paper_params(variant):
    got = flops.dit_params(paper_config(variant).model)["params"] / 1e6
    assert got == pytest.approx(PAPER_PARAMS_M[variant], rel=0.01)


def test_analytic_matches_xla_cost_analysis():
    """Our count (matmuls only) vs XLA's (matmuls + elementwise): within 8%, and never above XLA's."""
    cfg = dit.dit_config("micro")
    cfg.latent_channels = 4
    cfg.text.update(max_len=8, width=64, depth=1, heads=2, mlp_dim=256)
    ours = flops.dit_flops(cfg, (2, 8, 8), text_len=8)["forward_flops"]
    xla = flops.xla_dit_forward_flops(cfg, (2, 8, 8), text_len=8)
    assert 0.92 * xla <= ours <= 1.0 * xla, (ours, xla)


def test_cli_json(capsys):
    flops.main(["--config=configs/dit_paper.py:S/8", "--json"])
    out = json.loads(capsys.readouterr().out)
    assert {"params", "forward_flops", "train_flops", "dit_paper_gflops"} <= set(out)
    assert out["train_flops"] == 3 * out["forward_flops"]
    assert out["forward_flops"] == pytest.approx(2e9 * out["dit_paper_gflops"])


def test_missing_example_size_is_a_clear_error():
    config = paper_config("S/8")
    del config["flops"]
    with pytest.raises(ValueError, match="config.flops.latent_thw"):
        flops.report(config, "configs/dit_paper.py")
