"""Datasets by name: built-in tables and images, generated credit data, and CSV files."""

from __future__ import annotations

import csv
import functools
import gzip
import importlib.util
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from fedvault.common.errors import DataError

logger = logging.getLogger(__name__)

DATASETS: tuple[str, ...] = ("breast-cancer", "digits", "credit", "fashion-mnist")
DEFAULT_FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_HINT = (
    "install it with `apt-get install dataset-fashion-mnist` or pass a folder holding the IDX files"
)
FASHION_MNIST_CLASSES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)  # fmt: skip
IDX_HINT = (
    "Use the original Fashion-MNIST IDX files (train-images-idx3-ubyte.gz ...), whole and "
    "unchanged; data-dir in [data] names their folder."
)
CREDIT_FEATURES = (
    "age", "annual_income", "months_employed", "debt_to_income", "credit_limit",
    "utilisation", "open_credit_lines", "late_payments_12m", "credit_inquiries_6m",
    "years_at_address", "dependents", "loan_amount",
)  # fmt: skip
CREDIT_ROWS = 6000
CREDIT_DEFAULT_RATE = 0.21


@dataclass(frozen=True, eq=False)
class Dataset:
    """A whole dataset in memory: float32 features, int64 labels 0..num_classes-1."""

    name: str
    features: npt.NDArray[np.float32]
    labels: npt.NDArray[np.int64]
    num_classes: int
    kind: str
    class_names: tuple[str, ...]

    @property
    def feature_shape(self) -> tuple[int, ...]:
        """Shape of one row: (d,) for tables, (1, H, W) for images."""
        return tuple(int(size) for size in self.features.shape[1:])

    def __len__(self) -> int:
        return int(self.labels.shape[0])


def load_dataset(
    spec: str,
    *,
    label_column: str | None = None,
    data_dir: Path | None = None,
    seed: int = 0,
) -> Dataset:
    """Load a built-in dataset by name or a CSV file given as ``csv:PATH``.

    ``label_column`` is used by CSV files only, ``data_dir`` by fashion-mnist only,
    ``seed`` by the generated credit table only.
    """
    if spec.startswith("csv:"):
        dataset = _load_csv(spec[len("csv:") :], label_column)
    else:
        loader = _REGISTRY.get(spec)
        if loader is None:
            valid = ", ".join([*sorted(_REGISTRY), "csv:PATH"])
            raise DataError(
                f"unknown dataset {spec!r}; choose one of: {valid}",
                hint="For your own data use --dataset csv:PATH --label-column NAME.",
            )
        if label_column is not None:
            logger.warning("label_column is ignored for built-in dataset %s", spec)
        dataset = _small_builtin(spec, seed) if spec in SMALL_BUILTINS else loader(data_dir, seed)
    logger.info(
        "loaded dataset %s: %d rows, feature shape %s, %d classes",
        dataset.name, len(dataset), dataset.feature_shape, dataset.num_classes,
    )  # fmt: skip
    return dataset


#: Built-in datasets kept in memory once per process (each well under 1 MB; fashion-mnist,
#: about 220 MB, is not): simulated sites that share a process (a Ray worker serves many)
#: then generate or read them once instead of once per message.
SMALL_BUILTINS = frozenset({"breast-cancer", "digits", "credit"})


@functools.lru_cache(maxsize=16)
def _small_builtin(name: str, seed: int) -> Dataset:
    """A small built-in dataset, shared: its arrays are read-only (indexing copies them)."""
    dataset = _REGISTRY[name](None, seed)
    dataset.features.flags.writeable = False
    dataset.labels.flags.writeable = False
    return dataset


def _sklearn_data_file(name: str) -> Path | None:
    """A data file scikit-learn ships (sklearn/datasets/data/NAME), found without importing it.

    Importing scikit-learn costs about a second; `fedvault simulate` checks the data before it
    starts anything, so it reads the two small built-in tables the way scikit-learn's own
    loaders do (tests/common/test_data.py checks they agree). None when the file is not there
    (another layout): the caller then uses scikit-learn's loader.
    """
    spec = importlib.util.find_spec("sklearn")  # locates the package; imports nothing
    for folder in (spec.submodule_search_locations or []) if spec else []:
        path = Path(folder) / "datasets" / "data" / name
        if path.is_file():
            return path
    return None


def _read_breast_cancer() -> tuple[npt.NDArray[np.float64], npt.NDArray[Any], tuple[str, ...]]:
    """Features, labels and class names, read as sklearn.datasets.load_breast_cancer reads them
    (its CSV's first line: rows, columns, class names; then the rows, the label last)."""
    path = _sklearn_data_file("breast_cancer.csv")
    if path is None:
        from sklearn.datasets import load_breast_cancer

        bunch: Any = load_breast_cancer()
        return bunch.data, bunch.target, tuple(str(name) for name in bunch.target_names)
    with path.open("r", encoding="utf-8") as handle:
        rows = csv.reader(handle)
        head = next(rows)
        data = np.empty((int(head[0]), int(head[1])))
        target = np.empty((int(head[0]),), dtype=int)
        for i, row in enumerate(rows):
            data[i] = np.asarray(row[:-1], dtype=np.float64)
            target[i] = np.asarray(row[-1], dtype=int)
    return data, target, tuple(head[2:])


def _read_digits() -> tuple[npt.NDArray[np.float64], npt.NDArray[Any]]:
    """Images (n, 8, 8) and labels, read as sklearn.datasets.load_digits reads them."""
    path = _sklearn_data_file("digits.csv.gz")
    if path is None:
        from sklearn.datasets import load_digits

        bunch: Any = load_digits()
        return bunch.images, bunch.target
    with path.open("rb") as raw, gzip.open(raw, mode="rt", encoding="utf-8") as text:
        data = np.loadtxt(text, delimiter=",")
    return data[:, :-1].reshape(-1, 8, 8), data[:, -1].astype(int, copy=False)


def _load_breast_cancer(data_dir: Path | None, seed: int) -> Dataset:
    """Wisconsin diagnostic breast cancer (569 x 30), the "hospital" table."""
    data, target, target_names = _read_breast_cancer()
    return Dataset(
        name="breast-cancer",
        features=np.asarray(data, dtype=np.float32),
        labels=np.asarray(target, dtype=np.int64),
        num_classes=2,
        kind="table",
        class_names=target_names,
    )


def _load_digits(data_dir: Path | None, seed: int) -> Dataset:
    """Handwritten digits as (n, 1, 8, 8) images, pixels rescaled from 0..16 to 0..255."""
    raw_images, target = _read_digits()
    images = np.asarray(raw_images, dtype=np.float64) * (255.0 / 16.0)
    return Dataset(
        name="digits",
        features=images[:, np.newaxis, :, :].astype(np.float32),
        labels=np.asarray(target, dtype=np.int64),
        num_classes=10,
        kind="image",
        class_names=tuple(str(digit) for digit in range(10)),
    )


def _load_credit(data_dir: Path | None, seed: int) -> Dataset:
    """SYNTHETIC bank credit-default table: generated rows, not real customers.

    6000 rows with the 12 columns of ``CREDIT_FEATURES`` (lognormal incomes and loan
    sizes, beta-distributed debt ratio and utilisation, Poisson counts). Default (1)
    follows a logistic model of the features plus an unobserved risk factor, with
    the intercept solved so that about 21 % of rows default. A linear model reaches
    about 0.82 accuracy (majority baseline 0.79) and AUC about 0.80-0.83.
    Deterministic for a given ``seed``.
    """
    rng = np.random.default_rng(seed)
    n = CREDIT_ROWS
    age = np.clip(rng.normal(41.0, 12.0, n), 21, 75).round()
    income = np.exp(rng.normal(np.log(42_000.0), 0.55, n)) * (1 + 0.01 * (age - 41))
    income = np.clip(income, 8_000, None).round(-2)
    months_employed = np.minimum(
        rng.exponential(60.0, n) * (age - 18) / 23, (age - 18) * 12
    ).round()
    debt_ratio = np.clip(rng.beta(2.0, 5.0, n) * 1.2, 0.0, 1.5)
    credit_limit = (income * rng.lognormal(np.log(0.25), 0.4, n)).round(-2)
    utilisation = np.clip(rng.beta(1.6, 3.2, n) * 1.15, 0.0, 1.1)
    credit_lines = rng.poisson(4.0, n) + 1
    inquiries = rng.poisson(1.0, n)
    years_at_address = np.minimum(rng.exponential(6.0, n), age - 18).round(1)
    dependents = rng.poisson(0.9, n)
    loan_amount = rng.lognormal(np.log(12_000.0), 0.7, n).round(-2) + 500
    hidden_risk = rng.normal(0.0, 1.0, n)
    late = rng.poisson(np.exp(-1.0 + 0.6 * hidden_risk + 1.5 * utilisation))

    def z(values: npt.NDArray[Any]) -> npt.NDArray[np.float64]:
        as_float = values.astype(np.float64)
        standard: npt.NDArray[np.float64] = (as_float - as_float.mean()) / as_float.std()
        return standard

    score = 0.75 * (
        1.1 * z(utilisation) + 0.7 * z(debt_ratio) + 0.6 * z(np.log1p(late))
        - 0.5 * z(np.log(income)) - 0.35 * z(age) - 0.3 * z(np.log1p(months_employed))
        + 0.3 * z(inquiries) + 0.25 * z(np.log(loan_amount / income))
        - 0.1 * z(years_at_address)
    ) + 0.75 * hidden_risk  # fmt: skip
    probability = _sigmoid(score + _intercept_for_rate(score, CREDIT_DEFAULT_RATE))
    labels = (rng.random(n) < probability).astype(np.int64)
    columns = (
        age, income, months_employed, debt_ratio, credit_limit, utilisation,
        credit_lines, late, inquiries, years_at_address, dependents, loan_amount,
    )  # fmt: skip
    return Dataset(
        name="credit",
        features=np.column_stack(columns).astype(np.float32),
        labels=labels,
        num_classes=2,
        kind="table",
        class_names=("no-default", "default"),
    )


def _sigmoid(x: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:
    return 1.0 / (1.0 + np.exp(-x))


def _intercept_for_rate(score: npt.NDArray[np.float64], rate: float) -> float:
    """Bisect the intercept b so that mean(sigmoid(score + b)) equals ``rate``."""
    low, high = -30.0, 30.0
    for _ in range(60):
        middle = (low + high) / 2
        if float(_sigmoid(score + middle).mean()) > rate:
            high = middle
        else:
            low = middle
    return (low + high) / 2


_IDX_DTYPES: dict[int, str] = {
    0x08: "u1", 0x09: "i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"
}  # fmt: skip
_FASHION_FILES = (
    ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
)


def read_idx(path: Path) -> npt.NDArray[Any]:
    """Read one IDX file (the MNIST format), gzip-compressed when named *.gz."""
    try:
        data = path.read_bytes()
        raw = gzip.decompress(data) if path.suffix == ".gz" else data
    except (OSError, EOFError) as err:
        raise DataError(
            f"cannot read IDX file {path}: {err}",
            hint=f"Check that the file is readable and complete (`ls -l {path}`); a .gz file "
            "must be a whole gzip archive.",
        ) from err
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPES:
        raise DataError(
            f"{path} is not an IDX file: bad magic number {raw[:4].hex()}",
            hint=IDX_HINT,
        )
    ndim = raw[3]
    header_size = 4 + 4 * ndim
    if ndim == 0 or len(raw) < header_size:
        raise DataError(f"{path} is not an IDX file: truncated header", hint=IDX_HINT)
    shape = tuple(int(size) for size in np.frombuffer(raw, ">u4", ndim, offset=4))
    dtype = np.dtype(_IDX_DTYPES[raw[2]])
    expected = math.prod(shape) * dtype.itemsize
    if len(raw) - header_size != expected:
        raise DataError(
            f"{path} holds {len(raw) - header_size} data bytes, "
            f"but its header shape {shape} needs {expected}",
            hint=IDX_HINT,
        )
    return np.frombuffer(raw, dtype, offset=header_size).reshape(shape)


def _idx_path(folder: Path, stem: str) -> Path:
    for candidate in (folder / f"{stem}.gz", folder / stem):
        if candidate.is_file():
            return candidate
    raise DataError(
        f"fashion-mnist file {stem}(.gz) not found in {folder}", hint=FASHION_MNIST_HINT
    )


def _load_fashion_mnist(data_dir: Path | None, seed: int) -> Dataset:
    """Fashion-MNIST train + test (70 000 x 1 x 28 x 28, pixels 0..255) from IDX files."""
    folder = (data_dir or DEFAULT_FASHION_MNIST_DIR).expanduser()
    if not folder.is_dir():
        raise DataError(f"fashion-mnist folder not found: {folder}", hint=FASHION_MNIST_HINT)
    images_parts: list[npt.NDArray[Any]] = []
    labels_parts: list[npt.NDArray[Any]] = []
    for images_stem, labels_stem in _FASHION_FILES:
        images_path = _idx_path(folder, images_stem)
        images = read_idx(images_path)
        labels = read_idx(_idx_path(folder, labels_stem))
        if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
            raise DataError(
                f"{images_path}: expected images (n, H, W) and n labels, "
                f"got images {images.shape} and labels {labels.shape}",
                hint=IDX_HINT,
            )
        if images_parts and images.shape[1:] != images_parts[0].shape[1:]:
            raise DataError(
                f"{images_path}: image size {images.shape[1:]} differs "
                f"from the training images' {images_parts[0].shape[1:]}",
                hint=IDX_HINT,
            )
        images_parts.append(images)
        labels_parts.append(labels)
    labels_all = np.concatenate(labels_parts).astype(np.int64)
    if labels_all.size and (labels_all.min() < 0 or labels_all.max() > 9):
        raise DataError(
            f"fashion-mnist labels must be 0..9, found {labels_all.max()}", hint=IDX_HINT
        )
    features = np.concatenate(images_parts).astype(np.float32)[:, np.newaxis, :, :]
    return Dataset(
        name="fashion-mnist",
        features=features,
        labels=labels_all,
        num_classes=10,
        kind="image",
        class_names=FASHION_MNIST_CLASSES,
    )


def _load_csv(path_text: str, label_column: str | None) -> Dataset:
    """A CSV file with a header row, numeric feature columns and one label column."""
    from fedvault.common.csv_table import read_csv_table

    table = read_csv_table(path_text, label_column)
    return Dataset(
        name=f"csv:{table.path}",
        features=table.features,
        labels=table.labels,
        num_classes=len(table.class_names),
        kind="table",
        class_names=table.class_names,
    )


_REGISTRY: dict[str, Callable[[Path | None, int], Dataset]] = {
    "breast-cancer": _load_breast_cancer,
    "digits": _load_digits,
    "credit": _load_credit,
    "fashion-mnist": _load_fashion_mnist,
}
