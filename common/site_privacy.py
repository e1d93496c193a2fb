"""A site's own privacy gate: plan sigma against its remaining budget, reserve each round first.

Everything here runs at the site, on the site's settings; the coordinator never chooses a
site's ledger or its ``max_epsilon``. The gate composes three things:

- the run's own target (``target_epsilon`` of the run's config: what the coordinator asked
  for, a cap on this run's share);
- the site's lifetime cap per dataset (``max_epsilon``, the site's own setting), over the
  whole history in its ledger (every run, every round);
- write-ahead: a round is reserved in the ledger, durably, before training starts.
"""

from __future__ import annotations

import functools
import json
import logging
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fedvault.common.config_values import site_default
from fedvault.common.errors import ConfigError, PrivacyBudgetExceeded, SiteRefusal
from fedvault.common.registry import ACCOUNTANTS

# The ledger and the accountants (Opacus, torch) are imported where a site plans, reserves or
# reads its budget: `fedvault simulate` builds its SimulatedSitePolicy without them.
if TYPE_CHECKING:
    from fedvault.common.ledger import PrivacyLedger
    from fedvault.common.privacy import PrivacyEvent

logger = logging.getLogger(__name__)

#: A site spends its last budget with at most this many times the noise the run itself
#: asked for; past that its update would be mostly noise, so it trains at this inflation
#: until the ledger refuses the next round.
MAX_NOISE_INFLATION = 4.0
_ALL_SITES = "*"
_SPEC = re.compile(r"^(?:(?P<site>[^=\s]+)=)?(?P<value>[^=\s]+)$")


def parse_site_max_epsilon(values: Sequence[str], site_names: Sequence[str]) -> dict[str, float]:
    """``--site-max-epsilon`` values (``E`` for every site, ``SITE=E`` for one) as a mapping.

    The key ``*`` holds the value for every site not named.
    """
    out: dict[str, float] = {}
    for text in values:
        match = _SPEC.match(text.strip())
        if not match:
            raise ConfigError(
                f"--site-max-epsilon takes E or SITE=E, got {text!r}",
                hint="e.g. --site-max-epsilon 3 --site-max-epsilon hospital-b=1.5",
            )
        site = match["site"] or _ALL_SITES
        if site != _ALL_SITES and site not in site_names:
            raise ConfigError(
                f"--site-max-epsilon names site {site!r}, which is not in this simulation",
                hint=f"Sites: {', '.join(site_names)}",
            )
        try:
            value = float(match["value"])
        except ValueError:
            value = math.nan
        if not (math.isfinite(value) and value > 0):
            raise ConfigError(
                f"--site-max-epsilon must be > 0, got {match['value']!r} in {text!r}",
                hint="Give each site's lifetime ε cap as a positive number: "
                "--site-max-epsilon 3, or --site-max-epsilon hospital-b=1.5 for one site.",
            )
        out[site] = value
    return out


@dataclass(frozen=True)
class SimulatedSitePolicy:
    """Simulated sites' own settings: where their ledgers live and their epsilon caps.

    A real site reads its ledger path and ``max_epsilon`` from its SuperNode's node config
    (set by ``fedvault client start``); a simulated site has no such config, so
    ``fedvault simulate`` passes this through the run config, which only simulated sites read.
    """

    ledger_dir: str = ""
    max_epsilon: Mapping[str, float] = field(default_factory=dict)

    def run_config(self) -> dict[str, str]:
        """The run config entries that carry this policy."""
        return {
            "simulated-ledger-dir": self.ledger_dir,
            "simulated-site-max-epsilon": json.dumps(dict(self.max_epsilon), sort_keys=True),
        }

    @classmethod
    def from_run_config(cls, run_config: Mapping[str, object]) -> SimulatedSitePolicy:
        """The policy back from a run config (empty values mean defaults)."""
        text = str(run_config.get("simulated-site-max-epsilon", "") or "{}")
        try:
            raw = json.loads(text)
            caps = {str(k): float(v) for k, v in raw.items()}
            if not all(math.isfinite(v) and v > 0 for v in caps.values()):
                raise ValueError("caps must be > 0")
        except (ValueError, TypeError, AttributeError) as err:
            raise ConfigError(f"simulated-site-max-epsilon is not a JSON object: {text!r}") from err
        return cls(
            ledger_dir=str(run_config.get("simulated-ledger-dir", "") or ""), max_epsilon=caps
        )

    def ledger_path(self, site: str) -> Path:
        """The simulated site's ledger file."""
        if not self.ledger_dir:
            raise ConfigError(
                "this simulated site has no ledger folder",
                hint="Run simulations with `fedvault simulate` (it gives every site a ledger).",
            )
        return Path(self.ledger_dir) / f"{site}.sqlite"

    def max_epsilon_for(self, site: str) -> float | None:
        """The simulated site's lifetime cap, or None when it sets none."""
        return self.max_epsilon.get(site, self.max_epsilon.get(_ALL_SITES))


#: A deployed site's defaults for what it answers per run (its own settings, never the
#: coordinator's): training rounds (each one spends ε) and evaluation replies (they spend no
#: ε but tell the coordinator the model's loss on the site's rows: an un-budgeted channel).
#: All from the [site] table of common/defaults.toml.
DEFAULT_SITE_DELTA: float = site_default("delta")
DEFAULT_SITE_ACCOUNTANT: str = site_default("accountant")
DEFAULT_MAX_ROUNDS_PER_RUN: int = site_default("max-rounds-per-run")
DEFAULT_MAX_EVALUATIONS_PER_RUN: int = site_default("max-evaluations-per-run")


def _node_value(node: Mapping[str, object], key: str, default: object) -> object:
    value = node.get(key, default)
    return default if value == "" else value


def _node_bool(node: Mapping[str, object], key: str) -> bool:
    value = node.get(key, False)
    return value is True or str(value).strip().lower() == "true"


@dataclass(frozen=True, kw_only=True)
class SitePolicy:
    """What a site accepts from a run, set by the site (`fedvault client start`), never the
    coordinator: the δ and accountant its ledger composes at, the models it trains, and how
    many training rounds and evaluation replies it answers per run."""

    delta: float = DEFAULT_SITE_DELTA
    accountant: str = DEFAULT_SITE_ACCOUNTANT
    models: tuple[str, ...] = ()  # empty: every built-in model
    max_rounds_per_run: int | None = DEFAULT_MAX_ROUNDS_PER_RUN
    max_evaluations_per_run: int | None = DEFAULT_MAX_EVALUATIONS_PER_RUN
    allow_non_private: bool = False

    def __post_init__(self) -> None:
        from fedvault.common.models import MODELS

        if not (math.isfinite(self.delta) and 0 < self.delta < 1):
            raise ConfigError(f"the site's delta must be in (0, 1), got {self.delta!r}")
        if self.accountant not in ACCOUNTANTS:
            raise ConfigError(
                f"the site's accountant must be one of {', '.join(ACCOUNTANTS.names)}, "
                f"got {self.accountant!r}"
            )
        unknown = [m for m in self.models if m not in MODELS]
        if unknown:
            raise ConfigError(
                f"the site's models must be built-in models ({', '.join(MODELS)}), "
                f"got {', '.join(unknown)}"
            )
        for name in ("max_rounds_per_run", "max_evaluations_per_run"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ConfigError(f"the site's {name} must be >= 1, got {value}")

    @classmethod
    def from_node_config(cls, node: Mapping[str, object]) -> SitePolicy:
        """A deployed site's policy, from its SuperNode's node config (`fedvault client start`)."""
        try:
            models = str(_node_value(node, "models", ""))
            return cls(
                delta=float(str(_node_value(node, "delta", DEFAULT_SITE_DELTA))),
                accountant=str(_node_value(node, "accountant", DEFAULT_SITE_ACCOUNTANT)),
                models=tuple(m.strip() for m in models.split(",") if m.strip()),
                max_rounds_per_run=int(
                    str(_node_value(node, "max-rounds-per-run", DEFAULT_MAX_ROUNDS_PER_RUN))
                ),
                max_evaluations_per_run=int(
                    str(
                        _node_value(
                            node, "max-evaluations-per-run", DEFAULT_MAX_EVALUATIONS_PER_RUN
                        )
                    )
                ),
                allow_non_private=_node_bool(node, "allow-non-private"),
            )
        except ValueError as err:
            raise ConfigError(
                f"the site's node config is malformed: {err}",
                hint="Start partner sites with `fedvault client start`.",
            ) from err

    def check_run(
        self,
        *,
        site: str,
        delta: float,
        accountant: str,
        model: str,
        train_rows: int,
    ) -> None:
        """Refuse (SiteRefusal) a run that asks for what this site does not accept."""
        problems = []
        if delta != self.delta:
            problems.append(
                f"the run asks for delta {delta:g}, the site composes at {self.delta:g}"
            )
        if accountant != self.accountant:
            problems.append(
                f"the run asks for the {accountant} accountant, the site uses {self.accountant}"
            )
        if self.models and model not in self.models:
            problems.append(
                f"the run trains model {model!r}, the site accepts {', '.join(self.models)}"
            )
        if train_rows > 0 and not self.delta < 1 / train_rows:
            problems.append(
                f"the site's delta {self.delta:g} is not below 1 / its {train_rows} training rows"
            )
        if problems:
            raise SiteRefusal(
                f"site {site} refuses this run: " + "; ".join(problems),
                hint="A site's δ, accountant and models are its own settings "
                "(`fedvault client start --delta/--accountant/--models`); run with the "
                "site's values.",
            )


@dataclass(frozen=True, kw_only=True)
class RoundPlan:
    """What a site will train this round: the exact DP-SGD phase, reserved before training."""

    noise_multiplier: float
    sample_rate: float
    steps: int

    @property
    def event(self) -> PrivacyEvent:
        from fedvault.common.privacy import PrivacyEvent

        return PrivacyEvent(self.noise_multiplier, self.sample_rate, self.steps)


@dataclass(frozen=True, kw_only=True)
class LedgerStatus:
    """What a site's train reply tells the coordinator about its ledger (never an entry).

    ``count`` entries whose hash chain ends in ``head``; ``hash_at_seen`` is the chain's hash
    after the first ``seen_count`` entries, the count the coordinator saw last: it equals the
    head the coordinator recorded then unless the history was rewritten. ``datasets`` is the
    number of datasets the site declared (a new one restarts its budget, never silently).
    """

    count: int
    head: str
    seen_count: int
    hash_at_seen: str
    datasets: int

    def record(self) -> dict[str, Any]:
        """As the reply's ``ledger`` record."""
        return {
            "count": self.count,
            "head": self.head,
            "seen-count": self.seen_count,
            "hash-at-seen": self.hash_at_seen,
            "datasets": self.datasets,
        }


@dataclass(frozen=True, kw_only=True)
class Reservation:
    """A reserved round: the dataset's epsilon with it, and this run's share alone."""

    epsilon: float
    run_epsilon: float
    max_epsilon: float | None
    run_steps: int  # DP-SGD steps of this run so far, this round included
    ledger: LedgerStatus


@dataclass(frozen=True, kw_only=True)
class SitePrivacy:
    """One site's privacy gate for one dataset (by fingerprint) and one run."""

    site: str
    ledger_path: Path
    dataset: str
    run_id: str
    max_epsilon: float | None
    delta: float
    accountant: str
    #: Training rounds this site answers per run (its own setting; None: no cap).
    max_rounds_per_run: int | None = None
    #: A fingerprint other than the ledger's current dataset is declared as a new dataset
    #: (simulated sites, and a real site started with `--new-dataset`), else refused.
    new_dataset: bool = False

    def open_ledger(self) -> PrivacyLedger:
        """The site's ledger, checked: its δ and accountant are this gate's (they never
        change), and its current dataset is this one (a changed file is never a fresh budget)."""
        from fedvault.common.ledger import PrivacyLedger

        ledger = PrivacyLedger(self.ledger_path)
        try:
            ledger.fix_policy(delta=self.delta, accountant=self.accountant)
            ledger.declare_dataset(self.dataset, new=self.new_dataset)
        except BaseException:
            ledger.close()
            raise
        return ledger

    def _run_history(self, ledger: PrivacyLedger) -> tuple[list[PrivacyEvent], list[PrivacyEvent]]:
        entries = ledger.entries(self.dataset)
        return [e.event for e in entries], [e.event for e in entries if e.run_id == self.run_id]

    def plan_noise_multiplier(
        self,
        *,
        target_epsilon: float,
        sample_rate: float,
        steps_left: int,
    ) -> float:
        """Sigma for the rest of this run (``steps_left`` steps at ``sample_rate``).

        The smallest sigma with which (a) this run's share stays within ``target_epsilon``
        and (b) the dataset's whole history stays within the site's ``max_epsilon``, but at
        most MAX_NOISE_INFLATION times what (a) alone needs.
        """
        from fedvault.common.privacy import PrivacyEvent, calibrate_after_history, compute_epsilon

        with self.open_ledger() as ledger:
            history, mine = self._run_history(ledger)
        calibrate = functools.partial(
            calibrate_after_history,
            delta=self.delta,
            sample_rate=sample_rate,
            steps=steps_left,
            accountant=self.accountant,
        )
        for_run = calibrate(target_epsilon=target_epsilon, prior=mine)
        sigma = for_run
        planned = PrivacyEvent(for_run, sample_rate, steps_left)
        if self.max_epsilon is not None and self.max_epsilon < compute_epsilon(
            [*history, planned], delta=self.delta, accountant=self.accountant
        ):
            ceiling = MAX_NOISE_INFLATION * for_run
            try:
                fitted = calibrate(
                    target_epsilon=self.max_epsilon, prior=history, max_noise_multiplier=ceiling
                )
                sigma = max(for_run, fitted)
            except PrivacyBudgetExceeded:
                sigma = ceiling  # the ledger refuses each round that would not fit
        if sigma > for_run:
            logger.warning(
                "site %s: noise_multiplier raised from %.3f to %.3f to fit its remaining "
                "budget (max_epsilon %g)",
                self.site,
                for_run,
                sigma,
                self.max_epsilon,
            )
        return sigma

    def reserve(
        self,
        plan: RoundPlan,
        *,
        server_round: int,
        target_epsilon: float | None,
        seen_count: int = 0,
    ) -> Reservation:
        """Record this round in the ledger before training, or refuse it.

        Refuses (PrivacyBudgetExceeded, nothing recorded) when the round would take this
        run past ``target_epsilon`` or the dataset past the site's ``max_epsilon``, and
        (SiteRefusal) a round past the site's ``max_rounds_per_run``. ``seen_count`` is the
        ledger length the coordinator saw last; the reservation's ``ledger`` status answers it.
        """
        from fedvault.common.ledger import LedgerEntry
        from fedvault.common.privacy import compute_epsilon

        entry = LedgerEntry(
            dataset=self.dataset,
            run_id=self.run_id,
            round=server_round,
            noise_multiplier=plan.noise_multiplier,
            sample_rate=plan.sample_rate,
            steps=plan.steps,
            delta=self.delta,
            accountant=self.accountant,
        )
        with self.open_ledger() as ledger:
            entries = ledger.entries(self.dataset)
            mine = [e.event for e in entries if e.run_id == self.run_id]
            rounds = {e.round for e in entries if e.run_id == self.run_id}
            cap = self.max_rounds_per_run
            if cap is not None and server_round not in rounds and len(rounds) >= cap:
                raise SiteRefusal(
                    f"site {self.site} refuses round {server_round}: it trains at most "
                    f"{cap} rounds per run (max-rounds-per-run), and this run had {len(rounds)}",
                    hint="The site's own setting: `fedvault client start --max-rounds-per-run`.",
                )
            run_epsilon = compute_epsilon(
                [*mine, plan.event], delta=self.delta, accountant=self.accountant
            )
            if target_epsilon is not None and run_epsilon > target_epsilon:
                raise PrivacyBudgetExceeded(
                    f"site {self.site} refuses round {server_round}: this run's epsilon would "
                    f"reach {run_epsilon:.3f}, above the run's target_epsilon {target_epsilon:g}",
                    hint="The run asked for more training than its privacy target allows.",
                )
            try:
                epsilon = ledger.reserve(
                    entry,
                    max_epsilon=self.max_epsilon,
                    delta=self.delta,
                    accountant=self.accountant,
                )
            except PrivacyBudgetExceeded as err:
                logger.warning("site %s: %s", self.site, err)  # the fingerprint stays here
                spent = ledger.spent(self.dataset, delta=self.delta, accountant=self.accountant)
                raise PrivacyBudgetExceeded(
                    f"site {self.site} refuses round {server_round}: privacy budget exhausted "
                    f"(its data has spent epsilon {spent:.3f} of its max_epsilon "
                    f"{self.max_epsilon:g}; this round would pass it)",
                    hint="The site's own cap, across every run on this data; the site can "
                    "inspect it with `fedvault client budget`.",
                ) from err
            head = ledger.head()
            seen = max(0, min(int(seen_count), head.count))
            status = LedgerStatus(
                count=head.count,
                head=head.hash,
                seen_count=seen,
                hash_at_seen=ledger.hash_at(seen) or "",
                datasets=len(ledger.declared_datasets()),
            )
        return Reservation(
            epsilon=epsilon,
            run_epsilon=run_epsilon,
            max_epsilon=self.max_epsilon,
            run_steps=sum(e.steps for e in mine) + plan.steps,
            ledger=status,
        )
