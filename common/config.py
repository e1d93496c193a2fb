"""Configuration: defaults.toml ⊕ scenario file ⊕ flags, validated once into a frozen dataclass."""

from __future__ import annotations

import re
import tomllib
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import tomli_w

from common.errors import ConfigError

STRATEGIES: tuple[str, ...] = ("fedavg", "fedprox", "fedadam", "trimmed-mean", "median", "krum")
#: Strategies that central DP (privacy.central) may wrap: Flower's accounted central-DP wrapper
#: clips and noises one plain, equally weighted FedAvg mean of the sites' models.
CENTRAL_DP_STRATEGIES: tuple[str, ...] = ("fedavg",)
PARTITIONS: tuple[str, ...] = ("iid", "dirichlet")
MODEL_NAMES: tuple[str, ...] = ("auto", "logistic", "mlp", "cnn")
ACCOUNTANT_NAMES: tuple[str, ...] = ("prv", "rdp")
#: Opacus grad-sample modes (how per-sample gradients are clipped); "auto" lets
#: common/training.py choose per model and batch size. Every mode clips and noises alike.
GRAD_SAMPLE_MODES: tuple[str, ...] = ("auto", "hooks", "ew", "functorch", "ghost")
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


def check_central_dp_strategy(strategy: str) -> None:
    """Refuse central DP (privacy.central) with a strategy it cannot wrap, saying why."""
    if strategy not in CENTRAL_DP_STRATEGIES:
        raise ConfigError(
            f"central DP needs strategy {' or '.join(CENTRAL_DP_STRATEGIES)}, got '{strategy}': "
            "its site-level epsilon is accounted for one clipped, equally weighted FedAvg mean "
            "of the sites' models (fedadam adds a server optimizer step on it; fedprox is not "
            "supported)",
            hint="Use --strategy fedavg, or --no-central-dp.",
        )


def _check_robust_strategy(federation: FederationConfig) -> None:
    """Refuse robust-aggregation settings that could not resist a single bad site."""
    sites, strategy = federation.sites, federation.strategy
    if strategy == "krum":
        f = federation.krum_byzantine
        if not 2 * f + 2 < sites:
            raise ConfigError(
                f"krum needs 2 × krum_byzantine + 2 < sites, got 2 × {f} + 2 = {2 * f + 2} "
                f"with {sites} sites",
                hint="Krum tolerates f bad sites among more than 2f + 2: add sites or lower "
                "krum-byzantine in [federation].",
            )
    if strategy == "trimmed-mean" and int(federation.trim_fraction * sites) < 1:
        raise ConfigError(
            f"trimmed-mean needs trim_fraction × sites >= 1 to trim any update, got "
            f"{federation.trim_fraction:g} × {sites} = {federation.trim_fraction * sites:g}",
            hint="Raise trim-fraction in [federation] (below 0.5; e.g. 0.34 for 3 sites); "
            "trimmed-mean needs at least 3 sites.",
        )


def _kebab(key: str) -> str:
    return key.replace("_", "-")


def load_defaults() -> dict[str, Any]:
    """The defaults shipped in common/defaults.toml, as a raw dict."""
    text = resources.files("common").joinpath("defaults.toml").read_text(encoding="utf-8")
    return tomllib.loads(text)


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
        raise ConfigError(f"scenario file {path} is not valid TOML: {err}") from err


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


def build_config(*layers: Mapping[str, Any]) -> FedvaultConfig:
    """Validate defaults ⊕ ``layers`` (scenario, then flags) into a FedvaultConfig."""
    raw: dict[str, Any] = load_defaults()
    for layer in layers:
        raw = merge(raw, layer)
    return parse(raw)


def parse_toml_text(text: str) -> FedvaultConfig:
    """Validate a TOML string (as carried in Flower's run config) over the defaults."""
    try:
        layer = tomllib.loads(text) if text.strip() else {}
    except tomllib.TOMLDecodeError as err:
        raise ConfigError(f"run configuration is not valid TOML: {err}") from err
    return build_config(layer)


#: The `fedvault simulate`/`run` flag that sets a setting, so that a message names what the
#: user wrote: "--delta" or "target-delta" in [privacy], never only its Python name.
FLAG_OF: dict[tuple[str, str], str] = {
    ("", "seed"): "--seed",
    ("federation", "sites"): "--sites",
    ("federation", "rounds"): "--rounds",
    ("federation", "min-sites"): "--min-sites",
    ("federation", "strategy"): "--strategy",
    ("data", "dataset"): "--dataset",
    ("data", "label-column"): "--label-column",
    ("data", "partition"): "--partition",
    ("data", "alpha"): "--alpha",
    ("model", "name"): "--model",
    ("privacy", "target-epsilon"): "--epsilon",
    ("privacy", "noise-multiplier"): "--noise-multiplier",
    ("privacy", "target-delta"): "--delta",
    ("privacy", "central-noise-multiplier"): "--central-noise-multiplier",
    ("privacy", "central-clipping-norm"): "--central-clipping-norm",
}


def user_words(section: str, key: str) -> str:
    """Where a user sets ``key``: " (--delta, or target-delta in [privacy])"."""
    where = f"{key} in [{section}]" if section else f"{key} at the top level"
    flag = FLAG_OF.get((section, key))
    return f" ({flag}, or {where})" if flag else f" ({where})"


class _Section:
    """Typed, range-checked access to one TOML table; unknown keys are errors."""

    def __init__(self, raw: Mapping[str, Any], name: str, known: tuple[str, ...]) -> None:
        self.raw, self.name = raw, name
        unknown = sorted(set(raw) - set(known))
        if unknown:
            where = f"[{name}]" if name else "the top level"
            raise ConfigError(
                f"unknown setting '{unknown[0]}' in {where}; known: {', '.join(known)}"
            )

    def _label(self, key: str) -> str:
        return self.name if key == "name" and self.name else key.replace("-", "_")

    def get(self, key: str, kind: type | tuple[type, ...]) -> Any:
        if key not in self.raw:
            raise ConfigError(f"setting '{self.name}.{key}' is missing")
        value = self.raw[key]
        ok = isinstance(value, kind) and not (isinstance(value, bool) and kind in (int, float))
        if kind is float and isinstance(value, int) and not isinstance(value, bool):
            value, ok = float(value), True
        if not ok:
            expected = (
                kind.__name__ if isinstance(kind, type) else "/".join(k.__name__ for k in kind)
            )
            raise ConfigError(
                f"{self._label(key)} must be {'an' if expected[0] in 'aeiou' else 'a'} "
                f"{expected}, got {value!r}" + user_words(self.name, key)
            )
        return value

    def number(
        self,
        key: str,
        kind: type,
        *,
        low: float,
        low_open: bool = False,
        high: float | None = None,
        high_open: bool = False,
    ) -> Any:
        value = self.get(key, kind)
        bad_low = value <= low if low_open else value < low
        bad_high = high is not None and (value >= high if high_open else value > high)
        if bad_low or bad_high:
            if high is None:
                rule = f"> {low}" if low_open else f">= {low}"
            else:
                left, right = "(" if low_open else "[", ")" if high_open else "]"
                rule = f"in {left}{low}, {high}{right}"
            raise ConfigError(
                f"{self._label(key)} must be {rule}, got {value}" + user_words(self.name, key)
            )
        return value

    def choice(self, key: str, choices: tuple[str, ...]) -> str:
        value = self.get(key, str)
        if value not in choices:
            raise ConfigError(
                f"unknown {self._label(key)} '{value}'{user_words(self.name, key)}; "
                f"choose one of: {', '.join(choices)}"
            )
        return str(value)


def _table(raw: Mapping[str, Any], key: str) -> Mapping[str, Any]:
    value = raw.get(key, {})
    if not isinstance(value, Mapping):
        raise ConfigError(f"'{key}' must be a TOML table ([{key}]), got {value!r}")
    return value


def parse(raw: Mapping[str, Any]) -> FedvaultConfig:
    """Validate a complete raw configuration (defaults already merged in)."""
    sections = ("federation", "data", "model", "training", "privacy", "simulation", "validation")
    top = _Section(raw, "", ("name", "seed", *sections))

    fed = _Section(
        _table(raw, "federation"),
        "federation",
        (
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
    )
    sites = fed.number("sites", int, low=1)
    names = tuple(fed.get("site-names", list))
    if names:
        if len(names) != sites:
            raise ConfigError(f"site_names must name all {sites} sites, got {len(names)} names")
        for site in names:
            if not isinstance(site, str) or not _SITE_NAME.match(site):
                raise ConfigError(
                    f"site name {site!r} must be 1-64 letters, digits, '.', '_' or '-'"
                )
        if len(set(names)) != len(names):
            raise ConfigError(f"site_names must be unique, got {list(names)}")
    federation = FederationConfig(
        sites=sites,
        site_names=names,
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
    if federation.min_sites > sites:
        raise ConfigError(
            f"min_sites must be <= sites ({sites}), got {federation.min_sites}"
            + user_words("federation", "min-sites"),
            hint="min-sites is how many sites' updates a round needs to count.",
        )
    _check_robust_strategy(federation)

    dat = _Section(
        _table(raw, "data"),
        "data",
        ("dataset", "label-column", "partition", "alpha", "test-fraction", "data-dir"),
    )
    dataset = dat.get("dataset", str).strip()
    if not dataset:
        raise ConfigError("dataset must not be empty")
    data = DataConfig(
        dataset=dataset,
        label_column=dat.get("label-column", str),
        partition=dat.choice("partition", PARTITIONS),
        alpha=dat.number("alpha", float, low=0, low_open=True),
        test_fraction=dat.number(
            "test-fraction", float, low=0, low_open=True, high=1, high_open=True
        ),
        data_dir=dat.get("data-dir", str),
    )
    if dataset.startswith("csv:") and not data.label_column:
        raise ConfigError(
            f"dataset '{dataset}' needs a label column",
            hint="Pass --label-column NAME (or set label-column in [data]).",
        )

    mod = _Section(_table(raw, "model"), "model", ("name",))
    model = ModelConfig(name=mod.choice("name", MODEL_NAMES))

    tra = _Section(
        _table(raw, "training"),
        "training",
        ("local-epochs", "batch-size", "learning-rate", "momentum", "device", "grad-sample-mode"),
    )
    device = tra.get("device", str)
    if not _DEVICE.match(device):
        raise ConfigError(f"device must be auto, cpu, cuda or cuda:N, got '{device}'")
    training = TrainingConfig(
        local_epochs=tra.number("local-epochs", int, low=1),
        batch_size=tra.number("batch-size", int, low=1),
        learning_rate=tra.number("learning-rate", float, low=0, low_open=True),
        momentum=tra.number("momentum", float, low=0, high=1, high_open=True),
        device=device,
        grad_sample_mode=tra.choice("grad-sample-mode", GRAD_SAMPLE_MODES),
    )

    pri = _Section(
        _table(raw, "privacy"),
        "privacy",
        (
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
    )
    enabled = bool(pri.get("enabled", bool))
    target_epsilon = noise_multiplier = None
    if "target-epsilon" in pri.raw and "noise-multiplier" in pri.raw:
        raise ConfigError(
            "set either target_epsilon or noise_multiplier, not both",
            hint="target-epsilon calibrates the noise for you; noise-multiplier fixes sigma.",
        )
    if "target-epsilon" in pri.raw:
        target_epsilon = pri.number("target-epsilon", float, low=0, low_open=True)
        if target_epsilon > MAX_MEANINGFUL_EPSILON:
            raise ConfigError(
                f"target_epsilon must be <= {MAX_MEANINGFUL_EPSILON:g}, got {target_epsilon:g}"
                + user_words("privacy", "target-epsilon"),
                hint="Above that DP protects nothing; use --no-dp for a non-private baseline.",
            )
    elif "noise-multiplier" in pri.raw:
        noise_multiplier = pri.number("noise-multiplier", float, low=0, low_open=True)
    elif enabled:
        raise ConfigError(
            "privacy is enabled but neither target_epsilon nor noise_multiplier is set"
        )
    privacy = PrivacyConfig(
        enabled=enabled,
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
    if privacy.central:
        check_central_dp_strategy(federation.strategy)

    sim = _Section(_table(raw, "simulation"), "simulation", ("cpus-per-site",))
    simulation = SimulationConfig(
        cpus_per_site=sim.number("cpus-per-site", float, low=0, low_open=True)
    )

    val = _Section(
        _table(raw, "validation"), "validation", ("enabled", "max-update-norm", "max-site-rows")
    )
    validation = ValidationConfig(
        enabled=bool(val.get("enabled", bool)),
        max_update_norm=val.number("max-update-norm", float, low=0),
        max_site_rows=val.number("max-site-rows", int, low=1),
    )

    name = top.get("name", str)
    if not _SITE_NAME.match(name):
        raise ConfigError(f"name must be 1-64 letters, digits, '.', '_' or '-', got {name!r}")
    return FedvaultConfig(
        name=name,
        seed=top.number("seed", int, low=0),
        federation=federation,
        data=data,
        model=model,
        training=training,
        privacy=privacy,
        simulation=simulation,
        validation=validation,
    )
