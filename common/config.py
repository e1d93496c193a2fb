"""Configuration: defaults.toml ⊕ scenario file ⊕ flags, validated once into a frozen dataclass."""

from __future__ import annotations

import re
import tomllib
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import tomli_w

from fedvault.common.config_values import Origins, Problems, Section, load_defaults, table
from fedvault.common.errors import ConfigError
from fedvault.common.registry import ACCOUNTANTS
from fedvault.common.registry import STRATEGIES as STRATEGY_REGISTRY

#: Names of the strategies and accountants a run may use (common/registry.py holds them).
STRATEGIES: tuple[str, ...] = STRATEGY_REGISTRY.names
#: Strategies that central DP (privacy.central) may wrap: Flower's accounted central-DP wrapper
#: clips and noises one plain, equally weighted FedAvg mean of the sites' models.
CENTRAL_DP_STRATEGIES: tuple[str, ...] = ("fedavg",)
PARTITIONS: tuple[str, ...] = ("iid", "dirichlet")
MODEL_NAMES: tuple[str, ...] = ("auto", "logistic", "mlp", "cnn")
ACCOUNTANT_NAMES: tuple[str, ...] = ACCOUNTANTS.names
#: How per-sample gradients are clipped: "bk" (common/bk_dpsgd.py, for models of Linear and
#: Conv2d layers) or an Opacus grad-sample mode; "auto" lets common/training.py choose per
#: model and batch size (bk where it applies). Every mode clips and noises alike.
GRAD_SAMPLE_MODES: tuple[str, ...] = ("auto", "bk", "hooks", "ew", "functorch", "ghost")
#: Above this epsilon DP-SGD offers no meaningful protection, and Opacus' PRV accountant
#: needs minutes and gigabytes (its domain grows with epsilon): fedvault reports the RDP
#: upper bound there instead, and refuses to calibrate noise for a larger target.
MAX_MEANINGFUL_EPSILON = 50.0
_SITE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
_DEVICE = re.compile(r"^(auto|cpu|cuda|cuda:\d+)$")


@dataclass(frozen=True, kw_only=True)
class FederationConfig:
    sites: int
    site_names: tuple[str, ...]
    rounds: int
    strategy: str
    proximal_mu: float
    server_learning_rate: float
    round_timeout: float
    min_sites: int
    connect_timeout: float
    trim_fraction: float
    krum_byzantine: int


@dataclass(frozen=True, kw_only=True)
class DataConfig:
    dataset: str
    label_column: str
    partition: str
    alpha: float
    test_fraction: float
    data_dir: str


@dataclass(frozen=True, kw_only=True)
class ModelConfig:
    name: str


@dataclass(frozen=True, kw_only=True)
class TrainingConfig:
    local_epochs: int
    batch_size: int
    learning_rate: float
    momentum: float
    device: str
    grad_sample_mode: str


@dataclass(frozen=True, kw_only=True)
class PrivacyConfig:
    enabled: bool
    target_epsilon: float | None
    noise_multiplier: float | None
    target_delta: float
    max_grad_norm: float
    accountant: str
    central: bool
    central_noise_multiplier: float
    central_clipping_norm: float


@dataclass(frozen=True, kw_only=True)
class SimulationConfig:
    cpus_per_site: float


@dataclass(frozen=True, kw_only=True)
class ValidationConfig:
    """How the coordinator checks each site's update before aggregating it."""

    enabled: bool
    #: > 0: the L2 bound on ‖site model − global model‖; 0: derived from the DP-SGD settings
    #: when DP is on (common/validation.py), no norm check otherwise.
    max_update_norm: float
    #: A site's training rows, as counted for aggregation weights and its update bound, are
    #: those it reported at the schema step, capped at this.
    max_site_rows: int


@dataclass(frozen=True, kw_only=True)
class FedvaultConfig:
    """The whole, validated configuration of one federated run."""

    name: str
    seed: int
    federation: FederationConfig
    data: DataConfig
    model: ModelConfig
    training: TrainingConfig
    privacy: PrivacyConfig
    simulation: SimulationConfig
    validation: ValidationConfig

    def site_name(self, index: int) -> str:
        """Name of the site with 0-based ``index``."""
        names = self.federation.site_names
        return names[index] if names else f"site-{index + 1}"

    def to_toml(self) -> str:
        """The effective configuration as TOML (kebab-case keys), re-readable by ``parse``."""
        raw: dict[str, Any] = {}
        for key, value in asdict(self).items():
            if isinstance(value, dict):
                raw[_kebab(key)] = {
                    _kebab(k): list(v) if isinstance(v, tuple) else v
                    for k, v in value.items()
                    if v is not None
                }
            else:
                raw[_kebab(key)] = value
        return tomli_w.dumps(raw)


def check_central_dp_strategy(
    strategy: str, *, central: str = "central DP", strategy_setting: str = "strategy"
) -> None:
    """Refuse central DP with a strategy it cannot wrap, saying why (settings as given)."""
    if strategy not in CENTRAL_DP_STRATEGIES:
        raise ConfigError(
            f"{central} needs {strategy_setting} {' or '.join(CENTRAL_DP_STRATEGIES)}, got "
            f"'{strategy}': its site-level epsilon is accounted for one clipped, equally "
            "weighted FedAvg mean of the sites' models (fedadam adds a server optimizer step "
            "on it; fedprox is not supported)",
            hint="Use --strategy fedavg, or --no-central-dp.",
            setting=central,
        )


def _check_robust_strategy(federation: FederationConfig, origins: Origins) -> None:
    """Refuse robust-aggregation settings that could not resist a single bad site."""
    sites, strategy = federation.sites, federation.strategy
    if strategy == "krum":
        f = federation.krum_byzantine
        byzantine = origins.name("federation", "krum-byzantine")
        if not 2 * f + 2 < sites:
            raise ConfigError(
                f"krum needs 2 × {byzantine} + 2 < sites, got 2 × {f} + 2 = {2 * f + 2} "
                f"with {sites} sites",
                hint="Krum tolerates f bad sites among more than 2f + 2: add sites or lower "
                "krum-byzantine in [federation].",
                setting=byzantine,
            )
    if strategy == "trimmed-mean" and int(federation.trim_fraction * sites) < 1:
        trim = origins.name("federation", "trim-fraction")
        raise ConfigError(
            f"trimmed-mean needs {trim} × sites >= 1 to trim any update, got "
            f"{federation.trim_fraction:g} × {sites} = {federation.trim_fraction * sites:g}",
            hint="Raise trim-fraction in [federation] (below 0.5; e.g. 0.34 for 3 sites); "
            "trimmed-mean needs at least 3 sites.",
            setting=trim,
        )


def _kebab(key: str) -> str:
    return key.replace("_", "-")


def read_toml(path: Path) -> dict[str, Any]:
    """Read a scenario TOML file into a raw dict, with one-line errors."""
    path = path.expanduser()
    if not path.is_file():
        raise ConfigError(
            f"scenario file not found: {path}", hint="See simulations/*.toml for examples."
        )
    try:
        return tomllib.loads(path.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as err:
        raise ConfigError(
            f"scenario file {path} is not valid TOML: {err}",
            hint="Fix the TOML at the line and column shown: a table is a [name] line, a "
            'setting key = value, text in "quotes"; simulations/*.toml are examples.',
        ) from err


def merge(base: Mapping[str, Any], override: Mapping[str, Any]) -> dict[str, Any]:
    """Deep-merge ``override`` into ``base``.

    ``privacy.target-epsilon`` and ``privacy.noise-multiplier`` are alternatives: the layer
    that sets one of them removes the other inherited from below.
    """
    merged: dict[str, Any] = dict(base)
    for key, value in override.items():
        if isinstance(value, Mapping) and isinstance(merged.get(key), Mapping):
            section = dict(merged[key])
            if key == "privacy":
                if "noise-multiplier" in value and "target-epsilon" not in value:
                    section.pop("target-epsilon", None)
                if "target-epsilon" in value and "noise-multiplier" not in value:
                    section.pop("noise-multiplier", None)
            merged[key] = merge(section, value)
        else:
            merged[key] = value
    return merged


def build_config(
    *layers: Mapping[str, Any], flags: Mapping[str, Any] | None = None
) -> FedvaultConfig:
    """Validate defaults ⊕ ``layers`` (scenario files, run config) ⊕ ``flags`` into a config.

    ``flags`` is the command line's layer (``fedvault.cli.options.flags_layer``): a message about
    a setting it set names the flag (``--delta``), any other the TOML key
    (``[privacy] target-delta``).
    """
    raw: dict[str, Any] = load_defaults()
    for layer in layers:
        raw = merge(raw, layer)
    if flags:
        raw = merge(raw, flags)
    return parse(raw, origins=Origins.of_flags(flags))


def parse_toml_text(text: str) -> FedvaultConfig:
    """Validate a TOML string (as carried in Flower's run config) over the defaults."""
    try:
        layer = tomllib.loads(text) if text.strip() else {}
    except tomllib.TOMLDecodeError as err:
        raise ConfigError(f"run configuration is not valid TOML: {err}") from err
    return build_config(layer)


#: The keys of each scenario table, as common/defaults.toml lists them.
SECTION_KEYS: dict[str, tuple[str, ...]] = {
    "federation": (
        "sites",
        "site-names",
        "rounds",
        "strategy",
        "proximal-mu",
        "server-learning-rate",
        "round-timeout",
        "min-sites",
        "connect-timeout",
        "trim-fraction",
        "krum-byzantine",
    ),
    "data": ("dataset", "label-column", "partition", "alpha", "test-fraction", "data-dir"),
    "model": ("name",),
    "training": (
        "local-epochs",
        "batch-size",
        "learning-rate",
        "momentum",
        "device",
        "grad-sample-mode",
    ),
    "privacy": (
        "enabled",
        "target-epsilon",
        "noise-multiplier",
        "target-delta",
        "max-grad-norm",
        "accountant",
        "central",
        "central-noise-multiplier",
        "central-clipping-norm",
    ),
    "simulation": ("cpus-per-site",),
    "validation": ("enabled", "max-update-norm", "max-site-rows"),
}


def parse(raw: Mapping[str, Any], *, origins: Origins | None = None) -> FedvaultConfig:
    """Validate a complete raw configuration (defaults already merged in).

    ``origins`` says which settings came from flags, so that messages name them as given.
    Every bad setting is reported at once; the rules between settings (min-sites <= sites,
    krum's sites, central DP's strategy ...) are checked once each setting is valid.
    """
    origins = origins or Origins()
    problems = Problems()

    def section(name: str) -> Section:
        return Section(table(raw, name, problems), name, SECTION_KEYS[name], origins, problems)

    top = Section(raw, "", ("name", "seed", *SECTION_KEYS), origins, problems)
    federation = _parse_federation(section("federation"))
    dat = section("data")
    data = _parse_data(dat)
    model = ModelConfig(name=section("model").choice("name", MODEL_NAMES))
    training = _parse_training(section("training"))
    pri = section("privacy")
    privacy = _parse_privacy(pri)
    simulation = SimulationConfig(
        cpus_per_site=section("simulation").number("cpus-per-site", float, low=0, low_open=True)
    )
    validation = _parse_validation(section("validation"))
    name, seed = _parse_run_name_and_seed(top)
    problems.raise_if_any()

    _check_rules_between_settings(federation, data, dat, privacy, pri, origins)
    return FedvaultConfig(
        name=name,
        seed=seed,
        federation=federation,
        data=data,
        model=model,
        training=training,
        privacy=privacy,
        simulation=simulation,
        validation=validation,
    )


def _parse_data(dat: Section) -> DataConfig:
    dataset = dat.get("dataset", str).strip()
    if not dataset:
        dataset = dat.reject(
            "dataset", f"{dat.words('dataset')} must not be empty", "that names data"
        )
    return DataConfig(
        dataset=dataset,
        label_column=dat.get("label-column", str),
        partition=dat.choice("partition", PARTITIONS),
        alpha=dat.number("alpha", float, low=0, low_open=True),
        test_fraction=dat.number(
            "test-fraction", float, low=0, low_open=True, high=1, high_open=True
        ),
        data_dir=dat.get("data-dir", str),
    )


def _parse_training(tra: Section) -> TrainingConfig:
    device = tra.get("device", str)
    if not _DEVICE.match(device):
        device = tra.reject(
            "device",
            f"{tra.words('device')} must be auto, cpu, cuda or cuda:N, got {device!r}",
            "among auto, cpu, cuda, cuda:N",
        )
    return TrainingConfig(
        local_epochs=tra.number("local-epochs", int, low=1),
        batch_size=tra.number("batch-size", int, low=1),
        learning_rate=tra.number("learning-rate", float, low=0, low_open=True),
        momentum=tra.number("momentum", float, low=0, high=1, high_open=True),
        device=device,
        grad_sample_mode=tra.choice("grad-sample-mode", GRAD_SAMPLE_MODES),
    )


def _parse_validation(val: Section) -> ValidationConfig:
    return ValidationConfig(
        enabled=bool(val.get("enabled", bool)),
        max_update_norm=val.number("max-update-norm", float, low=0),
        max_site_rows=val.number("max-site-rows", int, low=1),
    )


def _parse_run_name_and_seed(top: Section) -> tuple[str, int]:
    name = top.get("name", str)
    if not _SITE_NAME.match(name):
        name = top.reject(
            "name",
            f"name must be 1-64 letters, digits, '.', '_' or '-', got {name!r}",
            "of 1-64 letters, digits, '.', '_' or '-' (it names the run directory)",
        )
    return name, top.number("seed", int, low=0)


def _check_rules_between_settings(
    federation: FederationConfig,
    data: DataConfig,
    dat: Section,
    privacy: PrivacyConfig,
    pri: Section,
    origins: Origins,
) -> None:
    """The rules that tie settings together, checked once each setting is valid on its own."""
    _check_federation(federation, origins)
    if data.dataset.startswith("csv:") and not data.label_column:
        raise ConfigError(
            f"{dat.words('dataset')} '{data.dataset}' needs a label column",
            hint="Pass --label-column NAME (or set label-column in [data]).",
            setting=dat.words("label-column"),
        )
    _check_privacy(pri)
    if privacy.central:
        check_central_dp_strategy(
            federation.strategy,
            central=origins.name("privacy", "central"),
            strategy_setting=origins.name("federation", "strategy"),
        )


def _parse_federation(fed: Section) -> FederationConfig:
    """The [federation] table, each setting on its own (rules between them come later)."""
    return FederationConfig(
        sites=fed.number("sites", int, low=1),
        site_names=tuple(fed.get("site-names", list)),
        rounds=fed.number("rounds", int, low=1),
        strategy=fed.choice("strategy", STRATEGIES),
        proximal_mu=fed.number("proximal-mu", float, low=0),
        server_learning_rate=fed.number("server-learning-rate", float, low=0, low_open=True),
        round_timeout=fed.number("round-timeout", float, low=0, low_open=True),
        min_sites=fed.number("min-sites", int, low=1),
        connect_timeout=fed.number("connect-timeout", float, low=0, low_open=True),
        trim_fraction=fed.number("trim-fraction", float, low=0, high=0.5, high_open=True),
        krum_byzantine=fed.number("krum-byzantine", int, low=0),
    )


def _check_federation(federation: FederationConfig, origins: Origins) -> None:
    """The rules between [federation] settings: site names, min-sites, robust strategies."""
    sites = federation.sites
    _check_site_names(
        federation.site_names, sites, site_names=origins.name("federation", "site-names")
    )
    if federation.min_sites > sites:
        min_sites = origins.name("federation", "min-sites")
        raise ConfigError(
            f"{min_sites} must be <= the number of sites ({sites}), got {federation.min_sites}",
            hint="min-sites is how many sites' updates a round needs to count: at most "
            f"{sites} here.",
            setting=min_sites,
        )
    _check_robust_strategy(federation, origins)


def _check_site_names(names: tuple[Any, ...], sites: int, *, site_names: str) -> None:
    """site-names, when given, name every site once, each a simple identifier."""
    if not names:
        return
    hint = f"List one name per site in {site_names}, or remove it (site-1, site-2, ...)."
    if len(names) != sites:
        raise ConfigError(
            f"{site_names} must name all {sites} sites, got {len(names)} names",
            hint=hint,
            setting=site_names,
        )
    for site in names:
        if not isinstance(site, str) or not _SITE_NAME.match(site):
            raise ConfigError(
                f"site name {site!r} in {site_names} must be 1-64 letters, digits, '.', '_' or '-'",
                hint=hint,
                setting=site_names,
            )
    repeated = sorted({site for site in names if names.count(site) > 1})
    if repeated:
        raise ConfigError(
            f"{site_names} must be unique, got {', '.join(map(repr, repeated))} more than once",
            hint=hint,
            setting=site_names,
        )


def _parse_privacy(pri: Section) -> PrivacyConfig:
    """The [privacy] table: DP-SGD's ε or σ, δ, clipping, accountant; central DP."""
    target_epsilon = noise_multiplier = None
    if "target-epsilon" in pri.raw:
        target_epsilon = pri.number("target-epsilon", float, low=0, low_open=True)
        if target_epsilon > MAX_MEANINGFUL_EPSILON:
            target_epsilon = pri.reject(
                "target-epsilon",
                f"{pri.words('target-epsilon')} must be <= {MAX_MEANINGFUL_EPSILON:g}, got "
                f"{target_epsilon:g}",
                f"in (0, {MAX_MEANINGFUL_EPSILON:g}]",
                hint="Above that DP protects nothing; use --no-dp for a non-private baseline.",
            )
    if "noise-multiplier" in pri.raw:
        noise_multiplier = pri.number("noise-multiplier", float, low=0, low_open=True)
    return PrivacyConfig(
        enabled=bool(pri.get("enabled", bool)),
        target_epsilon=target_epsilon,
        noise_multiplier=noise_multiplier,
        target_delta=pri.number(
            "target-delta", float, low=0, low_open=True, high=1, high_open=True
        ),
        max_grad_norm=pri.number("max-grad-norm", float, low=0, low_open=True),
        accountant=pri.choice("accountant", ACCOUNTANT_NAMES),
        central=bool(pri.get("central", bool)),
        central_noise_multiplier=pri.number(
            "central-noise-multiplier", float, low=0, low_open=True
        ),
        central_clipping_norm=pri.number("central-clipping-norm", float, low=0, low_open=True),
    )


def _check_privacy(pri: Section) -> None:
    """The rule between [privacy] settings: DP-SGD needs one of target-epsilon and
    noise-multiplier, not both."""
    epsilon_name, sigma_name = pri.words("target-epsilon"), pri.words("noise-multiplier")
    if "target-epsilon" in pri.raw and "noise-multiplier" in pri.raw:
        raise ConfigError(
            f"set only one of {epsilon_name} and {sigma_name}, not both",
            hint="target-epsilon calibrates the noise for you; noise-multiplier fixes sigma.",
            setting=epsilon_name,
        )
    if pri.raw.get("enabled") and not ({"target-epsilon", "noise-multiplier"} & set(pri.raw)):
        raise ConfigError(
            f"{pri.words('enabled')} is true but neither {epsilon_name} nor {sigma_name} is set",
            hint="Set target-epsilon (or noise-multiplier) in [privacy], or pass --epsilon; "
            "--no-dp trains without privacy.",
            setting=epsilon_name,
        )
