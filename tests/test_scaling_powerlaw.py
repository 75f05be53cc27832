"""The numpy power-law fit recovers known exponents; isoFLOP helpers find known minima."""

import numpy as np
import pytest

from sora_jax import powerlaw


def _synthetic(a=2.0, b=0.25, c=0.4, n=9, noise=0.01, seed=0):
    """L = a (C / 1e14)^-b + c: from 2.4 down to 0.46 over six decades of compute."""
    rng = np.random.default_rng(seed)
    compute = np.logspace(14, 20, n)
    loss = a * (compute / 1e14) ** -b + c
    return compute, loss * np.exp(rng.normal(0.0, noise, n))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_fit_recovers_exponent_and_offset_with_noise(seed):
    compute, loss = _synthetic(seed=seed)
    fit = powerlaw.fit_power_law(compute, loss)
    assert fit.fit_offset
    assert fit.b == pytest.approx(0.25, abs=0.03)
    assert fit.c == pytest.approx(0.4, abs=0.05)
    # The curve itself is within the noise everywhere in range.
    assert np.max(np.abs(np.log(fit(compute) / loss))) < 0.04


def test_pure_power_law_exact_and_few_points_fix_offset():
    compute = np.array([1e15, 4e15, 1.6e16])
    loss = 7.0 * (compute / 1e15) ** -0.2
    fit = powerlaw.fit_power_law(compute, loss)  # 3 points: "auto" fixes c = 0
    assert not fit.fit_offset and fit.c == 0.0
    assert fit.b == pytest.approx(0.2, rel=1e-9)
    assert fit.a == pytest.approx(7.0 * 1e15**0.2, rel=1e-6)


def test_bootstrap_band_covers_truth_and_exponent_interval():
    compute, loss = _synthetic(noise=0.02, n=12, seed=3)
    fit = powerlaw.fit_power_law(compute, loss)
    grid = np.logspace(14, 20, 25)
    band = powerlaw.bootstrap_band(compute, loss, grid, fit, num_samples=200, level=0.95)
    assert not band["degenerate"] and band["num_samples"] == 200
    assert np.all(band["lo"] <= fit(grid) + 1e-9) and np.all(band["hi"] >= fit(grid) - 1e-9)
    b_lo, b_hi = band["b_interval"]
    assert b_lo < 0.25 < b_hi and b_hi - b_lo < 0.2
    pairs = powerlaw.bootstrap_band(compute, loss, grid, fit, num_samples=100, method="pairs")
    assert pairs["num_samples"] == 100


def test_bootstrap_degenerate_when_no_spare_points():
    compute = np.array([1.0, 2.0])
    band = powerlaw.bootstrap_band(compute, [2.0, 1.5], compute)
    assert band["degenerate"]
    np.testing.assert_allclose(band["lo"], band["hi"])


def test_bad_input_is_a_clear_error():
    with pytest.raises(ValueError, match="positive"):
        powerlaw.fit_power_law([1.0, 2.0, 3.0], [1.0, -1.0, 0.5])
    with pytest.raises(ValueError, match="2 points"):
        powerlaw.fit_power_law([1.0], [1.0])
    with pytest.raises(ValueError, match="distinct"):
        powerlaw.fit_power_law([2.0, 2.0], [1.0, 1.1])


def test_isoflop_parabola_and_allocation_exponent():
    true_opt = np.array([1e6, 4e6, 1.6e7])
    budgets = np.array([1e15, 1e16, 1e17])
    found = []
    for n_star in true_opt:
        sizes = n_star * np.array([0.1, 0.3, 1.0, 3.0, 10.0])
        loss = 0.05 * np.log(sizes / n_star) ** 2 + 1.0
        par = powerlaw.fit_isoflop_parabola(sizes, loss)
        assert par["interior"] and par["loss_opt"] == pytest.approx(1.0)
        found.append(par["n_opt"])
    np.testing.assert_allclose(found, true_opt, rtol=1e-6)
    alloc = powerlaw.fit_allocation_exponent(budgets, found)
    assert alloc["exponent"] == pytest.approx(np.log10(4.0), rel=1e-6)
    edge = powerlaw.fit_isoflop_parabola([1.0, 2.0, 4.0], [3.0, 2.0, 1.0])
    assert not edge["interior"]
