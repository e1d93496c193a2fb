"""fedvault's reported ε vs independent accountants for the same DP-SGD histories (issue 6, Q5).

For each history — the shipped scenarios' runs as a site's ledger records them (σ calibrated
the way the ClientApp does it: once per run, for rounds × local epochs × steps per epoch at
q = 1 / ceil(rows / batch size)), and heterogeneous multi-run histories like a site's
ledger holds after several runs — it computes ε at δ with:

- fedvault ``compute_epsilon`` with ``prv`` (what fedvault reports) and with ``rdp``;
- Opacus' ``RDPAccountant`` directly, one history entry per ledger row (fedvault merges
  rows with the same (σ, q) first; for RDP that must change nothing);
- Google dp-accounting's ``RdpAccountant`` and ``PLDAccountant``, composing
  ``PoissonSampledDpEvent(q, GaussianDpEvent(σ))`` once per distinct (σ, q) with the
  count set to all its steps (the same mechanism as one composition per ledger row, and
  much faster for PLD).

PLD is the reference for the relative differences (it is a tight numerical bound, like PRV).
Accountants: PRV, Gopi, Lee & Wutschitz, NeurIPS 2021; RDP, Mironov, CSF 2017 and Mironov,
Talwar & Zhang 2019; PLD, Koskela et al., AISTATS 2020 and Doroshenko et al., PETS 2022.
"""

from __future__ import annotations

import logging
import sys
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import dp_accounting
import numpy as np
from dp_accounting.pld import PLDAccountant
from dp_accounting.rdp import RdpAccountant
from opacus.accountants import RDPAccountant

from benchmarks.common import (
    SCENARIO_DIR,
    describe_machine,
    load_average,
    machine_info,
    parse_args,
    print_table,
    save_results,
)
from fedvault.common.config import FedvaultConfig, build_config, read_toml
from fedvault.common.data import load_dataset
from fedvault.common.partition import partition_indices
from fedvault.common.privacy import PrivacyEvent, calibrate_noise_multiplier, compute_epsilon
from fedvault.common.training import sample_rate_for, steps_per_epoch

MODULE = "benchmarks.accounting"
DELTA = 1e-5
#: Rows of the built-in datasets that are not loaded here (fashion-mnist needs a Debian
#: package; only its row count matters, and its partition is iid).
ROWS_WITHOUT_LOADING = {"fashion-mnist": 70000}
#: Accountants compared, in table order; the last is the reference.
ACCOUNTANTS: tuple[str, ...] = (
    "fedvault prv",
    "fedvault rdp",
    "opacus rdp",
    "dp-accounting rdp",
    "dp-accounting pld",
)
REFERENCE = "dp-accounting pld"


@dataclass(frozen=True)
class History:
    """A named DP-SGD history, one PrivacyEvent per ledger row (one per round)."""

    name: str
    description: str
    events: tuple[PrivacyEvent, ...]
    target_epsilon: float | None = None


def site_train_rows(cfg: FedvaultConfig) -> list[int]:
    """Training rows of every site of a scenario, partitioned as the simulation does it.

    Each site keeps round(rows × test-fraction) (at least 1) of its rows for testing, as
    common/partition.py's ``make_site_data`` does.
    """
    name = cfg.data.dataset
    if name in ROWS_WITHOUT_LOADING:
        labels = np.zeros(ROWS_WITHOUT_LOADING[name], dtype=np.int64)
        if cfg.data.partition != "iid":
            raise ValueError(f"{name}: only an iid partition can be sized without the data")
    else:
        labels = load_dataset(name, seed=cfg.seed).labels
    parts = partition_indices(
        labels,
        cfg.federation.sites,
        method=cfg.data.partition,
        alpha=cfg.data.alpha,
        seed=cfg.seed,
    )
    return [
        len(part) - min(max(1, round(len(part) * cfg.data.test_fraction)), len(part) - 1)
        for part in parts
    ]


def run_events(
    *,
    rows: int,
    batch_size: int,
    rounds: int,
    local_epochs: int = 1,
    target_epsilon: float | None = None,
    noise_multiplier: float | None = None,
    accountant: str = "prv",
) -> list[PrivacyEvent]:
    """One run's ledger rows: σ fixed, or calibrated once for the whole run as the client does."""
    q = sample_rate_for(rows, batch_size)
    steps = local_epochs * steps_per_epoch(rows, batch_size)
    if noise_multiplier is None:
        if target_epsilon is None:
            raise ValueError("give target_epsilon or noise_multiplier")
        noise_multiplier = calibrate_noise_multiplier(
            target_epsilon=target_epsilon,
            delta=DELTA,
            sample_rate=q,
            steps=rounds * steps,
            accountant=accountant,
        )
    return [PrivacyEvent(noise_multiplier, q, steps)] * rounds


def scenario_histories(path: Path) -> list[History]:
    """The ledgers of a scenario's smallest and largest sites after one whole run.

    Sites of equal sample rate q (an even split) give one history.
    """
    cfg = build_config(read_toml(path))
    sizes = site_train_rows(cfg)
    batch = cfg.training.batch_size
    picked: dict[float, int] = {}
    for index in (int(np.argmin(sizes)), int(np.argmax(sizes))):
        picked.setdefault(sample_rate_for(sizes[index], batch), index)
    found = []
    for index in picked.values():
        events = run_events(
            rows=sizes[index],
            batch_size=batch,
            rounds=cfg.federation.rounds,
            local_epochs=cfg.training.local_epochs,
            target_epsilon=cfg.privacy.target_epsilon,
            noise_multiplier=cfg.privacy.noise_multiplier,
            accountant=cfg.privacy.accountant,
        )
        found.append(
            History(
                name=f"{cfg.name}: {cfg.site_name(index)}",
                description=(
                    f"simulations/{path.name}: {cfg.federation.rounds} rounds on "
                    f"{sizes[index]} training rows, batch {batch}"
                ),
                events=tuple(events),
                target_epsilon=cfg.privacy.target_epsilon,
            )
        )
    return found


def three_runs_history() -> History:
    """hospital-a after three runs on its 152 rows: default, then ε = 2 at B = 16, then σ = 1."""
    rows = 152
    events = [
        *run_events(rows=rows, batch_size=32, rounds=5, target_epsilon=1.0),
        *run_events(rows=rows, batch_size=16, rounds=10, target_epsilon=2.0),
        *run_events(rows=rows, batch_size=64, rounds=3, noise_multiplier=1.0),
    ]
    return History(
        name="ledger: 3 runs",
        description="hospital-a (152 rows): hospitals default (ε 1, B 32, 5 rounds), then "
        "ε 2 at B 16 for 10 rounds, then σ 1.0 at B 64 for 3 rounds",
        events=tuple(events),
    )


def twelve_runs_history() -> History:
    """A site with 1,200 rows after 12 runs of 5 rounds at fixed σ and varying batch sizes."""
    rows = 1200
    sigmas = (0.9, 1.2, 1.5, 2.0)
    batches = (32, 64, 128)
    events: list[PrivacyEvent] = []
    for run in range(12):
        events += run_events(
            rows=rows,
            batch_size=batches[run % len(batches)],
            rounds=5,
            noise_multiplier=sigmas[run % len(sigmas)],
        )
    return History(
        name="ledger: 12 runs",
        description="1,200 rows, 12 runs × 5 rounds, σ cycling 0.9/1.2/1.5/2.0 and B "
        "32/64/128 (12 distinct (σ, q) phases)",
        events=tuple(events),
    )


def histories(*, quick: bool) -> list[History]:
    """The histories compared: hospitals and one multi-run ledger in quick mode, all in full."""
    found = [*scenario_histories(SCENARIO_DIR / "hospitals.toml"), three_runs_history()]
    if not quick:
        for path in sorted(SCENARIO_DIR.glob("*.toml")):
            if path.name != "hospitals.toml":
                found += scenario_histories(path)
        found.append(twelve_runs_history())
    return found


def _opacus_rdp(events: Sequence[PrivacyEvent]) -> float:
    accountant = RDPAccountant()
    accountant.history = [(e.noise_multiplier, e.sample_rate, e.steps) for e in events]
    return float(accountant.get_epsilon(delta=DELTA))


def _dp_event(event: PrivacyEvent) -> dp_accounting.DpEvent:
    return dp_accounting.PoissonSampledDpEvent(
        event.sample_rate, dp_accounting.GaussianDpEvent(event.noise_multiplier)
    )


def phases(events: Sequence[PrivacyEvent]) -> list[PrivacyEvent]:
    """The history with rows of equal (σ, q) merged, in order of first appearance."""
    steps: dict[tuple[float, float], int] = {}
    for event in events:
        key = (event.noise_multiplier, event.sample_rate)
        steps[key] = steps.get(key, 0) + event.steps
    return [PrivacyEvent(sigma, q, n) for (sigma, q), n in steps.items() if n > 0]


def _dp_accounting(events: Sequence[PrivacyEvent], accountant: Any) -> float:
    for phase in phases(events):
        accountant.compose(_dp_event(phase), phase.steps)
    return float(accountant.get_epsilon(DELTA))


class _NotConverged(logging.Filter):
    """Counts (and hides) dp-accounting's "failed to converge ... Excluding this order" lines.

    dp-accounting's RDP drops a fractional Rényi order whose series does not converge
    (e.g. q = 1/3, σ = 1, α < 2) and logs one line per order and composition.
    """

    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def filter(self, record: logging.LogRecord) -> bool:
        if "failed to converge" in record.getMessage():
            self.count += 1
            return False
        return True


def epsilon_functions() -> dict[str, Callable[[Sequence[PrivacyEvent]], float]]:
    """ε at DELTA of a history, by accountant name."""
    return {
        "fedvault prv": lambda h: compute_epsilon(h, delta=DELTA, accountant="prv"),
        "fedvault rdp": lambda h: compute_epsilon(h, delta=DELTA, accountant="rdp"),
        "opacus rdp": _opacus_rdp,
        "dp-accounting rdp": lambda h: _dp_accounting(h, RdpAccountant()),
        "dp-accounting pld": lambda h: _dp_accounting(h, PLDAccountant()),
    }


def compare(history: History) -> dict[str, Any]:
    """ε, time and relative difference to the reference, per accountant, for one history."""
    results: dict[str, dict[str, float]] = {}
    not_converged = _NotConverged()
    absl_logger = logging.getLogger("absl")
    absl_logger.addFilter(not_converged)
    try:
        for name, epsilon_of in epsilon_functions().items():
            start = time.perf_counter()
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                epsilon = epsilon_of(list(history.events))
            results[name] = {"epsilon": epsilon, "seconds": time.perf_counter() - start}
    finally:
        absl_logger.removeFilter(not_converged)
    reference = results[REFERENCE]["epsilon"]
    for values in results.values():
        values["rel_diff"] = (values["epsilon"] - reference) / reference
    return {
        "history": history.name,
        "description": history.description,
        "target_epsilon": history.target_epsilon,
        "delta": DELTA,
        "rows": len(history.events),
        "phases": len(phases(history.events)),
        "steps": sum(e.steps for e in history.events),
        "events": [
            {"noise_multiplier": e.noise_multiplier, "sample_rate": e.sample_rate, "steps": e.steps}
            for e in history.events
        ],
        "accountants": results,
        "dp_accounting_rdp_orders_not_converged": not_converged.count,
    }


def _sigma_q(record: dict[str, Any]) -> str:
    if record["phases"] != 1:
        return "mixed"
    event = record["events"][0]
    return f"{event['noise_multiplier']:.3f}, {event['sample_rate']:.4g}"


def print_tables(records: Sequence[dict[str, Any]]) -> None:
    """ε per accountant, relative differences to PLD, and the accountants' run times."""
    print_table(
        f"ε at δ = {DELTA:g} (history: ledger rows / distinct (σ, q) / DP-SGD steps)",
        ["history", "rows/phases/steps", "σ, q", "target ε", *ACCOUNTANTS],
        [
            [
                r["history"],
                f"{r['rows']}/{r['phases']}/{r['steps']}",
                _sigma_q(r),
                "—" if r["target_epsilon"] is None else f"{r['target_epsilon']:g}",
                *(f"{r['accountants'][a]['epsilon']:.4f}" for a in ACCOUNTANTS),
            ]
            for r in records
        ],
    )
    others = [a for a in ACCOUNTANTS if a != REFERENCE]
    print_table(
        f"Relative difference to {REFERENCE}, (ε − ε_pld) / ε_pld",
        ["history", *others],
        [
            [r["history"], *(f"{100 * r['accountants'][a]['rel_diff']:+.2f} %" for a in others)]
            for r in records
        ],
    )
    print_table(
        "Accountant run time, seconds (loaded machine: compare within a row only)",
        ["history", *ACCOUNTANTS],
        [
            [r["history"], *(f"{r['accountants'][a]['seconds']:.3f}" for a in ACCOUNTANTS)]
            for r in records
        ],
    )
    for r in records:
        if r["dp_accounting_rdp_orders_not_converged"]:
            print(
                f"\nnote: {r['history']}: dp-accounting RDP left out "
                f"{r['dp_accounting_rdp_orders_not_converged']} fractional-order evaluations "
                "that failed to converge (its own warning, hidden here)"
            )


def main(argv: Sequence[str] | None = None) -> int:
    """Run the comparison, print its tables, write its JSON; 0 on success."""
    args = parse_args(MODULE, "fedvault's ε vs Opacus RDP and dp-accounting PLD.", argv)
    machine = machine_info()
    print(f"{args.command}\n{describe_machine(machine)}")
    started = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        found = histories(quick=args.quick)
    print(f"  {len(found)} histories built (σ calibrated) in {time.perf_counter() - started:.1f} s")
    for history in found:
        print(f"  {history.name}: {history.description}", flush=True)
    records = [compare(history) for history in found]
    print_tables(records)
    elapsed = time.perf_counter() - started
    load_after = load_average()
    print(f"\n{len(records)} histories in {elapsed:.1f} s; load average now {load_after}")
    payload = {
        "benchmark": "accounting",
        "command": args.command,
        "quick": args.quick,
        "machine": machine,
        "settings": {"delta": DELTA, "reference": REFERENCE, "accountants": list(ACCOUNTANTS)},
        "histories": records,
        "seconds": elapsed,
        "load_average_after": load_after,
    }
    save_results(args.out, payload)
    return 0


if __name__ == "__main__":
    sys.exit(main())
