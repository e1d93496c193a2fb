"""Checkpoint and resume a run's strategy: what Flower's strategies keep between rounds.

Flower 1.39 strategies are plain objects; the state some carry across rounds is saved here
by name: FedOpt-family moments (``m_t``, ``v_t``, FedAdam & co.) and the central-DP
wrapper's privacy accountant (Flower's own ``state_dict``/``load_state_dict``). Stateless
strategies (FedAvg, FedProx, trimmed mean, median, Krum) need nothing.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Any

import numpy as np
from flwr.serverapp.strategy import DifferentialPrivacyServerSideFixedClipping, Strategy
from flwr.serverapp.strategy.fedopt import FedOpt

from fedvault.common.checkpoint import ArrayGroups, report_from_json, report_to_json
from fedvault.common.errors import ConfigError

logger = logging.getLogger(__name__)

_MOMENTS = ("m_t", "v_t", "current_arrays")


def _chain(strategy: Strategy) -> Iterator[Strategy]:
    """``strategy`` and every strategy it wraps (``.inner`` or Flower's ``.strategy``)."""
    seen: set[int] = set()
    current: Any = strategy
    while isinstance(current, Strategy) and id(current) not in seen:
        seen.add(id(current))
        yield current
        current = getattr(current, "inner", None) or getattr(current, "strategy", None)


def strategy_state(strategy: Strategy) -> tuple[ArrayGroups, dict[str, Any]]:
    """The strategy chain's state: named array groups and JSON-able values."""
    arrays: ArrayGroups = {}
    values: dict[str, Any] = {}
    for part in _chain(strategy):
        if isinstance(part, FedOpt):
            for name in _MOMENTS:
                group = getattr(part, name, None)
                if group is not None:
                    arrays[name] = {k: np.asarray(v) for k, v in group.items()}
        central = isinstance(part, DifferentialPrivacyServerSideFixedClipping)
        accountant = part.accountant if central else None  # type: ignore[attr-defined]
        if accountant is not None:
            values["central_dp_accountant"] = accountant.state_dict()
    return arrays, values


def load_strategy_state(strategy: Strategy, arrays: ArrayGroups, values: dict[str, Any]) -> None:
    """Put a checkpoint's strategy state back; refuse state the strategy cannot take."""
    used: set[str] = set()
    for part in _chain(strategy):
        if isinstance(part, FedOpt):
            for name in _MOMENTS:
                if name in arrays:
                    setattr(
                        part, name, {k: np.array(v, copy=True) for k, v in arrays[name].items()}
                    )
                    used.add(name)
        if isinstance(part, DifferentialPrivacyServerSideFixedClipping):
            state = values.get("central_dp_accountant")
            if part.accountant is not None and state is not None:
                try:
                    part.accountant.load_state_dict(state)
                except ValueError as err:
                    raise ConfigError(f"the checkpoint's central-DP accountant: {err}") from err
                used.add("central_dp_accountant")
    unused = (set(arrays) | set(values)) - used
    if unused:
        raise ConfigError(
            f"the checkpoint holds strategy state this run's strategy cannot take: "
            f"{', '.join(sorted(unused))}",
            hint="Resume with the configuration the run started with (its config.toml).",
        )


#: The per-round records of ReportingStrategy that the run report needs after a resume.
REPORT_RECORDS = ("failures", "refusals", "rejections")


def report_state(reporting: Strategy) -> dict[str, Any]:
    """ReportingStrategy's per-round records (failures, refusals, rejections) as JSON."""
    return report_to_json({name: getattr(reporting, name, {}) for name in REPORT_RECORDS})


def load_report_state(reporting: Strategy, data: dict[str, Any]) -> None:
    """Put the records of the rounds before a resume back into ReportingStrategy."""
    for name in REPORT_RECORDS:
        if hasattr(reporting, name):
            getattr(reporting, name).update(report_from_json(data, name))
