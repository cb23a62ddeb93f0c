"""Intervals for reported numbers: `bootstrap_ci` and `paired_bootstrap_diff` over prompts (eval.json's ci95),
`t_interval` and `paired_t_diff` over seeds (`compare`). `llmstages.evals.metrics` re-exports all four."""

from __future__ import annotations

import math
from typing import Any, Callable

import numpy as np
from scipy import stats as scipy_stats


def _bootstrap_indices(n_items: int, n_boot: int, alpha: float, seed: int) -> np.ndarray:
  if n_items == 0:
    raise ValueError("bootstrap needs at least one value")
  if n_boot < 1:
    raise ValueError(f"n_boot must be >= 1, got {n_boot}")
  if not 0 < alpha < 1:
    raise ValueError(f"alpha must lie in (0, 1), got {alpha}")
  return np.random.default_rng(seed).integers(0, n_items, size=(n_boot, n_items))


def bootstrap_ci(values: Any, stat: Callable[[np.ndarray], Any] = np.mean, n_boot: int = 1000, alpha: float = 0.05,
                 seed: int = 0) -> tuple[float, float, float]:
  """(estimate, lo, hi): stat(values) and its percentile-bootstrap 1 - alpha interval (Efron & Tibshirani 1993).

  Items (rows of `values`, e.g. seeds or prompts) are resampled with replacement n_boot times; lo and hi are the
  alpha/2 and 1 - alpha/2 quantiles of the resampled statistic. Deterministic given `seed`.
  """
  values = np.asarray(values)
  idx = _bootstrap_indices(len(values), n_boot, alpha, seed)
  boots = np.array([stat(values[i]) for i in idx], dtype=np.float64)
  lo, hi = np.quantile(boots, [alpha / 2, 1 - alpha / 2])
  return float(stat(values)), float(lo), float(hi)


def paired_bootstrap_diff(a: Any, b: Any, stat: Callable[[np.ndarray], Any] = np.mean, n_boot: int = 1000,
                          alpha: float = 0.05, seed: int = 0) -> tuple[float, float, float]:
  """(estimate, lo, hi) of stat(a) - stat(b), resampling items jointly (paired bootstrap, Koehn 2004).

  a[i] and b[i] must be the same item (seed, prompt) under two settings; resampling pairs keeps their correlation,
  so the interval is far tighter than two independent intervals. docs/RESEARCH.md: a claim that one setting beats
  another needs this interval to exclude 0.
  """
  a, b = np.asarray(a), np.asarray(b)
  if a.shape[0] != b.shape[0]:
    raise ValueError(f"paired values need the same number of items: {a.shape[0]} vs {b.shape[0]}")
  idx = _bootstrap_indices(len(a), n_boot, alpha, seed)
  boots = np.array([stat(a[i]) - stat(b[i]) for i in idx], dtype=np.float64)
  lo, hi = np.quantile(boots, [alpha / 2, 1 - alpha / 2])
  return float(stat(a) - stat(b)), float(lo), float(hi)


def t_quantile(n: int, alpha: float = 0.05) -> float:
  """t_{1 - alpha/2, n-1}: a Student-t interval of n values is their mean -+ this many standard errors."""
  return float(scipy_stats.t.ppf(1.0 - alpha / 2.0, n - 1))


def t_interval(values: Any, alpha: float = 0.05) -> tuple[float, float, float]:
  """(mean, lo, hi): the Student-t 1 - alpha interval for the mean of independent values (e.g. one per seed),
  mean -+ t_{1 - alpha/2, n-1} * sd / sqrt(n) with the sample sd (ddof=1).

  Exact coverage for normal values at every n >= 2, where a percentile bootstrap over 3 seeds covers far less
  (its interval lies inside the range of the three values). With one value the bounds are nan; with no spread
  the interval is the point.
  """
  x = np.asarray(values, np.float64).reshape(-1)
  if len(x) == 0:
    raise ValueError("t_interval needs at least one value")
  if not 0 < alpha < 1:
    raise ValueError(f"alpha must lie in (0, 1), got {alpha}")
  mean = float(np.mean(x))
  if len(x) < 2:
    return mean, math.nan, math.nan
  half = t_quantile(len(x), alpha) * float(np.std(x, ddof=1)) / math.sqrt(len(x))
  return mean, mean - half, mean + half


def paired_t_diff(a: Any, b: Any, alpha: float = 0.05) -> tuple[float, float, float]:
  """(mean, lo, hi) of a - b: the paired Student-t interval, `t_interval` of the per-item differences a[i] - b[i]
  (items: seeds). Its false-claim rate (interval excludes 0 when a and b share one distribution) is alpha for
  normal differences at every n >= 2, and about alpha or below for symmetric heavier-tailed ones (simulated in
  tests/test_compare.py). A discrete metric whose differences are equal and nonzero on every seed has sd 0 and a
  point interval, a claim."""
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  if a.shape != b.shape:
    raise ValueError(f"paired values need the same shape: {a.shape} vs {b.shape}")
  return t_interval(a - b, alpha)
