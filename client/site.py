"""Which site this ClientApp is and where its data comes from (simulation or a real site)."""

from __future__ import annotations

import functools
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from common.config import FedvaultConfig
from common.data import load_dataset
from common.errors import ConfigError
from common.fingerprint import dataset_fingerprint
from common.partition import SiteData, make_site_data, partition_indices, site_data_for


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
    from common.config import parse_toml_text

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


@functools.lru_cache(maxsize=4)
def _deployed_site(
    name: str, data_path: str, label_column: str, seed: int, test_fraction: float
) -> Site:
    dataset = load_dataset(f"csv:{data_path}", label_column=label_column, seed=seed)
    data = make_site_data(
        dataset.features,
        dataset.labels,
        num_classes=dataset.num_classes,
        kind=dataset.kind,
        test_fraction=test_fraction,
        seed=seed,
    )
    return Site(
        name=name, data=data, fingerprint=dataset_fingerprint(dataset.features, dataset.labels)
    )


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
        return _deployed_site(
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
