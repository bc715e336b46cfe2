"""Proportions, means and their 95% confidence intervals."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

#: Two-sided 95% quantile of the standard normal distribution.
Z_95 = 1.959963984540054


def wilson_interval(successes: int, n: int, z: float = Z_95) -> tuple[float, float]:
    """Wilson score interval of a binomial proportion ``successes / n``.

    ``(p + z²/2n ± z·sqrt(p(1-p)/n + z²/4n²)) / (1 + z²/n)``; stays inside [0, 1] and is sensible
    at p = 0 or 1, where the normal approximation collapses to a point.
    """
    if n <= 0:
        raise ValueError(f"a proportion needs n >= 1, got n={n}")
    if not 0 <= successes <= n:
        raise ValueError(f"successes must lie in [0, n={n}], got {successes}")
    p = successes / n
    z2 = z * z
    centre = p + z2 / (2 * n)
    spread = z * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n))
    denominator = 1 + z2 / n
    return max(0.0, (centre - spread) / denominator), min(1.0, (centre + spread) / denominator)


@dataclass(frozen=True)
class Proportion:
    """``count`` successes out of ``n`` trials."""

    count: int
    n: int

    @property
    def value(self) -> float:
        return self.count / self.n

    def interval(self, z: float = Z_95) -> tuple[float, float]:
        """Wilson interval (see :func:`wilson_interval`)."""
        return wilson_interval(self.count, self.n, z)


def mean_interval(values: Sequence[float], z: float = Z_95) -> tuple[float, float, float]:
    """``(mean, low, high)``: the sample mean and its normal-approximation interval
    ``mean ± z·s/sqrt(n)`` (s: sample standard deviation; the interval is the point for n = 1)."""
    n = len(values)
    if n == 0:
        raise ValueError("the mean of no values is undefined")
    mean = math.fsum(values) / n
    if n == 1:
        return mean, mean, mean
    variance = math.fsum((v - mean) ** 2 for v in values) / (n - 1)
    half = z * math.sqrt(variance / n)
    return mean, mean - half, mean + half
