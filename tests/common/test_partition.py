"""Tests for common/partition.py: site partitions, per-site train/test splits and scaling."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fedvault.common.data import Dataset
from fedvault.common.errors import ConfigError, DataError
from fedvault.common.partition import (
    PARTITION_METHODS,
    check_delta_fits,
    make_site_data,
    partition_indices,
    site_data_for,
    train_rows_for,
)

pytestmark = pytest.mark.unit


def balanced_labels(num_rows: int, num_classes: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).permutation(np.arange(num_rows) % num_classes)


def assert_is_partition(parts: list[np.ndarray], num_rows: int) -> None:
    for part in parts:
        assert part.dtype == np.int64
        assert np.all(np.diff(part) > 0), "indices must be sorted and unique"
    joined = np.concatenate(parts)
    assert len(joined) == num_rows, "every row exactly once"
    assert np.array_equal(np.sort(joined), np.arange(num_rows))


def mean_label_skew(labels: np.ndarray, parts: list[np.ndarray], num_classes: int) -> float:
    """Mean total-variation distance between each site's label mix and the global one."""
    overall = np.bincount(labels, minlength=num_classes) / len(labels)
    distances = [
        0.5 * np.abs(np.bincount(labels[p], minlength=num_classes) / len(p) - overall).sum()
        for p in parts
    ]
    return float(np.mean(distances))


def table_dataset(num_rows: int = 400, seed: int = 0) -> Dataset:
    rng = np.random.default_rng(seed)
    labels = balanced_labels(num_rows, 3, seed)
    features = rng.normal(0, 1, (num_rows, 4)) + labels[:, np.newaxis] * 10.0
    return Dataset(
        name="toy",
        features=features.astype(np.float32),
        labels=labels.astype(np.int64),
        num_classes=3,
        kind="table",
        class_names=("a", "b", "c"),
    )


# --- partition_indices ---------------------------------------------------------------


def test_methods_are_listed_in_the_registry() -> None:
    assert set(PARTITION_METHODS) == {"iid", "dirichlet"}


def test_iid_split_is_complete_disjoint_and_near_equal() -> None:
    labels = balanced_labels(103, 3)

    parts = partition_indices(labels, 4, method="iid", seed=1)

    assert_is_partition(parts, 103)
    assert sorted(len(p) for p in parts) == [25, 26, 26, 26]


@settings(max_examples=60, deadline=None)
@given(
    method=st.sampled_from(["iid", "dirichlet"]),
    num_rows=st.integers(1, 120),
    num_classes=st.integers(1, 5),
    num_sites=st.integers(1, 6),
    alpha=st.floats(0.05, 10.0),
    seed=st.integers(0, 2**16),
    min_rows=st.integers(1, 4),
)
def test_every_split_is_complete_and_disjoint(
    method: str,
    num_rows: int,
    num_classes: int,
    num_sites: int,
    alpha: float,
    seed: int,
    min_rows: int,
) -> None:
    labels = balanced_labels(num_rows, num_classes, seed)

    def split() -> list[np.ndarray]:
        return partition_indices(
            labels, num_sites, method=method, alpha=alpha, seed=seed, min_rows_per_site=min_rows
        )

    if min_rows > num_rows:  # no site count can work: fewer sites is not offered
        with pytest.raises(DataError, match="too small for even one site") as caught:
            split()
        assert "fewer sites" not in str(caught.value) + caught.value.hint
        return
    if num_sites * min_rows > num_rows:
        with pytest.raises(DataError, match="use fewer sites"):
            split()
        return
    try:
        parts = split()
    except DataError as err:  # a very skewed draw may be impossible to satisfy
        assert method == "dirichlet" and "tries" in str(err)
        return

    assert len(parts) == num_sites
    assert_is_partition(parts, num_rows)
    assert min(len(p) for p in parts) >= min_rows


@pytest.mark.parametrize("method", ["iid", "dirichlet"])
def test_partition_is_deterministic_for_a_seed(method: str) -> None:
    labels = balanced_labels(500, 5)

    first = partition_indices(labels, 5, method=method, seed=3)
    again = partition_indices(labels, 5, method=method, seed=3)
    other = partition_indices(labels, 5, method=method, seed=4)

    assert all(np.array_equal(a, b) for a, b in zip(first, again, strict=True))
    assert not all(np.array_equal(a, b) for a, b in zip(first, other, strict=True))


def test_dirichlet_with_small_alpha_skews_labels_more_than_iid() -> None:
    labels = balanced_labels(2000, 10)

    iid = partition_indices(labels, 5, method="iid", seed=0)
    skewed = partition_indices(labels, 5, method="dirichlet", alpha=0.1, seed=0)
    mild = partition_indices(labels, 5, method="dirichlet", alpha=100.0, seed=0)

    assert mean_label_skew(labels, iid, 10) < 0.1
    assert mean_label_skew(labels, skewed, 10) > mean_label_skew(labels, iid, 10) + 0.3
    assert mean_label_skew(labels, mild, 10) < mean_label_skew(labels, skewed, 10) - 0.3


def test_dirichlet_respects_the_minimum_rows_per_site() -> None:
    labels = balanced_labels(400, 4)

    parts = partition_indices(labels, 8, method="dirichlet", alpha=0.3, min_rows_per_site=25)

    assert min(len(p) for p in parts) >= 25
    assert_is_partition(parts, 400)


def test_dirichlet_gives_up_with_a_clear_error_when_the_minimum_is_unreachable() -> None:
    labels = np.zeros(60, dtype=np.int64)  # one class: Dir(0.01) puts ~all rows on one site

    with pytest.raises(DataError, match="left a site with fewer than 10 rows in 100 tries"):
        partition_indices(labels, 6, method="dirichlet", alpha=0.01, min_rows_per_site=10)


def test_more_sites_than_rows_allow_is_a_data_error() -> None:
    labels = balanced_labels(569, 2)

    with pytest.raises(DataError) as caught:
        partition_indices(labels, 100)

    assert str(caught.value) == (
        "cannot split 569 rows into 100 sites of at least 10 rows each; use fewer sites"
    )


def test_unknown_method_lists_the_valid_names() -> None:
    expected = "unknown partition method 'shard'; choose one of: dirichlet, iid"

    with pytest.raises(ConfigError, match=expected):
        partition_indices(balanced_labels(50, 2), 2, method="shard")


@pytest.mark.parametrize(
    ("num_sites", "alpha", "min_rows", "message"),
    [
        (0, 0.5, 1, "num_sites must be >= 1, got 0"),
        (2, 0.0, 1, "alpha must be > 0, got 0.0"),
        (2, -1.0, 1, "alpha must be > 0, got -1.0"),
        (2, float("nan"), 1, "alpha must be > 0, got nan"),
        (2, 0.5, 0, "min_rows_per_site must be >= 1, got 0"),
    ],
)
def test_out_of_range_settings_are_config_errors(
    num_sites: int, alpha: float, min_rows: int, message: str
) -> None:
    labels = balanced_labels(50, 2)

    with pytest.raises(ConfigError, match=message):
        partition_indices(
            labels, num_sites, method="dirichlet", alpha=alpha, min_rows_per_site=min_rows
        )


# --- make_site_data ------------------------------------------------------------------


def test_table_train_rows_are_standardised_per_feature() -> None:
    rng = np.random.default_rng(0)
    features = np.column_stack([rng.normal(50, 7, 200), rng.exponential(3, 200), np.full(200, 4)])

    site = make_site_data(features, balanced_labels(200, 2), num_classes=2, kind="table")

    assert site.train_x.dtype == np.float32 and site.test_x.dtype == np.float32
    assert site.train_y.dtype == np.int64 and site.test_y.dtype == np.int64
    np.testing.assert_allclose(site.train_x[:, :2].mean(axis=0), 0.0, atol=1e-5)
    np.testing.assert_allclose(site.train_x[:, :2].std(axis=0), 1.0, atol=1e-5)
    assert np.all(site.train_x[:, 2] == 0.0) and np.all(site.test_x[:, 2] == 0.0)
    assert (len(site.train_y), len(site.test_y)) == (160, 40)
    assert (site.feature_shape, site.kind, site.num_classes) == ((3,), "table", 2)


def test_each_site_is_centred_on_its_own_train_rows() -> None:
    rng = np.random.default_rng(1)
    labels = balanced_labels(100, 2)
    near = rng.normal(100.0, 5.0, (100, 2))
    far = rng.normal(-5000.0, 300.0, (100, 2))

    sites = [make_site_data(x, labels, num_classes=2, kind="table") for x in (near, far)]

    for site in sites:
        np.testing.assert_allclose(site.train_x.mean(axis=0), 0.0, atol=1e-5)
        np.testing.assert_allclose(site.train_x.std(axis=0), 1.0, atol=1e-5)
        assert np.all(np.abs(site.test_x.mean(axis=0)) < 1.0)


def test_test_rows_are_scaled_with_the_train_statistics() -> None:
    # Column 0 is a row id; scaling is monotone, so ranks recover which rows went where.
    rng = np.random.default_rng(2)
    num_rows = 60
    features = np.column_stack([np.arange(num_rows), rng.normal(10, 4, (num_rows, 2)) ** 2])

    site = make_site_data(features, balanced_labels(num_rows, 3), num_classes=3, kind="table")

    ranks = np.argsort(np.argsort(np.concatenate([site.train_x[:, 0], site.test_x[:, 0]])))
    train_ids, test_ids = ranks[: len(site.train_x)], ranks[len(site.train_x) :]
    mean = features[train_ids].mean(axis=0)
    std = features[train_ids].std(axis=0)
    np.testing.assert_allclose(site.train_x, (features[train_ids] - mean) / std, rtol=1e-5)
    np.testing.assert_allclose(site.test_x, (features[test_ids] - mean) / std, rtol=1e-4)
    own = features[test_ids].mean(axis=0)
    assert not np.allclose((features[test_ids] - own) / std, site.test_x, atol=1e-3)


def test_images_use_fixed_constants_not_statistics() -> None:
    # Each image is one flat grey level, so its scaled value tells which image it was.
    levels = np.array([*range(28), 127.5, 255.0])
    images = np.broadcast_to(levels[:, None, None, None], (30, 1, 4, 4)).astype(np.float32)

    site = make_site_data(images, balanced_labels(30, 2), num_classes=2, kind="image", seed=5)

    scaled = np.concatenate([site.train_x, site.test_x])
    assert site.feature_shape == (1, 4, 4) and scaled.dtype == np.float32
    assert np.all(scaled == scaled[:, :1, :1, :1]), "pixels of one image stay equal"
    np.testing.assert_allclose(np.sort(scaled[:, 0, 0, 0]), levels / 255.0 * 2 - 1, atol=1e-6)
    assert scaled.min() == pytest.approx(-1.0) and scaled.max() == pytest.approx(1.0)


def test_split_is_stratified_when_every_class_has_two_rows() -> None:
    labels = np.array([0] * 8 + [1] * 8 + [2] * 24)

    site = make_site_data(np.ones((40, 1)), labels, num_classes=3, kind="table", test_fraction=0.25)

    assert np.bincount(site.test_y).tolist() == [2, 2, 6]
    assert np.bincount(site.train_y).tolist() == [6, 6, 18]


def test_split_of_a_tiny_site_keeps_one_test_row_and_tolerates_singleton_classes() -> None:
    labels = np.array([0, 1, 1])

    site = make_site_data(np.eye(3), labels, num_classes=4, kind="table", test_fraction=0.01)

    assert (len(site.train_y), len(site.test_y)) == (2, 1)
    assert sorted([*site.train_y, *site.test_y]) == [0, 1, 1]


def test_train_test_split_is_deterministic_for_a_seed() -> None:
    features = np.random.default_rng(4).normal(size=(50, 3))
    labels = balanced_labels(50, 2)

    first, again, other = (
        make_site_data(features, labels, num_classes=2, kind="table", seed=s) for s in (1, 1, 2)
    )

    assert np.array_equal(first.test_x, again.test_x)
    assert not np.array_equal(first.test_x, other.test_x)


@pytest.mark.parametrize("fraction", [0.0, 1.0, 1.5, -0.2])
def test_test_fraction_must_lie_strictly_between_0_and_1(fraction: float) -> None:
    with pytest.raises(ConfigError, match=f"test_fraction must be in \\(0, 1\\), got {fraction}"):
        make_site_data(
            np.ones((10, 2)), np.zeros(10), num_classes=1, kind="table", test_fraction=fraction
        )


def test_site_with_one_row_cannot_be_split() -> None:
    with pytest.raises(DataError, match="at least 2 rows"):
        make_site_data(np.ones((1, 2)), np.zeros(1), num_classes=1, kind="table")


# --- site_data_for -------------------------------------------------------------------


def test_sites_take_their_own_disjoint_partitions() -> None:
    dataset = table_dataset()

    sites = [
        site_data_for(dataset, i, 3, method="dirichlet", alpha=0.5, seed=9, test_fraction=0.2)
        for i in range(3)
    ]
    expected = partition_indices(dataset.labels, 3, method="dirichlet", alpha=0.5, seed=9)

    for site, rows in zip(sites, expected, strict=True):
        assert len(site.train_y) + len(site.test_y) == len(rows)
        assert np.array_equal(
            np.sort(np.concatenate([site.train_y, site.test_y])), np.sort(dataset.labels[rows])
        )
        assert (site.num_classes, site.kind, site.feature_shape) == (3, "table", (4,))
        np.testing.assert_allclose(site.train_x.mean(axis=0), 0.0, atol=1e-5)


def test_site_index_out_of_range_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match=r"site_index must be in 0\.\.2, got 3"):
        site_data_for(table_dataset(), 3, 3, method="iid", alpha=0.5, seed=0, test_fraction=0.2)


# --- δ against the sites' training rows --------------------------------------------------------


@pytest.mark.parametrize(("rows", "train"), [(20, 16), (10, 8), (2, 1), (3, 2), (569, 455)])
def test_train_rows_for_counts_what_make_site_data_trains_on(rows: int, train: int) -> None:
    labels = np.arange(rows) % 2
    site = make_site_data(
        np.ones((rows, 1)), labels, num_classes=2, kind="table", test_fraction=0.2
    )

    assert train_rows_for(rows, 0.2) == train == len(site.train_y)


def test_a_delta_below_one_over_every_sites_rows_passes() -> None:
    check_delta_fits(0.001, {"a": 99, "b": 500})


def test_a_delta_too_large_for_one_site_names_it_and_its_rows() -> None:
    with pytest.raises(DataError) as caught:
        check_delta_fits(0.01, {"a": 100, "b": 50})

    assert str(caught.value) == (
        "δ = 0.01 is too large for site a's 100 training rows: it must be below 1/100 = 0.01"
    )
    assert "smaller --delta" in caught.value.hint


def test_a_delta_too_large_for_several_sites_lists_them_largest_first() -> None:
    message = (
        r"^δ = 0.1 is too large for the training rows of 2 sites \(c: 11, a: 10\): it must be "
        r"below 1/11 = 0.0909$"
    )
    with pytest.raises(DataError, match=message):
        check_delta_fits(0.1, {"a": 10, "b": 4, "c": 11})
