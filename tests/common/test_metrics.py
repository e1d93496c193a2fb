"""Tests for common/metrics.py: metrics aggregated from the sites' counts equal scikit-learn's
computed over all sites' test rows together."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
from sklearn.metrics import (
    accuracy_score,
    balanced_accuracy_score,
    confusion_matrix,
    f1_score,
    roc_auc_score,
)

from fedvault.common.metrics import (
    CONFUSION_KEY,
    SCORE_HISTOGRAM_KEY,
    roc_auc_from_histogram,
    site_statistics,
    statistics_from_metrics,
)
from fedvault.common.report import classification_row

pytestmark = pytest.mark.unit


def split_into_sites(n: int, sites: int, rng: np.random.Generator) -> list[np.ndarray]:
    cuts = np.sort(rng.choice(np.arange(1, n), size=sites - 1, replace=False))
    return np.split(rng.permutation(n), cuts)


def site_replies(
    labels: np.ndarray,
    predictions: np.ndarray,
    scores: np.ndarray | None,
    *,
    num_classes: int,
    bins: int,
    parts: list[np.ndarray],
) -> dict[str, dict[str, Any]]:
    """What each site's evaluation reply carries (as the coordinator records it)."""
    replies = {}
    for i, rows in enumerate(parts):
        stats = site_statistics(
            labels[rows],
            predictions[rows],
            num_classes=num_classes,
            positive_scores=None if scores is None else scores[rows],
            bins=bins,
        )
        replies[f"site-{i + 1}"] = {"num-examples": float(len(rows)), **stats.to_record()}
    return replies


def test_binary_metrics_from_three_sites_counts_equal_sklearn_on_all_rows() -> None:
    # Prepare: random scores, split unevenly across 3 sites
    rng = np.random.default_rng(7)
    n = 600
    labels = rng.integers(0, 2, n)
    scores = np.clip(rng.normal(0.35 + 0.3 * labels, 0.2), 0, 1)
    predictions = (scores >= 0.5).astype(int)
    parts = split_into_sites(n, 3, rng)

    # Execute: the sites' counts, summed at the coordinator
    evals = site_replies(labels, predictions, scores, num_classes=2, bins=1000, parts=parts)
    row = classification_row(evals)

    # Assert
    assert row["classification_sites"] == ["site-1", "site-2", "site-3"]
    assert row["confusion"] == confusion_matrix(labels, predictions).tolist()
    assert row["accuracy"] == pytest.approx(accuracy_score(labels, predictions))
    assert row["balanced_accuracy"] == pytest.approx(balanced_accuracy_score(labels, predictions))
    assert row["macro_f1"] == pytest.approx(f1_score(labels, predictions, average="macro"))
    exact = roc_auc_score(labels, scores)
    assert 0 < row["roc_auc_error_bound"] < 0.01
    assert abs(row["roc_auc"] - exact) <= row["roc_auc_error_bound"] + 1e-12


def test_multiclass_metrics_equal_sklearn_with_unseen_and_unpredicted_classes() -> None:
    # Prepare: 5 classes; class 4 never occurs, class 3 is never predicted
    rng = np.random.default_rng(11)
    n = 500
    labels = rng.integers(0, 4, n)
    noisy = np.where(rng.random(n) < 0.6, labels, rng.integers(0, 3, n))
    predictions = np.where(noisy == 3, 2, noisy)
    parts = split_into_sites(n, 3, rng)

    # Execute
    row = classification_row(
        site_replies(labels, predictions, None, num_classes=5, bins=1000, parts=parts)
    )

    # Assert
    expected = confusion_matrix(labels, predictions, labels=range(5))
    assert row["confusion"] == expected.tolist()
    assert row["accuracy"] == pytest.approx(accuracy_score(labels, predictions))
    assert row["balanced_accuracy"] == pytest.approx(balanced_accuracy_score(labels, predictions))
    assert row["macro_f1"] == pytest.approx(
        f1_score(labels, predictions, average="macro", zero_division=0)
    )
    assert row["roc_auc"] is None  # binary tasks only


@pytest.mark.parametrize("bins", [5, 20, 100])
def test_auc_from_coarse_histograms_stays_within_the_stated_bound(bins: int) -> None:
    rng = np.random.default_rng(bins)
    labels = rng.integers(0, 2, 400)
    scores = rng.beta(2 + 2 * labels, 3)
    stats = site_statistics(labels, scores > 0.5, num_classes=2, positive_scores=scores, bins=bins)
    assert stats.score_histogram is not None

    auc, bound = roc_auc_from_histogram(stats.score_histogram)

    assert auc is not None
    assert bound > 0
    assert abs(auc - roc_auc_score(labels, scores)) <= bound + 1e-12


def test_auc_is_exact_when_no_positive_shares_a_bin_with_a_negative() -> None:
    labels = np.array([0, 0, 1, 0, 1, 1])
    scores = np.array([0.05, 0.15, 0.25, 0.55, 0.75, 0.95])  # one row per bin of 10
    stats = site_statistics(labels, scores > 0.5, num_classes=2, positive_scores=scores, bins=10)
    assert stats.score_histogram is not None

    auc, bound = roc_auc_from_histogram(stats.score_histogram)

    assert bound == 0.0
    assert auc == pytest.approx(roc_auc_score(labels, scores))


def good_reply() -> dict[str, Any]:
    return {
        "num-examples": 4.0,
        CONFUSION_KEY: [2.0, 0.0, 1.0, 1.0],
        SCORE_HISTOGRAM_KEY: [1.0, 1.0, 0.0, 0.0, 1.0, 1.0],
    }


@pytest.mark.parametrize(
    "change",
    [
        {CONFUSION_KEY: [2.0, 0.0, -1.0, 3.0]},  # a negative count
        {CONFUSION_KEY: [2.0, 0.0, 1.5, 0.5]},  # not whole numbers
        {CONFUSION_KEY: [2.0, 0.0, 1.0]},  # not square
        {CONFUSION_KEY: [2.0, 0.0, 1.0, 9.0]},  # more rows than the site tested
        {CONFUSION_KEY: [2.0, 0.0, 1.0, float("nan")]},
        {SCORE_HISTOGRAM_KEY: [5.0, 1.0, 0.0, 0.0, 1.0, 1.0]},  # disagrees with the matrix
        {SCORE_HISTOGRAM_KEY: [1.0, 1.0, 0.0, 1.0, 1.0]},  # not 2 × bins
        {CONFUSION_KEY: 4.0},  # not a list
    ],
)
def test_a_site_with_malformed_counts_is_left_out_of_the_aggregate(
    change: dict[str, Any],
) -> None:
    honest = good_reply()
    bad = {**good_reply(), **change}

    row = classification_row({"honest": honest, "odd": bad})

    assert statistics_from_metrics(bad, test_rows=4) is None
    assert statistics_from_metrics(honest, test_rows=4) is not None
    assert row["classification_sites"] == ["honest"]
    assert row["confusion"] == [[2, 0], [1, 1]]


def test_no_counts_gives_no_classification_metrics() -> None:
    row = classification_row({"old-site": {"num-examples": 4.0, "accuracy": 0.5}})

    assert row["confusion"] is None and row["macro_f1"] is None
    assert row["classification_sites"] == []
