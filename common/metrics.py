"""Classification metrics from counts: sites send sufficient statistics, never per-row predictions.

Each site evaluates the global model on its own test split and sends two kinds of counts:

- its **confusion matrix** (k × k counts, rows the true class, columns the predicted one).
  Summed over sites it is exactly the confusion matrix of all sites' test rows together,
  and accuracy, balanced accuracy and macro F1 follow from it exactly;
- for a binary task, a **score histogram**: the predicted positive-class probability
  (class 1) of its test rows, counted over ``bins`` equal bins of [0, 1], separately for
  the rows whose true class is 0 and 1. Summed over sites, ROC AUC follows up to the
  binning error stated in :func:`roc_auc_from_histogram`.

Neither says which row had which score. A histogram of a small test split is close to the
multiset of its scores by true class (with 100 bins, to two decimals): what a site reveals
by answering an evaluation, and why a deployed site caps evaluations. 100 bins, not more:
finer bins would tighten ROC AUC's error bound but describe each row's score more closely.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

#: Bins of the positive-class score histogram a site sends for a binary task.
DEFAULT_SCORE_BINS = 100
#: MetricRecord key of the confusion matrix: k × k counts, row-major (row = true class).
CONFUSION_KEY = "confusion"
#: MetricRecord key of the score histogram: ``bins`` counts of the true-negative rows'
#: positive-class scores, then ``bins`` counts of the true-positive rows'.
SCORE_HISTOGRAM_KEY = "score-histogram"


@dataclass(frozen=True)
class SiteStatistics:
    """One site's (or the sum of several sites') evaluation counts."""

    confusion: np.ndarray  # (k, k) int64, rows true class, columns predicted class
    score_histogram: np.ndarray | None = None  # (2, bins) int64, binary tasks only

    @property
    def num_classes(self) -> int:
        return int(self.confusion.shape[0])

    @property
    def rows(self) -> int:
        return int(self.confusion.sum())

    def to_record(self) -> dict[str, list[int]]:
        """The counts as MetricRecord values (lists of ints)."""
        record = {CONFUSION_KEY: [int(v) for v in self.confusion.ravel()]}
        if self.score_histogram is not None:
            record[SCORE_HISTOGRAM_KEY] = [int(v) for v in self.score_histogram.ravel()]
        return record


def site_statistics(
    labels: np.ndarray,
    predictions: np.ndarray,
    *,
    num_classes: int,
    positive_scores: np.ndarray | None = None,
    bins: int = DEFAULT_SCORE_BINS,
) -> SiteStatistics:
    """Counts of one site's test rows: true ``labels`` against predicted classes, and, when
    ``positive_scores`` (class-1 probabilities) are given for a binary task, their histogram."""
    labels = np.asarray(labels, dtype=np.int64)
    predictions = np.asarray(predictions, dtype=np.int64)
    confusion = np.zeros((num_classes, num_classes), dtype=np.int64)
    np.add.at(confusion, (labels, predictions), 1)
    histogram = None
    if positive_scores is not None and num_classes == 2:
        scores = np.clip(np.asarray(positive_scores, dtype=np.float64), 0.0, 1.0)
        index = np.minimum((scores * bins).astype(np.int64), bins - 1)
        histogram = np.zeros((2, bins), dtype=np.int64)
        np.add.at(histogram, (labels, index), 1)
    return SiteStatistics(confusion, histogram)


def _counts(value: Any) -> np.ndarray | None:
    """A list of non-negative whole numbers as int64, else None."""
    if not isinstance(value, list | tuple) or not value:
        return None
    try:
        array = np.asarray(value, dtype=np.float64)
    except (TypeError, ValueError):
        return None
    if array.ndim != 1 or not np.all(np.isfinite(array)) or np.any(array < 0):
        return None
    if np.any(array != np.floor(array)):
        return None
    return array.astype(np.int64)


def statistics_from_metrics(
    metrics: Mapping[str, Any], *, test_rows: int | None = None
) -> SiteStatistics | None:
    """The counts in one evaluation reply's metrics, or None when absent or malformed (not a
    square matrix of counts, a histogram not 2 × bins, totals that disagree with each other
    or with ``test_rows``): a site's bad counts never enter the aggregate."""
    flat = _counts(metrics.get(CONFUSION_KEY))
    if flat is None:
        return None
    k = math.isqrt(len(flat))
    if k < 2 or k * k != len(flat):
        return None
    confusion = flat.reshape(k, k)
    if test_rows is not None and int(confusion.sum()) != test_rows:
        return None
    histogram = None
    if SCORE_HISTOGRAM_KEY in metrics:
        hist = _counts(metrics.get(SCORE_HISTOGRAM_KEY))
        if hist is None or k != 2 or len(hist) % 2:
            return None
        histogram = hist.reshape(2, -1)
        if not np.array_equal(histogram.sum(axis=1), confusion.sum(axis=1)):
            return None
    return SiteStatistics(confusion, histogram)


def combine(parts: Iterable[SiteStatistics]) -> SiteStatistics | None:
    """The sum of several sites' counts (None for none). Histograms are kept only when every
    part has one with the same bins; the parts must share the number of classes."""
    parts = list(parts)
    if not parts:
        return None
    k = parts[0].num_classes
    if any(p.num_classes != k for p in parts):
        raise ValueError("sites disagree on the number of classes")
    confusion = np.sum([p.confusion for p in parts], axis=0)
    histograms = [p.score_histogram for p in parts]
    histogram = None
    if all(h is not None for h in histograms):
        shapes = {h.shape for h in histograms if h is not None}
        if len(shapes) == 1:
            histogram = np.sum([h for h in histograms if h is not None], axis=0)
    return SiteStatistics(confusion, histogram)


def accuracy(confusion: np.ndarray) -> float | None:
    total = int(confusion.sum())
    return float(np.trace(confusion)) / total if total else None


def balanced_accuracy(confusion: np.ndarray) -> float | None:
    """Mean recall over the classes that occur among the true labels (scikit-learn's
    ``balanced_accuracy_score``)."""
    support = confusion.sum(axis=1)
    present = support > 0
    if not present.any():
        return None
    return float(np.mean(np.diag(confusion)[present] / support[present]))


def macro_f1(confusion: np.ndarray) -> float | None:
    """Unweighted mean F1 over the classes that occur as a true or a predicted label
    (scikit-learn's ``f1_score(average="macro")``, a class never predicted counting 0)."""
    tp = np.diag(confusion).astype(np.float64)
    fp = confusion.sum(axis=0) - tp
    fn = confusion.sum(axis=1) - tp
    denominator = 2 * tp + fp + fn
    present = denominator > 0
    if not present.any():
        return None
    return float(np.mean(2 * tp[present] / denominator[present]))


def roc_auc_from_histogram(histogram: np.ndarray) -> tuple[float | None, float]:
    """ROC AUC from binned positive-class scores, and its largest possible binning error.

    ``histogram[0]`` counts the true negatives' scores per bin, ``histogram[1]`` the true
    positives'. AUC is the probability that a random positive scores above a random
    negative, ties counting 1/2 (Hanley & McNeil, Radiology 1982). A pair in different bins
    is ordered exactly; a positive and a negative in the same bin count as a tie, 1/2, where
    their exact scores give 0, 1/2 or 1. So the result differs from the exact AUC
    (scikit-learn's ``roc_auc_score`` on the unbinned scores) by at most

        bound = (1/2) · Σ_b P_b · N_b / (P · N)

    (P_b, N_b the positives and negatives in bin b, P and N their totals), returned as the
    second value. None (and bound 0) when either class has no rows.
    """
    negatives, positives = histogram[0].astype(np.float64), histogram[1].astype(np.float64)
    n_neg, n_pos = negatives.sum(), positives.sum()
    if n_neg == 0 or n_pos == 0:
        return None, 0.0
    below = np.cumsum(negatives) - negatives  # negatives in strictly lower bins
    same_bin = float(np.dot(positives, negatives))
    auc = (float(np.dot(positives, below)) + 0.5 * same_bin) / (n_pos * n_neg)
    return auc, 0.5 * same_bin / (n_pos * n_neg)


def classification_metrics(stats: SiteStatistics) -> dict[str, Any]:
    """Accuracy, balanced accuracy, macro F1, ROC AUC (binary, with its binning error bound)
    and the confusion matrix, all from counts."""
    auc: float | None = None
    bound: float | None = None
    if stats.score_histogram is not None:
        auc, bound = roc_auc_from_histogram(stats.score_histogram)
        if auc is None:
            bound = None
    return {
        "accuracy": accuracy(stats.confusion),
        "balanced_accuracy": balanced_accuracy(stats.confusion),
        "macro_f1": macro_f1(stats.confusion),
        "roc_auc": auc,
        "roc_auc_error_bound": bound,
        "confusion": stats.confusion.tolist(),
    }
