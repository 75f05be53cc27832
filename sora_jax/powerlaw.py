"""Scaling-law fits with numpy only: L(C) = a * C^-b + c, bootstrap bands, isoFLOP minima.

The fit works in log space (every point's *relative* error counts the same, which
is what a log-log plot shows), with C normalised by its geometric mean so that the
numbers stay well conditioned for FLOP counts of 1e12..1e24:

  1. a grid over the irreducible loss c in [0, min L): for each c, log(L - c) is
     linear in log C, so (log a, b) come from linear least squares;
  2. the best grid point is refined by Levenberg-Marquardt on (log a, b, c),
     with c kept in [0, min L).

With k points and 3 unknowns the offset fit is exactly determined at k = 3, so
`offset="auto"` fits c only from 4 points on and otherwise uses a pure power law
(c = 0). The bootstrap resamples log-space residuals (few-point sweeps) or whole
points ("pairs", for many points) and refits; its band is empty (degenerate) when
there are no more points than parameters, and the result says so.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import numpy as np


@dataclasses.dataclass(frozen=True)
class PowerLawFit:
    """L(x) = a_norm * (x / x_ref)^-b + c, i.e. a = a_norm * x_ref^b in raw units."""

    a_norm: float
    b: float
    c: float
    x_ref: float
    fit_offset: bool  # False: c was fixed at 0
    n_points: int
    rmse_log: float  # root mean square residual of log L

    @property
    def a(self) -> float:
        return float(self.a_norm * self.x_ref**self.b)

    @property
    def num_params(self) -> int:
        return 3 if self.fit_offset else 2

    def __call__(self, x) -> np.ndarray:
        x = np.asarray(x, np.float64)
        return self.a_norm * (x / self.x_ref) ** (-self.b) + self.c

    def as_dict(self) -> dict:
        return dict(
            a=self.a, b=self.b, c=self.c, a_norm=self.a_norm, x_ref=self.x_ref,
            fit_offset=self.fit_offset, n_points=self.n_points, rmse_log=self.rmse_log,
        )


def _check_xy(x, y) -> tuple[np.ndarray, np.ndarray]:
    x = np.asarray(x, np.float64).ravel()
    y = np.asarray(y, np.float64).ravel()
    if x.shape != y.shape:
        raise ValueError(f"power-law fit: x has {x.size} values but y has {y.size}")
    if x.size < 2:
        raise ValueError(f"power-law fit needs at least 2 points, got {x.size}")
    if not (np.all(np.isfinite(x)) and np.all(np.isfinite(y))):
        raise ValueError(f"power-law fit: non-finite values in x={x.tolist()} or y={y.tolist()}")
    if np.any(x <= 0) or np.any(y <= 0):
        raise ValueError(f"power-law fit needs positive x and y, got x={x.tolist()} y={y.tolist()}")
    if np.unique(x).size < 2:
        raise ValueError(f"power-law fit needs at least 2 distinct x values, got {x.tolist()}")
    return x, y


def _linear_fit(u: np.ndarray, z: np.ndarray) -> tuple[float, float]:
    """Least squares z = alpha - b u; returns (alpha, b)."""
    design = np.stack([np.ones_like(u), -u], axis=1)
    (alpha, b), *_ = np.linalg.lstsq(design, z, rcond=None)
    return float(alpha), float(b)


def _log_model(theta: np.ndarray, u: np.ndarray) -> np.ndarray:
    log_a, b, c = theta
    return np.log(np.exp(log_a - b * u) + c)


def _sse(theta, u, log_y) -> float:
    r = log_y - _log_model(theta, u)
    return float(np.sum(r * r))


def _refine(theta: np.ndarray, u: np.ndarray, log_y: np.ndarray, c_max: float, iters: int = 200) -> np.ndarray:
    """Levenberg-Marquardt on (log a, b, c) with c clipped to [0, c_max]."""
    lam = 1e-3
    best = _sse(theta, u, log_y)
    for _ in range(iters):
        p = np.exp(theta[0] - theta[1] * u)
        denom = p + theta[2]
        jac = np.stack([p / denom, -u * p / denom, 1.0 / denom], axis=1)
        r = log_y - np.log(denom)
        jtj = jac.T @ jac
        step = np.linalg.solve(jtj + lam * np.diag(np.diag(jtj) + 1e-12), jac.T @ r)
        cand = theta + step
        cand[2] = np.clip(cand[2], 0.0, c_max)
        val = _sse(cand, u, log_y)
        if val < best:
            converged = best - val < 1e-14 * max(best, 1e-30)
            theta, best, lam = cand, val, lam * 0.3
            if converged:
                break
        else:
            lam *= 10.0
            if lam > 1e10:
                break
    return theta


def fit_power_law(x: Sequence[float], y: Sequence[float], offset: str = "auto", grid_size: int = 400) -> PowerLawFit:
    """Fits y = a x^-b + c. offset: "auto" (fit c when >= 4 points), "fit" or "zero"."""
    if offset not in ("auto", "fit", "zero"):
        raise ValueError(f"offset must be 'auto', 'fit' or 'zero', got {offset!r}")
    x, y = _check_xy(x, y)
    x_ref = float(np.exp(np.mean(np.log(x))))
    u, log_y = np.log(x / x_ref), np.log(y)
    fit_offset = offset == "fit" or (offset == "auto" and x.size >= 4)
    if fit_offset and x.size < 3:
        raise ValueError(f"fitting the offset c needs at least 3 points, got {x.size}")

    if not fit_offset:
        alpha, b = _linear_fit(u, log_y)
        theta = np.array([alpha, b, 0.0])
    else:
        c_max = float(np.min(y)) * (1.0 - 1e-6)
        best_theta, best_val = None, np.inf
        for c in np.linspace(0.0, c_max, grid_size):
            alpha, b = _linear_fit(u, np.log(y - c))
            theta = np.array([alpha, b, c])
            val = _sse(theta, u, log_y)
            if val < best_val:
                best_theta, best_val = theta, val
        theta = _refine(best_theta, u, log_y, c_max)

    rmse = float(np.sqrt(_sse(theta, u, log_y) / x.size))
    return PowerLawFit(
        a_norm=float(np.exp(theta[0])), b=float(theta[1]), c=float(theta[2]), x_ref=x_ref,
        fit_offset=fit_offset, n_points=int(x.size), rmse_log=rmse,
    )


def bootstrap_band(
    x: Sequence[float],
    y: Sequence[float],
    x_grid: Sequence[float],
    fit: PowerLawFit | None = None,
    num_samples: int = 500,
    level: float = 0.9,
    method: str = "residual",
    seed: int = 0,
) -> dict:
    """Bootstrap confidence band of the fitted curve on x_grid and an interval for b.

    "residual": keeps every x, adds resampled log-space residuals (inflated by
    sqrt(n / (n - p)) for the fitted degrees of freedom) to the fitted curve.
    "pairs": resamples whole points; draws with too few distinct x are redrawn.
    """
    if method not in ("residual", "pairs"):
        raise ValueError(f"bootstrap method must be 'residual' or 'pairs', got {method!r}")
    x, y = _check_xy(x, y)
    x_grid = np.asarray(x_grid, np.float64)
    fit = fit or fit_power_law(x, y, offset="auto")
    offset = "fit" if fit.fit_offset else "zero"
    n, p = x.size, fit.num_params
    rng = np.random.default_rng(seed)

    degenerate = n <= p
    curves, exponents = [], []
    if not degenerate:
        log_fitted = np.log(fit(x))
        resid = (np.log(y) - log_fitted) * np.sqrt(n / (n - p))
        attempts = 0
        while len(curves) < num_samples and attempts < 20 * num_samples:
            attempts += 1
            if method == "residual":
                xs, ys = x, np.exp(log_fitted + rng.choice(resid, size=n, replace=True))
            else:
                idx = rng.integers(0, n, size=n)
                xs, ys = x[idx], y[idx]
                if np.unique(xs).size < p:
                    continue
            try:
                boot = fit_power_law(xs, ys, offset=offset, grid_size=100)
            except (ValueError, np.linalg.LinAlgError):
                continue
            curves.append(boot(x_grid))
            exponents.append(boot.b)
    tail = (1.0 - level) / 2.0 * 100.0
    if curves:
        curves = np.asarray(curves)
        lo, hi = np.percentile(curves, [tail, 100.0 - tail], axis=0)
        b_lo, b_hi = np.percentile(exponents, [tail, 100.0 - tail])
    else:
        degenerate = True
        lo = hi = fit(x_grid)
        b_lo = b_hi = fit.b
    return dict(
        x=x_grid, lo=lo, hi=hi, level=level, method=method, num_samples=len(exponents),
        b_interval=(float(b_lo), float(b_hi)), degenerate=bool(degenerate),
    )


# --- isoFLOP analysis ---------------------------------------------------------


def fit_isoflop_parabola(params: Sequence[float], loss: Sequence[float]) -> dict:
    """At one compute budget: loss = k (log N - log N*)^2 + L*; returns N*, L* and k.

    `interior` is False when the minimum lies outside the sizes tried (or the
    parabola opens downwards): then N* is an extrapolation, not a measurement.
    """
    n, loss = _check_xy(params, loss)
    if np.unique(n).size < 3:
        raise ValueError(f"an isoFLOP parabola needs at least 3 distinct sizes, got {np.unique(n).tolist()}")
    log_n = np.log(n)
    k2, k1, k0 = np.polyfit(log_n, loss, 2)
    log_n_opt = -k1 / (2.0 * k2) if k2 > 0 else np.inf
    if not log_n.min() <= log_n_opt <= log_n.max():
        best = int(np.argmin(loss))  # Report the best size measured, flagged as such.
        return dict(n_opt=float(n[best]), loss_opt=float(loss[best]), curvature=float(k2), interior=False)
    return dict(
        n_opt=float(np.exp(log_n_opt)),
        loss_opt=float(k0 - k1 * k1 / (4.0 * k2)),
        curvature=float(k2),
        interior=True,
    )


def fit_allocation_exponent(budgets: Sequence[float], n_opt: Sequence[float]) -> dict:
    """N_opt = k C^a across budgets (Chinchilla's approach 2): returns a and k."""
    c, n = _check_xy(budgets, n_opt)
    alpha, neg_a = _linear_fit(np.log(c), np.log(n))
    return dict(exponent=float(-neg_a), coefficient=float(np.exp(alpha)), num_budgets=int(c.size))
