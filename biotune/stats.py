"""Statistics of a multi-seed comparison: a mean with its interval per method, and paired
differences between methods measured on the same cells (dataset and seed).

Following rliable's advice for a handful of runs, every number comes with an interval: Student's t
below ``BOOTSTRAP_FROM`` values (a bootstrap of 2-4 values only resamples a few points), a
percentile bootstrap from there on (scipy.stats.bootstrap). Pairs are compared as autorank does
for two populations of paired samples: the Wilcoxon signed-rank test (scipy.stats.wilcoxon), with
wins, ties and losses beside it. With n paired cells its two-sided p-value cannot fall below
2 / 2**n (0.25 for three cells, 0.0625 for five): a reader must see n.
"""
from __future__ import annotations

import numpy as np
import pandas as pd
from scipy import stats

CONFIDENCE = 0.95
BOOTSTRAP_FROM = 5  # values; below, Student's t
RESAMPLES = 10_000
SUMMARY_COLUMNS = ["dataset", "method", "n", "mean", "std", "ci_low", "ci_high", "interval"]
PAIRED_COLUMNS = ["dataset", "method", "reference", "n", "mean_diff", "ci_low", "ci_high", "interval",
                  "wins", "ties", "losses", "p_value"]
ALL = "all"  # the dataset name of a comparison over every cell


def interval(values, seed: int = 0) -> tuple[float, float, str]:
    """(low, high, how) of a 95% interval for the mean of ``values``."""
    values = np.asarray(values, dtype=float)
    n, mean = len(values), float(np.mean(values)) if len(values) else float("nan")
    if n < 2:
        return float("nan"), float("nan"), "none (one value)"
    if np.ptp(values) == 0:  # every value equal: no spread to estimate
        return mean, mean, "none (equal values)"
    if n < BOOTSTRAP_FROM:
        low, high = stats.t.interval(CONFIDENCE, n - 1, loc=mean, scale=stats.sem(values))
        return float(low), float(high), "Student t"
    result = stats.bootstrap((values,), np.mean, confidence_level=CONFIDENCE, n_resamples=RESAMPLES,
                             method="percentile", random_state=seed)
    return float(result.confidence_interval.low), float(result.confidence_interval.high), "bootstrap percentile"


def summarize(cells: pd.DataFrame, value: str) -> pd.DataFrame:
    """Per dataset and method of ``cells`` (columns dataset, method, seed, ``value``): n, mean,
    std and the 95% interval of the mean."""
    rows = []
    for (dataset, method), group in cells.dropna(subset=[value]).groupby(["dataset", "method"], sort=False):
        low, high, how = interval(group[value])
        rows.append({"dataset": dataset, "method": method, "n": len(group), "mean": group[value].mean(),
                     "std": group[value].std(ddof=1), "ci_low": low, "ci_high": high, "interval": how})
    return pd.DataFrame(rows, columns=SUMMARY_COLUMNS)


def paired(cells: pd.DataFrame, value: str, references: list[str]) -> pd.DataFrame:
    """Every method against each reference on the cells both have (same dataset and seed), per
    dataset and over all cells: the mean difference (method - reference) with its interval,
    wins / ties / losses and the Wilcoxon signed-rank p-value."""
    wide = cells.dropna(subset=[value]).pivot_table(index=["dataset", "seed"], columns="method", values=value)
    rows = []
    for reference in references:
        if reference not in wide.columns:
            continue
        for method in wide.columns.drop(reference):
            both = wide[[method, reference]].dropna()
            for dataset, part in [*both.groupby(level="dataset", sort=False), (ALL, both)]:
                rows.append({"dataset": dataset, "method": method, "reference": reference,
                             **compare(part[method].to_numpy(), part[reference].to_numpy())})
    return pd.DataFrame(rows, columns=PAIRED_COLUMNS)


def compare(values: np.ndarray, reference: np.ndarray) -> dict:
    """The paired comparison of two equally long arrays of matched values."""
    # rounded: differences equal in exact arithmetic (0.9 - 0.85, 0.8 - 0.75) are ties for the ranks
    diff = np.round(np.asarray(values, float) - np.asarray(reference, float), 12)
    low, high, how = interval(diff)
    nonzero = diff[diff != 0]
    p_value = float(stats.wilcoxon(nonzero).pvalue) if len(nonzero) else 1.0  # all ties: no evidence either way
    return {"n": len(diff), "mean_diff": float(diff.mean()) if len(diff) else float("nan"), "ci_low": low,
            "ci_high": high, "interval": how, "wins": int((diff > 0).sum()), "ties": int((diff == 0).sum()),
            "losses": int((diff < 0).sum()), "p_value": p_value}
