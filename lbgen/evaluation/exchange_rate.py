"""The exchange rate of synthetic vs real images (closed-set generative augmentation, seed 001).

Measured: for a base set of ``n_base`` real images per class, accuracy after adding ``n_real_added`` real images or
``n_syn`` synthetic ones. Each synthetic point is mapped to the number of real images that give the same accuracy
(interpolating the real curve), and the authors' law ``n_syn / n_base = c1 ** (n_base / k) *
(c2 ** (n_real_added / n_base) - 1)`` is fitted for c1, c2 with confidence intervals.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import optimize, stats


def equivalent_real(real_added: np.ndarray, real_accuracy: np.ndarray, accuracy: float) -> float | None:
    """Real images to add that reach ``accuracy`` on the (increasing) real curve; None outside its range."""
    order = np.argsort(real_added)
    x, y = np.asarray(real_added, float)[order], np.maximum.accumulate(np.asarray(real_accuracy, float)[order])
    if accuracy < y[0] or accuracy > y[-1]:
        return None
    return float(np.interp(accuracy, y, x))


def law(n_base_real_added: np.ndarray, log_c1: float, log_c2: float, k: float) -> np.ndarray:
    """``n_syn / n_base`` predicted for columns (n_base, n_real_added)."""
    n_base, added = n_base_real_added
    return np.exp(log_c1 * n_base / k) * (np.exp(log_c2 * added / n_base) - 1)


@dataclass
class ExchangeRateFit:
    """c1, c2 with 95% confidence intervals (from the fit's covariance, in log space), and the points used."""

    c1: float
    c1_ci: tuple[float, float]
    c2: float
    c2_ci: tuple[float, float]
    points: list[tuple[float, float, float]]  # (n_base, n_real_added equivalent, n_syn)


def fit_exchange_rate(points: list[tuple[float, float, float]], k: float) -> ExchangeRateFit:
    """Fit the law to (n_base, n_real_added, n_syn) points; ``k`` is the number of classes."""
    data = np.asarray(points, dtype=np.float64)
    if len(data) < 3:
        raise ValueError(f"The exchange-rate fit needs at least 3 points, got {len(data)}.")
    if (data[:, 1] <= 0).any() or (data[:, 0] <= 0).any():
        raise ValueError("n_base and n_real_added must be positive for the fit.")
    xs, ratio = data[:, :2].T, data[:, 2] / data[:, 0]
    # fit in log space: the ratios span orders of magnitude
    def log_law(x, a, b):
        return np.log(np.maximum(law(x, a, b, k), 1e-12))

    (a, b), cov = optimize.curve_fit(log_law, xs, np.log(ratio), p0=(0.0, 1.0), maxfev=20000)
    dof = max(len(data) - 2, 1)
    t = stats.t.ppf(0.975, dof)
    sa, sb = np.sqrt(np.clip(np.diag(cov), 0, None)) if np.isfinite(cov).all() else (np.inf, np.inf)
    return ExchangeRateFit(c1=float(np.exp(a)), c1_ci=(float(np.exp(a - t * sa)), float(np.exp(a + t * sa))),
                           c2=float(np.exp(b)), c2_ci=(float(np.exp(b - t * sb)), float(np.exp(b + t * sb))),
                           points=[tuple(map(float, p)) for p in data])


def exchange_points(n_base: float, real_added: list[float], real_accuracy: list[float], syn_added: list[float],
                    syn_accuracy: list[float]) -> list[tuple[float, float, float]]:
    """(n_base, equivalent real images, n_syn) for every synthetic point inside the real curve's range."""
    out = []
    for n_syn, acc in zip(syn_added, syn_accuracy, strict=True):
        equal = equivalent_real(np.asarray(real_added), np.asarray(real_accuracy), acc)
        if equal is not None and equal > 0 and n_syn > 0:
            out.append((float(n_base), equal, float(n_syn)))
    return out
