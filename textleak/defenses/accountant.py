"""RDP accountant for the sampled Gaussian mechanism (Mironov, Talwar & Zhang 2019), as DP-SGD uses it.

Each DP-SGD step samples every example with probability ``q`` and adds Gaussian noise of ``sigma`` times the
clipping norm. Its Renyi-DP at order alpha is computed exactly (integer alpha: a binomial sum; fractional alpha:
the two-sided series), composed over the steps by adding, and converted to (epsilon, delta) with the tighter
conversion of Balle et al. 2020 (the one Opacus and TF Privacy use), minimised over the orders.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
from scipy import special

DEFAULT_ORDERS: tuple[float, ...] = tuple([1 + x / 10.0 for x in range(1, 100)] + list(range(12, 64)))


def _log_add(a: float, b: float) -> float:
    low, high = min(a, b), max(a, b)
    return high if low == -math.inf else math.log1p(math.exp(low - high)) + high


def _log_sub(a: float, b: float) -> float:
    """log(exp(a) - exp(b)) for a >= b."""
    if b == -math.inf:
        return a
    if a <= b:
        return -math.inf
    return math.log(math.expm1(a - b)) + b


def _log_erfc(x: float) -> float:
    return math.log(2) + float(special.log_ndtr(-x * math.sqrt(2)))


def _log_a_int(q: float, sigma: float, alpha: int) -> float:
    log_a = -math.inf
    for i in range(alpha + 1):
        log_coef = math.log(special.binom(alpha, i)) + i * math.log(q) + (alpha - i) * math.log(1 - q)
        log_a = _log_add(log_a, log_coef + (i * i - i) / (2 * sigma**2))
    return log_a


def _log_a_frac(q: float, sigma: float, alpha: float) -> float:
    log_a0, log_a1 = -math.inf, -math.inf
    z0 = sigma**2 * math.log(1 / q - 1) + 0.5
    i = 0
    while True:
        coef = special.binom(alpha, i)
        log_coef = math.log(abs(coef))
        j = alpha - i
        log_t0 = log_coef + i * math.log(q) + j * math.log(1 - q)
        log_t1 = log_coef + j * math.log(q) + i * math.log(1 - q)
        log_e0 = math.log(0.5) + _log_erfc((i - z0) / (math.sqrt(2) * sigma))
        log_e1 = math.log(0.5) + _log_erfc((z0 - j) / (math.sqrt(2) * sigma))
        log_s0 = log_t0 + (i * i - i) / (2 * sigma**2) + log_e0
        log_s1 = log_t1 + (j * j - j) / (2 * sigma**2) + log_e1
        if coef > 0:
            log_a0, log_a1 = _log_add(log_a0, log_s0), _log_add(log_a1, log_s1)
        else:
            log_a0, log_a1 = _log_sub(log_a0, log_s0), _log_sub(log_a1, log_s1)
        i += 1
        if max(log_s0, log_s1) < -30:
            return _log_add(log_a0, log_a1)


def sampled_gaussian_rdp(q: float, sigma: float, alpha: float) -> float:
    """Renyi-DP of one step of the sampled Gaussian mechanism at order ``alpha`` > 1."""
    if q == 0:
        return 0.0
    if sigma == 0:
        return math.inf
    if q == 1.0:
        return alpha / (2 * sigma**2)
    log_a = _log_a_int(q, sigma, int(alpha)) if float(alpha).is_integer() else _log_a_frac(q, sigma, alpha)
    return log_a / (alpha - 1)


def dp_epsilon(
    *, sample_rate: float, sigma: float, steps: int, delta: float, orders: Sequence[float] = DEFAULT_ORDERS
) -> tuple[float, float]:
    """(epsilon, best order) of ``steps`` DP-SGD steps at ``sample_rate`` and noise multiplier ``sigma``."""
    if not 0 <= sample_rate <= 1 or sigma < 0 or steps < 0 or not 0 < delta < 1:
        raise ValueError(
            f"accountant needs sample_rate in [0, 1], sigma >= 0, steps >= 0 and delta in (0, 1); got "
            f"sample_rate={sample_rate}, sigma={sigma}, steps={steps}, delta={delta}"
        )
    alphas = np.asarray(orders, dtype=float)
    rdp = np.array([steps * sampled_gaussian_rdp(sample_rate, sigma, float(a)) for a in alphas])
    with np.errstate(invalid="ignore"):
        eps = rdp - (math.log(delta) + np.log(alphas)) / (alphas - 1) + np.log((alphas - 1) / alphas)
    if np.isnan(eps).all():
        return math.inf, math.nan
    best = int(np.nanargmin(eps))
    return max(float(eps[best]), 0.0), float(alphas[best])
