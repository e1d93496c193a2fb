"""A dataset's content fingerprint: the key of its privacy ledger (no Opacus, no torch).

It lives apart from common/ledger.py so that code which only needs the key (a site
resolving its data for an evaluation) does not import the privacy accountants.
"""

from __future__ import annotations

import hashlib

import numpy as np
import numpy.typing as npt

from fedvault.common.errors import DataError

__all__ = ["dataset_fingerprint", "short_fingerprint"]


def dataset_fingerprint(features: npt.NDArray[np.generic], labels: npt.NDArray[np.generic]) -> str:
    """``sha256:<hex>`` identifying a dataset by its content: the multiset of (row, label) pairs.

    Each row's features and label are hashed together (canonical little-endian bytes of
    C-contiguous arrays), the row digests are sorted, and the print is the SHA-256 of the
    dtypes, per-row shapes, row count and sorted digests. So the same rows give the same
    print whatever the file path, memory layout or **row order** (re-exporting or shuffling
    a table cannot start a fresh budget), while any changed value, dtype, pairing of a row
    with its label, or added/removed/duplicated row gives another. Fingerprint the rows as
    loaded, before splitting or scaling, so every split of the same data shares one budget.
    """
    if features.ndim < 1 or labels.ndim < 1 or features.shape[0] != labels.shape[0]:
        raise DataError(
            f"features and labels must have one row each per example, got shapes "
            f"{features.shape} and {labels.shape}"
        )
    feats, labs = _canonical(features, "features"), _canonical(labels, "labels")
    rows = int(feats.shape[0])
    f_bytes, l_bytes = feats.tobytes(), labs.tobytes()
    f_len, l_len = (len(f_bytes) // rows, len(l_bytes) // rows) if rows else (0, 0)
    digests = sorted(
        hashlib.sha256(
            f_bytes[i * f_len : (i + 1) * f_len] + l_bytes[i * l_len : (i + 1) * l_len]
        ).digest()
        for i in range(rows)
    )
    outer = hashlib.sha256(
        f"fedvault-dataset-v1\nfeatures {feats.dtype.str} {feats.shape[1:]}\n"
        f"labels {labs.dtype.str} {labs.shape[1:]}\nrows {rows}\n".encode()
    )
    for digest in digests:
        outer.update(digest)
    return f"sha256:{outer.hexdigest()}"


def _canonical(array: npt.NDArray[np.generic], what: str) -> npt.NDArray[np.generic]:
    if array.dtype.kind not in "biufc":
        raise DataError(f"{what} must be a numeric array to be fingerprinted, got {array.dtype}")
    return np.ascontiguousarray(array, dtype=array.dtype.newbyteorder("<"))


def short_fingerprint(fingerprint: str) -> str:
    """A fingerprint cut to 12 hex digits for messages and tables: ``sha256:0123abcd4567``."""
    return fingerprint[: len("sha256:") + 12]
