"""Tests for common/fingerprint.py: a dataset's content fingerprint, its ledger key."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from fedvault.common.errors import DataError
from fedvault.common.fingerprint import dataset_fingerprint, short_fingerprint

pytestmark = pytest.mark.unit


def table(seed: int = 0, rows: int = 30) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return rng.normal(size=(rows, 4)).astype(np.float32), rng.integers(0, 3, rows)


def test_fingerprint_is_a_sha256_of_the_content_whatever_the_memory_layout() -> None:
    x, y = table()
    strided = np.zeros((30, 8), dtype=np.float32)
    strided[:, ::2] = x  # a non-contiguous view holding the same values

    prints = {
        dataset_fingerprint(x, y),
        dataset_fingerprint(x.copy(), y.copy()),
        dataset_fingerprint(strided[:, ::2], y),
        dataset_fingerprint(np.asfortranarray(x), y),
        dataset_fingerprint(x.astype(">f4"), y.astype(">i8")),  # big-endian bytes, same values
    }

    assert not strided[:, ::2].flags.c_contiguous
    assert len(prints) == 1
    (fingerprint,) = prints
    assert fingerprint.startswith("sha256:") and len(fingerprint) == len("sha256:") + 64
    assert short_fingerprint(fingerprint) == fingerprint[:19]


def test_fingerprint_changes_with_any_value_dtype_or_row() -> None:
    x, y = table()
    one_feature, one_label = x.copy(), y.copy()
    one_feature[7, 2] += 1e-3
    one_label[7] = (one_label[7] + 1) % 3

    prints = [
        dataset_fingerprint(x, y),
        dataset_fingerprint(one_feature, y),
        dataset_fingerprint(x, one_label),
        dataset_fingerprint(x.astype(np.float64), y),
        dataset_fingerprint(x, y.astype(np.int32)),
        dataset_fingerprint(x[:-1], y[:-1]),  # a row removed
        dataset_fingerprint(np.vstack([x, x[:1]]), np.append(y, y[:1])),  # a row duplicated
    ]

    assert len(set(prints)) == len(prints)


def test_fingerprint_ignores_row_order_but_not_which_label_goes_with_which_row() -> None:
    x, y = table()
    order = np.random.default_rng(5).permutation(len(y))
    relabelled = y.copy()
    first, second = np.flatnonzero(y != y[0])[0], 0
    relabelled[[first, second]] = relabelled[[second, first]]  # same labels, other rows

    assert dataset_fingerprint(x[order], y[order]) == dataset_fingerprint(x, y)
    assert dataset_fingerprint(x, relabelled) != dataset_fingerprint(x, y)


def test_fingerprint_refuses_unmatched_rows_and_non_numeric_arrays() -> None:
    x, y = table()

    with pytest.raises(DataError, match=r"one row each per example, got shapes \(30, 4\)"):
        dataset_fingerprint(x, y[:-1])
    with pytest.raises(DataError, match="must be a numeric array"):
        dataset_fingerprint(x.astype(object), y)


def test_fingerprinting_does_not_import_the_privacy_accountants() -> None:
    # An evaluation message only needs the site's data: it must not pay for Opacus.
    code = (
        "import sys, fedvault.common.fingerprint, fedvault.client.site; "
        "print('opacus' in sys.modules)"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "False"
