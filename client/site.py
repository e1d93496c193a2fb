"""Which site this ClientApp is and where its data comes from (simulation or a real site)."""

from __future__ import annotations

import functools
import hashlib
import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from fedvault.common.config import FedvaultConfig
from fedvault.common.data import Dataset, load_dataset
from fedvault.common.errors import ConfigError
from fedvault.common.fingerprint import dataset_fingerprint
from fedvault.common.partition import SiteData, make_site_data, partition_indices, site_data_for

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Site:
    """A site's name, its own data (train/test split, scaled on its own training rows), and
    the fingerprint of its rows as loaded (before split and scaling): its ledger's key."""

    name: str
    data: SiteData
    fingerprint: str


# A simulation worker serves many sites (100 sites on 2 workers: about 50 each); its
# partitions are disjoint, so holding them all costs at most one copy of the dataset.
@functools.lru_cache(maxsize=256)
def _simulated_site(config_toml: str, partition_id: int, num_partitions: int) -> Site:
    from fedvault.common.config import parse_toml_text

    cfg = parse_toml_text(config_toml)
    dataset = load_dataset(
        cfg.data.dataset,
        label_column=cfg.data.label_column or None,
        data_dir=Path(cfg.data.data_dir) if cfg.data.data_dir else None,
        seed=cfg.seed,
    )
    method, alpha = cfg.data.partition, cfg.data.alpha
    data = site_data_for(
        dataset,
        partition_id,
        num_partitions,
        method=method,
        alpha=alpha,
        seed=cfg.seed,
        test_fraction=cfg.data.test_fraction,
    )
    rows = partition_indices(dataset.labels, num_partitions, method=method, alpha=alpha,
                             seed=cfg.seed)[partition_id]  # fmt: skip
    return Site(
        name=cfg.site_name(partition_id),
        data=data,
        fingerprint=dataset_fingerprint(dataset.features[rows], dataset.labels[rows]),
    )


@dataclass(frozen=True)
class FileIdentity:
    """What tells a site's data file apart cheaply: its size, mtime, inode and a SHA-256 of its
    first and last MiB. A changed identity means the file is read and fingerprinted again;
    the full content fingerprint (over every row) is computed only then."""

    path: str
    size: int
    mtime_ns: int
    inode: int
    edges: str


EDGE_BYTES = 1 << 20


def file_identity(path: str) -> FileIdentity:
    """The cheap identity of ``path`` (a stat and at most 2 MiB read)."""
    with open(path, "rb") as handle:
        stat = os.fstat(handle.fileno())
        digest = hashlib.sha256(handle.read(EDGE_BYTES))
        if stat.st_size > EDGE_BYTES:
            handle.seek(max(EDGE_BYTES, stat.st_size - EDGE_BYTES))
            digest.update(handle.read(EDGE_BYTES))
    return FileIdentity(path, stat.st_size, stat.st_mtime_ns, stat.st_ino, digest.hexdigest())


@dataclass(frozen=True, eq=False)  # hashed by identity: one object per read of the file
class SiteFile:
    """A site's data file as loaded (before split and scaling) and its content fingerprint."""

    identity: FileIdentity
    dataset: Dataset
    fingerprint: str


@functools.lru_cache(maxsize=2)
def _site_file(identity: FileIdentity, label_column: str) -> SiteFile:
    dataset = load_dataset(f"csv:{identity.path}", label_column=label_column)
    logger.info("site data %s read and fingerprinted (%d rows)", identity.path, len(dataset))
    return SiteFile(identity, dataset, dataset_fingerprint(dataset.features, dataset.labels))


def site_file(data_path: str, label_column: str) -> SiteFile:
    """The site's data file, read and fingerprinted once per process while its cheap identity
    stays the same (the warm worker, client/worker.py, reads it before any message comes)."""
    return _site_file(file_identity(data_path), label_column)


@functools.lru_cache(maxsize=4)
def _split_site(name: str, loaded: SiteFile, seed: int, test_fraction: float) -> Site:
    dataset = loaded.dataset
    data = make_site_data(
        dataset.features,
        dataset.labels,
        num_classes=dataset.num_classes,
        kind=dataset.kind,
        test_fraction=test_fraction,
        seed=seed,
    )
    return Site(name=name, data=data, fingerprint=loaded.fingerprint)


def deployed_site(
    name: str, data_path: str, label_column: str, seed: int, test_fraction: float
) -> Site:
    """A real site's data: its file (re-read only when it changed), split and scaled on its own
    training rows with the run's seed and test fraction."""
    return _split_site(name, site_file(data_path, label_column), seed, test_fraction)


def resolve_site(cfg: FedvaultConfig, config_toml: str, node_config: Mapping[str, object]) -> Site:
    """The site behind this SuperNode.

    A simulated SuperNode has ``partition-id``/``num-partitions`` in its node config and
    takes its share of the scenario's dataset; a real site's SuperNode has ``data-path``
    and ``site-name`` (set by ``fedvault client start``) and reads only its own file.
    """
    if "data-path" in node_config:
        label = str(node_config.get("label-column", "") or cfg.data.label_column)
        if not label:
            raise ConfigError("the site's node config has no label-column")
        return deployed_site(
            str(node_config.get("site-name", "site")),
            str(node_config["data-path"]),
            label,
            cfg.seed,
            cfg.data.test_fraction,
        )
    if "partition-id" in node_config:
        partition_id = int(str(node_config["partition-id"]))
        num_partitions = int(str(node_config.get("num-partitions", cfg.federation.sites)))
        if num_partitions != cfg.federation.sites:
            raise ConfigError(
                f"the simulation has {num_partitions} SuperNodes but the scenario "
                f"names {cfg.federation.sites} sites"
            )
        return _simulated_site(config_toml, partition_id, num_partitions)
    raise ConfigError(
        "this SuperNode has neither a data-path (a real site) nor a partition-id (simulation)",
        hint="Start partner sites with `fedvault client start --data PATH`.",
    )
