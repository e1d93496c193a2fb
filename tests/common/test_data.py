"""Tests for common/data.py: built-in datasets, the credit generator, CSV and IDX loading."""

from __future__ import annotations

import gzip
import re
from pathlib import Path

import numpy as np
import pytest
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score
from sklearn.model_selection import train_test_split
from sklearn.preprocessing import StandardScaler

import fedvault.common.data
from fedvault.common.data import DATASETS, FASHION_MNIST_HINT, Dataset, load_dataset, read_idx
from fedvault.common.errors import DataError

pytestmark = pytest.mark.unit


def write_csv(folder: Path, text: str, *, name: str = "site.csv", bom: bool = False) -> Path:
    path = folder / name
    path.write_bytes(("\ufeff" if bom else "").encode() + text.encode("utf-8"))
    return path


def idx_bytes(array: np.ndarray) -> bytes:
    """Encode a uint8 array as an IDX file: magic 0x0000 08 ndim, big-endian dims, data."""
    header = bytes([0, 0, 0x08, array.ndim]) + np.array(array.shape, dtype=">u4").tobytes()
    return header + array.astype(np.uint8).tobytes()


def write_fashion_folder(folder: Path, *, compress: bool, size: int = 4) -> None:
    """Three training and two test images of size x size, labelled 0,1,2 and 8,9."""
    folder.mkdir(parents=True, exist_ok=True)
    parts = {
        "train-images-idx3-ubyte": np.arange(3 * size * size).reshape(3, size, size) % 256,
        "train-labels-idx1-ubyte": np.array([0, 1, 2]),
        "t10k-images-idx3-ubyte": np.full((2, size, size), 255),
        "t10k-labels-idx1-ubyte": np.array([8, 9]),
    }
    for stem, array in parts.items():
        data = idx_bytes(array)
        if compress:
            (folder / f"{stem}.gz").write_bytes(gzip.compress(data))
        else:
            (folder / stem).write_bytes(data)


# --- built-in datasets ---------------------------------------------------------------


def test_registry_names_are_the_four_built_ins() -> None:
    assert DATASETS == ("breast-cancer", "digits", "credit", "fashion-mnist")


def test_breast_cancer_is_a_569_by_30_binary_table() -> None:
    dataset = load_dataset("breast-cancer")

    assert dataset.features.shape == (569, 30)
    assert dataset.features.dtype == np.float32
    assert dataset.labels.dtype == np.int64
    assert set(np.unique(dataset.labels)) == {0, 1}
    assert (dataset.num_classes, dataset.kind) == (2, "table")
    assert dataset.class_names == ("malignant", "benign")
    assert dataset.feature_shape == (30,)
    assert len(dataset) == 569


def test_digits_are_single_channel_images_rescaled_to_0_255() -> None:
    dataset = load_dataset("digits")

    assert dataset.features.shape == (1797, 1, 8, 8)
    assert dataset.features.dtype == np.float32
    assert dataset.features.min() == 0.0
    assert dataset.features.max() == pytest.approx(255.0)
    assert (dataset.num_classes, dataset.kind) == (10, "image")
    assert set(np.unique(dataset.labels)) == set(range(10))
    assert dataset.class_names == tuple(str(i) for i in range(10))
    assert dataset.feature_shape == (1, 8, 8)


@pytest.mark.parametrize("name", ["breast-cancer", "digits"])
def test_built_in_tables_read_without_sklearn_equal_sklearns_own_loaders(
    name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Prepare: what scikit-learn's loaders give (the fallback path) and what the file reader gives
    from sklearn.datasets import load_breast_cancer, load_digits

    assert (
        fedvault.common.data._sklearn_data_file("breast_cancer.csv") is not None
    )  # the fast path runs
    fast = fedvault.common.data._REGISTRY[name](None, 0)
    monkeypatch.setattr(fedvault.common.data, "_sklearn_data_file", lambda _name: None)

    # Execute
    slow = fedvault.common.data._REGISTRY[name](None, 0)

    # Assert: bit for bit, and as scikit-learn itself has them
    np.testing.assert_array_equal(fast.features, slow.features)
    np.testing.assert_array_equal(fast.labels, slow.labels)
    assert fast.class_names == slow.class_names
    bunch = load_breast_cancer() if name == "breast-cancer" else load_digits()
    np.testing.assert_array_equal(fast.labels, bunch.target)
    flat = fast.features.reshape(len(fast), -1).astype(np.float64)
    expected = bunch.data if name == "breast-cancer" else bunch.data * (255.0 / 16.0)
    np.testing.assert_array_equal(flat, expected.astype(np.float32).astype(np.float64))


def test_credit_is_a_binary_table_with_named_classes() -> None:
    dataset = load_dataset("credit")

    assert dataset.features.shape == (6000, 12)
    assert dataset.features.dtype == np.float32
    assert dataset.labels.dtype == np.int64
    assert dataset.class_names == ("no-default", "default")
    assert np.all(np.isfinite(dataset.features))


def test_credit_is_deterministic_for_a_seed_and_varies_across_seeds() -> None:
    first, again, other = (load_dataset("credit", seed=s) for s in (7, 7, 8))

    assert np.array_equal(first.features, again.features)
    assert np.array_equal(first.labels, again.labels)
    assert not np.array_equal(first.features, other.features)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_credit_default_rate_is_realistic(seed: int) -> None:
    labels = load_dataset("credit", seed=seed).labels

    assert 0.18 <= labels.mean() <= 0.25


def test_credit_linear_model_beats_the_majority_baseline() -> None:
    dataset = load_dataset("credit", seed=0)
    x_train, x_test, y_train, y_test = train_test_split(
        dataset.features, dataset.labels, test_size=0.25, random_state=0, stratify=dataset.labels
    )
    scaler = StandardScaler().fit(x_train)

    model = LogisticRegression(max_iter=1000).fit(scaler.transform(x_train), y_train)
    accuracy = model.score(scaler.transform(x_test), y_test)
    auc = roc_auc_score(y_test, model.predict_proba(scaler.transform(x_test))[:, 1])

    majority = max(y_test.mean(), 1 - y_test.mean())
    assert accuracy >= majority + 0.02
    assert auc >= 0.75


def test_unknown_dataset_lists_the_valid_names() -> None:
    with pytest.raises(DataError) as caught:
        load_dataset("foo")

    assert str(caught.value) == (
        "unknown dataset 'foo'; choose one of: breast-cancer, credit, digits, fashion-mnist, "
        "csv:PATH"
    )


# --- CSV files -----------------------------------------------------------------------


def test_csv_with_string_labels_maps_sorted_names_to_indices(tmp_path: Path) -> None:
    path = write_csv(tmp_path, "age,diagnosis,size\n40,malignant,1.5\n55,benign,2\n61,cyst,-3\n")

    dataset = load_dataset(f"csv:{path}", label_column="diagnosis")

    assert dataset.class_names == ("benign", "cyst", "malignant")
    assert dataset.labels.tolist() == [2, 0, 1]
    assert dataset.labels.dtype == np.int64
    assert dataset.features.dtype == np.float32
    assert dataset.features.tolist() == [[40, 1.5], [55, 2], [61, -3]]
    assert (dataset.num_classes, dataset.kind, dataset.name) == (3, "table", f"csv:{path}")


def test_csv_integer_labels_sort_numerically(tmp_path: Path) -> None:
    path = write_csv(tmp_path, "x,label\n1,10\n2,2\n3,10\n4,2.0\n")

    dataset = load_dataset(f"csv:{path}", label_column="label")

    assert dataset.class_names == ("2", "10")
    assert dataset.labels.tolist() == [1, 0, 1, 0]


def test_csv_tolerates_a_byte_order_mark_and_blank_lines(tmp_path: Path) -> None:
    path = write_csv(tmp_path, "label,x\r\na,1\r\n\r\nb,2\r\n", bom=True)

    dataset = load_dataset(f"csv:{path}", label_column="label")

    assert dataset.labels.tolist() == [0, 1]
    assert dataset.features.tolist() == [[1], [2]]


def test_csv_path_expands_the_home_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HOME", str(tmp_path))
    write_csv(tmp_path, "x,y\n1,a\n2,b\n")

    dataset = load_dataset("csv:~/site.csv", label_column="y")

    assert len(dataset) == 2


def test_csv_needs_a_label_column(tmp_path: Path) -> None:
    path = write_csv(tmp_path, "x,y\n1,a\n2,b\n")

    with pytest.raises(DataError, match="csv datasets need --label-column"):
        load_dataset(f"csv:{path}")


def test_csv_missing_file_is_named(tmp_path: Path) -> None:
    missing = tmp_path / "nope.csv"

    with pytest.raises(DataError, match=re.escape(f"data file not found: {missing}")):
        load_dataset(f"csv:{missing}", label_column="y")


def test_csv_directory_is_refused(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="is a directory"):
        load_dataset(f"csv:{tmp_path}", label_column="y")


@pytest.mark.parametrize("text", ["", "x,y\n", "x,y\n\n\n"])
def test_csv_without_data_rows_is_refused(tmp_path: Path, text: str) -> None:
    path = write_csv(tmp_path, text)

    with pytest.raises(DataError, match="has no data rows"):
        load_dataset(f"csv:{path}", label_column="y")


def test_csv_missing_label_column_lists_the_available_columns(tmp_path: Path) -> None:
    path = write_csv(tmp_path, "age,size,outcome\n1,2,a\n")

    with pytest.raises(DataError) as caught:
        load_dataset(f"csv:{path}", label_column="diagnosis")

    message = str(caught.value)
    assert "'diagnosis' not found" in message
    assert "available columns: age, size, outcome" in message


def test_csv_non_numeric_feature_names_column_line_and_value(tmp_path: Path) -> None:
    path = write_csv(tmp_path, "age,size,y\n1,2,a\n3,big,b\n")

    with pytest.raises(DataError, match=r"line 3: column 'size' has non-numeric value 'big'"):
        load_dataset(f"csv:{path}", label_column="y")


@pytest.mark.parametrize("cell", ["", "  "])
def test_csv_missing_feature_value_names_column_and_line(tmp_path: Path, cell: str) -> None:
    path = write_csv(tmp_path, f"age,size,y\n1,2,a\n3,4,b\n5,{cell},a\n")

    with pytest.raises(DataError, match=r"line 4: column 'size' is empty \(missing value\)"):
        load_dataset(f"csv:{path}", label_column="y")


def test_csv_non_finite_feature_is_refused(tmp_path: Path) -> None:
    path = write_csv(tmp_path, "age,y\n1,a\nnan,b\n")

    with pytest.raises(DataError, match=r"line 3: column 'age' has non-finite value 'nan'"):
        load_dataset(f"csv:{path}", label_column="y")


def test_csv_empty_label_is_refused(tmp_path: Path) -> None:
    path = write_csv(tmp_path, "age,y\n1,a\n2,\n")

    with pytest.raises(DataError, match=r"line 3: label column 'y' is empty"):
        load_dataset(f"csv:{path}", label_column="y")


def test_csv_with_one_class_is_refused(tmp_path: Path) -> None:
    path = write_csv(tmp_path, "age,y\n1,sick\n2,sick\n")

    with pytest.raises(DataError, match=r"only one class \('sick'\); need at least 2 classes"):
        load_dataset(f"csv:{path}", label_column="y")


@pytest.mark.parametrize("row", ["1,2", "1,2,a,extra"])
def test_csv_ragged_rows_are_refused(tmp_path: Path, row: str) -> None:
    path = write_csv(tmp_path, f"age,size,y\n1,2,a\n{row}\n")

    with pytest.raises(DataError, match=r"line 3: expected 3 values .* got \d"):
        load_dataset(f"csv:{path}", label_column="y")


@pytest.mark.parametrize(
    ("header", "problem"),
    [("age,age,y", "repeats column names: age"), ("age,,y", "column 2 has no name")],
)
def test_csv_header_must_name_each_column_once(tmp_path: Path, header: str, problem: str) -> None:
    path = write_csv(tmp_path, f"{header}\n1,2,a\n3,4,b\n")

    with pytest.raises(DataError, match=problem):
        load_dataset(f"csv:{path}", label_column="y")


def test_csv_that_is_not_utf8_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "latin1.csv"
    path.write_bytes("x,y\n1,caf\u00e9\n".encode("latin-1"))

    with pytest.raises(DataError, match="not UTF-8"):
        load_dataset(f"csv:{path}", label_column="y")


# --- Fashion-MNIST IDX files ---------------------------------------------------------


@pytest.mark.parametrize("compress", [True, False])
def test_fashion_mnist_reads_train_then_test_idx_files(tmp_path: Path, compress: bool) -> None:
    write_fashion_folder(tmp_path, compress=compress)

    dataset = load_dataset("fashion-mnist", data_dir=tmp_path)

    assert dataset.features.shape == (5, 1, 4, 4)
    assert dataset.features.dtype == np.float32
    assert dataset.labels.tolist() == [0, 1, 2, 8, 9]
    assert dataset.labels.dtype == np.int64
    assert dataset.features[0, 0].ravel().tolist() == list(range(16))
    assert np.all(dataset.features[3:] == 255.0)
    assert (dataset.num_classes, dataset.kind, len(dataset.class_names)) == (10, "image", 10)


def test_fashion_mnist_defaults_to_the_debian_package_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    write_fashion_folder(tmp_path / "pkg", compress=True)
    monkeypatch.setattr(fedvault.common.data, "DEFAULT_FASHION_MNIST_DIR", tmp_path / "pkg")

    dataset = load_dataset("fashion-mnist")

    assert len(dataset) == 5


def test_fashion_mnist_missing_folder_names_it_and_hints_the_package(tmp_path: Path) -> None:
    folder = tmp_path / "absent"

    with pytest.raises(
        DataError, match=re.escape(f"fashion-mnist folder not found: {folder}")
    ) as caught:
        load_dataset("fashion-mnist", data_dir=folder)

    assert caught.value.hint == FASHION_MNIST_HINT
    assert "apt-get install dataset-fashion-mnist" in caught.value.hint


def test_fashion_mnist_missing_file_is_named(tmp_path: Path) -> None:
    write_fashion_folder(tmp_path, compress=False)
    (tmp_path / "t10k-labels-idx1-ubyte").unlink()

    with pytest.raises(DataError, match="t10k-labels-idx1-ubyte"):
        load_dataset("fashion-mnist", data_dir=tmp_path)


def test_idx_reader_refuses_a_bad_magic_number(tmp_path: Path) -> None:
    path = tmp_path / "bad-idx1-ubyte"
    path.write_bytes(b"\x12\x34\x08\x01" + b"\x00" * 8)

    with pytest.raises(DataError, match="bad magic number 12340801"):
        read_idx(path)


def test_idx_reader_refuses_a_truncated_body(tmp_path: Path) -> None:
    path = tmp_path / "short-idx1-ubyte"
    path.write_bytes(idx_bytes(np.arange(10))[:-3])

    with pytest.raises(DataError, match="holds 7 data bytes"):
        read_idx(path)


def test_dataset_reports_its_feature_shape_and_length() -> None:
    dataset = Dataset(
        name="tiny",
        features=np.zeros((4, 3), np.float32),
        labels=np.array([0, 1, 0, 1], np.int64),
        num_classes=2,
        kind="table",
        class_names=("0", "1"),
    )

    assert dataset.feature_shape == (3,)
    assert len(dataset) == 4


@pytest.mark.parametrize("name", sorted(fedvault.common.data.SMALL_BUILTINS))
def test_small_builtins_are_loaded_once_per_process_and_cannot_be_altered(name: str) -> None:
    # Execute: two loads, as two simulated sites in one worker process do
    first, again = load_dataset(name), load_dataset(name)

    # Assert: one shared copy, protected from a caller writing into it
    assert again is first
    with pytest.raises(ValueError, match="read-only"):
        first.features[0] = 0.0
    with pytest.raises(ValueError, match="read-only"):
        first.labels[0] = 0
    subset = first.features[[0, 1]]  # indexing copies: a site's own rows stay writable
    subset[0] = 0.0


def test_credit_rows_depend_on_the_seed_even_when_shared() -> None:
    assert not np.array_equal(
        load_dataset("credit", seed=0).features, load_dataset("credit", seed=1).features
    )
