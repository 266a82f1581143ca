"""The mean of a metric over a run's edits and its 95% confidence interval, with the Student t quantile.

    mean = sum x_i / n,  s^2 = sum (x_i - mean)^2 / (n - 1)
    interval = mean +- t_{0.975, n-1} s / sqrt(n)          (the half-width is what the tables print as "ci95")

t_{0.975, nu} is found by bisection on the t distribution's CDF, integrated with Simpson's rule (no scipy):
12.706 for nu = 1, 2.228 for nu = 10, 1.960 as nu grows. With one value the interval is undefined (NaN). Values
that are not finite (PSNR of an untouched background is inf, a metric of an empty region NaN) are left out and
counted apart, so a mean is always over finite numbers.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np


def t_density(x: np.ndarray, nu: float) -> np.ndarray:
    """The Student t density with nu degrees of freedom."""
    c = math.exp(math.lgamma((nu + 1) / 2) - math.lgamma(nu / 2)) / math.sqrt(nu * math.pi)
    return c * (1 + x * x / nu) ** (-(nu + 1) / 2)


def t_cdf(t: float, nu: float, intervals: int = 4000) -> float:
    """P(T <= t) for t >= 0: 1/2 plus the density integrated over [0, t] (Simpson's rule)."""
    x = np.linspace(0.0, t, intervals + 1)
    w = np.ones(intervals + 1)
    w[1:-1:2], w[2:-1:2] = 4, 2
    return 0.5 + float((w * t_density(x, nu)).sum()) * t / (3 * intervals)


def t_quantile(p: float, nu: float) -> float:
    """The p-quantile of Student's t (p in [0.5, 1)), to about 1e-9."""
    lo, hi = 0.0, 1.0
    while t_cdf(hi, nu) < p:
        lo, hi = hi, hi * 2
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if t_cdf(mid, nu) < p else (lo, mid)
    return (lo + hi) / 2


@dataclass(frozen=True)
class Summary:
    """A metric over a group of edits."""
    mean: float          # over the finite values; NaN if none
    ci95: float          # half-width of the 95% interval of the mean; NaN with fewer than two finite values
    n: int               # finite values
    not_finite: int      # values left out (inf, NaN)

    def as_dict(self) -> dict:
        return {"mean": self.mean, "ci95": self.ci95, "n": self.n, "not_finite": self.not_finite}


def summarise(values: list[float]) -> Summary:
    x = np.array([v for v in values if math.isfinite(v)], dtype=np.float64)
    n, left_out = len(x), len(values) - len(x)
    if n == 0:
        return Summary(math.nan, math.nan, 0, left_out)
    if n == 1:
        return Summary(float(x[0]), math.nan, 1, left_out)
    half = t_quantile(0.975, n - 1) * float(x.std(ddof=1)) / math.sqrt(n)
    return Summary(float(x.mean()), half, n, left_out)
