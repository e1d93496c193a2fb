"""Splitting a dataset into sites, and each site into its own scaled train/test sets."""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from fedvault.common.data import Dataset
from fedvault.common.errors import ConfigError, DataError

logger = logging.getLogger(__name__)

DIRICHLET_MAX_TRIES = 100
IMAGE_MEAN = 0.5
IMAGE_STD = 0.5
KINDS = ("table", "image")

IndexList = list[npt.NDArray[np.int64]]


def _split_iid(
    labels: npt.NDArray[Any],
    num_sites: int,
    alpha: float,
    rng: np.random.Generator,
    min_rows_per_site: int,
) -> IndexList:
    """Shuffle all rows and cut them into num_sites near-equal parts."""
    return list(np.array_split(rng.permutation(len(labels)), num_sites))


def _split_dirichlet(
    labels: npt.NDArray[Any],
    num_sites: int,
    alpha: float,
    rng: np.random.Generator,
    min_rows_per_site: int,
) -> IndexList:
    """Label skew: each class is spread over the sites in Dir(alpha) proportions.

    The usual non-IID benchmark split (Hsu, Qi & Brown 2019, "Measuring the Effects of
    Non-Identical Data Distribution for Federated Visual Classification"); draws are
    repeated until every site holds at least ``min_rows_per_site`` rows.
    """
    class_rows = [np.flatnonzero(labels == value) for value in np.unique(labels)]
    for _ in range(DIRICHLET_MAX_TRIES):
        sites: list[list[npt.NDArray[np.int64]]] = [[] for _ in range(num_sites)]
        for rows in class_rows:
            shuffled = rng.permutation(rows)
            shares = rng.dirichlet(np.full(num_sites, alpha))
            if not np.all(np.isfinite(shares)):
                continue
            cuts = (np.cumsum(shares)[:-1] * len(shuffled)).astype(np.int64)
            for site, part in zip(sites, np.split(shuffled, cuts), strict=True):
                site.append(part)
        parts = [np.concatenate(site) if site else np.empty(0, np.int64) for site in sites]
        if sum(len(p) for p in parts) == len(labels) and (
            min(len(p) for p in parts) >= min_rows_per_site
        ):
            return parts
    raise DataError(
        f"dirichlet split of {len(labels)} rows into {num_sites} sites with alpha={alpha} "
        f"left a site with fewer than {min_rows_per_site} rows in {DIRICHLET_MAX_TRIES} tries; "
        "raise alpha, use fewer sites or lower min_rows_per_site",
        hint=f"Raise --alpha above {alpha:g} (less label skew) or use fewer --sites; "
        f"{len(labels) // min_rows_per_site} sites of {min_rows_per_site} rows fit in "
        f"{len(labels)} rows at best.",
    )


_Splitter = Callable[[npt.NDArray[Any], int, float, np.random.Generator, int], IndexList]
_METHODS: dict[str, _Splitter] = {
    "iid": _split_iid,
    "dirichlet": _split_dirichlet,
}
PARTITION_METHODS: tuple[str, ...] = tuple(_METHODS)


def partition_indices(
    labels: np.ndarray,
    num_sites: int,
    *,
    method: str = "iid",
    alpha: float = 0.5,
    seed: int = 0,
    min_rows_per_site: int = 10,
) -> list[npt.NDArray[np.int64]]:
    """Split row indices 0..n-1 into one sorted int64 array per site.

    Together the arrays hold every row exactly once. ``method`` is "iid" (shuffled
    near-equal parts) or "dirichlet" (label skew; smaller ``alpha`` means more skew).
    The same arguments always give the same split.
    """
    splitter = _METHODS.get(method)
    if splitter is None:
        valid = ", ".join(sorted(_METHODS))
        raise ConfigError(f"unknown partition method {method!r}; choose one of: {valid}")
    if num_sites < 1:
        raise ConfigError(f"num_sites must be >= 1, got {num_sites}")
    if not alpha > 0:
        raise ConfigError(f"alpha must be > 0, got {alpha}")
    if not math.isfinite(alpha):
        raise ConfigError(f"alpha must be a finite number, got {alpha}")
    if min_rows_per_site < 1:
        raise ConfigError(f"min_rows_per_site must be >= 1, got {min_rows_per_site}")
    labels = np.asarray(labels)
    if labels.ndim != 1:
        raise DataError(f"labels must be one-dimensional, got shape {labels.shape}")
    if len(labels) < min_rows_per_site:  # not even one site: fewer sites cannot help
        raise DataError(
            f"cannot split {len(labels)} rows into sites of at least {min_rows_per_site} rows "
            "each: the dataset is too small for even one site",
            hint=f"Use a dataset of at least {min_rows_per_site} rows per site.",
        )
    if num_sites * min_rows_per_site > len(labels):
        raise DataError(
            f"cannot split {len(labels)} rows into {num_sites} sites of at least "
            f"{min_rows_per_site} rows each; use fewer sites",
            hint=f"Use at most {len(labels) // min_rows_per_site} sites (--sites) for "
            f"{len(labels)} rows, or a dataset with {num_sites * min_rows_per_site} rows or "
            "more.",
        )
    rng = np.random.default_rng(seed)
    parts = splitter(labels, num_sites, alpha, rng, min_rows_per_site)
    result = [np.sort(part).astype(np.int64) for part in parts]
    logger.info(
        "partitioned %d rows into %d sites (%s): sizes %s",
        len(labels), num_sites, method, [len(part) for part in result],
    )  # fmt: skip
    return result


@dataclass(frozen=True, eq=False)
class SiteData:
    """One site's own train and test rows, scaled with statistics of its train rows."""

    train_x: npt.NDArray[np.float32]
    train_y: npt.NDArray[np.int64]
    test_x: npt.NDArray[np.float32]
    test_y: npt.NDArray[np.int64]
    num_classes: int
    kind: str

    @property
    def feature_shape(self) -> tuple[int, ...]:
        """Shape of one row: (d,) for tables, (C, H, W) for images."""
        return tuple(int(size) for size in self.train_x.shape[1:])


def make_site_data(
    features: np.ndarray,
    labels: np.ndarray,
    *,
    num_classes: int,
    kind: str,
    test_fraction: float = 0.2,
    seed: int = 0,
) -> SiteData:
    """Split one site's rows into train/test and scale both with train-only statistics.

    The split is stratified when every class has at least 2 rows. Tables are
    standardised with the train rows' mean and std (std 0 becomes 1); images are
    divided by 255 and normalised with the fixed mean 0.5 and std 0.5.
    """
    if not 0 < test_fraction < 1:
        raise ConfigError(f"test_fraction must be in (0, 1), got {test_fraction}")
    if kind not in KINDS:
        raise ConfigError(f"kind must be one of: {', '.join(KINDS)}; got {kind!r}")
    x = np.asarray(features)
    y = np.asarray(labels).astype(np.int64)
    if y.ndim != 1 or len(x) != len(y):
        raise DataError(f"need one label per row, got {len(x)} rows and labels {y.shape}")
    if len(y) < 2:
        raise DataError(f"a site needs at least 2 rows for train and test, got {len(y)}")
    if y.min() < 0 or y.max() >= num_classes:
        raise DataError(f"labels must be in 0..{num_classes - 1}, found {y.min()}..{y.max()}")
    if kind == "table" and x.ndim != 2:
        raise DataError(f"table features must be (rows, columns), got shape {x.shape}")
    if not np.all(np.isfinite(x)):
        raise DataError("features contain NaN or infinite values")
    train_rows, test_rows = _split_rows(y, test_fraction, seed)
    train_x, test_x = _scale(x[train_rows], x[test_rows], kind)
    return SiteData(
        train_x=train_x,
        train_y=y[train_rows],
        test_x=test_x,
        test_y=y[test_rows],
        num_classes=num_classes,
        kind=kind,
    )


def train_rows_for(rows: int, test_fraction: float) -> int:
    """How many of a site's ``rows`` ``make_site_data`` keeps for training (the rest test)."""
    return rows - min(max(1, round(rows * test_fraction)), rows - 1)


def check_delta_fits(delta: float, train_rows: Mapping[str, int]) -> None:
    """Refuse a δ that is not below 1 / the training rows of every site (DataError).

    A δ of 1/n or more allows a mechanism that publishes one of the n rows outright, so the
    site with the most rows binds; each site (common/site_privacy.py) would refuse such a run,
    so it is refused here before anything starts.
    """
    over = sorted(
        ((n, name) for name, n in train_rows.items() if not delta < 1 / n),
        key=lambda item: (-item[0], item[1]),
    )
    if not over:
        return
    most = over[0][0]
    if len(over) == 1:
        where = f"site {over[0][1]}'s {most} training rows"
    else:
        listed = ", ".join(f"{name}: {n}" for n, name in over[:5])
        more = f", {len(over) - 5} more" if len(over) > 5 else ""
        where = f"the training rows of {len(over)} sites ({listed}{more})"
    raise DataError(
        f"δ = {delta:g} is too large for {where}: it must be below 1/{most} = {1 / most:.3g}",
        hint="A δ of 1/rows or more would allow publishing a row outright: use a smaller "
        "--delta (or target-delta in [privacy]), e.g. 1e-5.",
    )


def _split_rows(
    labels: npt.NDArray[np.int64], test_fraction: float, seed: int
) -> tuple[npt.NDArray[np.intp], npt.NDArray[np.intp]]:
    n = len(labels)
    num_test = n - train_rows_for(n, test_fraction)
    counts = np.bincount(labels)
    num_present = int(np.count_nonzero(counts))
    stratify = (
        labels
        if counts[counts > 0].min() >= 2 and min(num_test, n - num_test) >= num_present
        else None
    )
    # scikit-learn (a second to import) only here: `fedvault simulate`'s data check
    # partitions rows without it.
    from sklearn.model_selection import train_test_split

    random_state = int(np.random.default_rng(seed).integers(2**31 - 1))
    train_rows, test_rows = train_test_split(
        np.arange(n), test_size=num_test, random_state=random_state, stratify=stratify
    )
    return np.sort(train_rows), np.sort(test_rows)


def _scale(
    train: npt.NDArray[Any], test: npt.NDArray[Any], kind: str
) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.float32]]:
    """Tables: standardise with train mean/std. Images: /255, then fixed mean/std."""
    if kind == "image":
        return (
            ((train / 255.0 - IMAGE_MEAN) / IMAGE_STD).astype(np.float32),
            ((test / 255.0 - IMAGE_MEAN) / IMAGE_STD).astype(np.float32),
        )
    as_float = train.astype(np.float64)
    mean = as_float.mean(axis=0)
    std = as_float.std(axis=0)
    std[(std == 0) | (np.ptp(as_float, axis=0) == 0)] = 1.0
    return (
        ((as_float - mean) / std).astype(np.float32),
        ((test.astype(np.float64) - mean) / std).astype(np.float32),
    )


def site_data_for(
    dataset: Dataset,
    site_index: int,
    num_sites: int,
    *,
    method: str,
    alpha: float,
    seed: int,
    test_fraction: float,
) -> SiteData:
    """Take site ``site_index``'s partition of ``dataset`` and make its train/test sets.

    Every simulated site calls this with the same arguments but its own index, so all
    sites agree on one partition without exchanging data.
    """
    if not 0 <= site_index < num_sites:
        raise ConfigError(f"site_index must be in 0..{num_sites - 1}, got {site_index}")
    rows = partition_indices(dataset.labels, num_sites, method=method, alpha=alpha, seed=seed)
    site = rows[site_index]
    logger.info("site %d of %d holds %d rows", site_index, num_sites, len(site))
    return make_site_data(
        dataset.features[site],
        dataset.labels[site],
        num_classes=dataset.num_classes,
        kind=dataset.kind,
        test_fraction=test_fraction,
        seed=seed + site_index,
    )
