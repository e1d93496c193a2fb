"""Tests for server/resume.py: strategy state across a checkpoint, and resumed round numbers.

Also the round deadline in ReportingStrategy: a round never waits forever for a site.
"""

from __future__ import annotations

from typing import cast

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import DifferentialPrivacyServerSideFixedClipping, FedAdam

from fedvault.common.errors import ConfigError, FederationError
from fedvault.server.resume import (
    load_report_state,
    load_strategy_state,
    report_state,
    strategy_state,
)
from fedvault.server.strategy import ReportingStrategy, build_strategy
from tests.server.test_strategy import (
    NodesGrid,
    central_config,
    config,
    serverapp_identity,
    train_reply,
    unit_weight_reply,
)

pytestmark = pytest.mark.unit
__all__ = ["serverapp_identity"]  # a fixture, used by name

GLOBAL = {"w": np.zeros(4, dtype=np.float32)}


def arrays(weights: dict[str, np.ndarray]) -> ArrayRecord:
    return ArrayRecord({k: Array(v.copy()) for k, v in weights.items()})


def fedadam_round(strategy: FedAdam, server_round: int, scale: float) -> dict[str, np.ndarray]:
    """One configure/aggregate round of FedAdam with two sites' replies."""
    list(strategy.configure_train(server_round, arrays(GLOBAL), ConfigRecord(),
                                  cast(Grid, NodesGrid([1, 2]))))  # fmt: skip
    replies = [
        train_reply(1, "a", {"w": np.full(4, scale, dtype=np.float32)}, n=10, eps=0.1),
        train_reply(2, "b", {"w": np.full(4, 2 * scale, dtype=np.float32)}, n=10, eps=0.1),
    ]
    aggregated, _ = strategy.aggregate_train(server_round, replies)
    assert aggregated is not None
    return {k: v.numpy() for k, v in aggregated.items()}


@pytest.mark.usefixtures("serverapp_identity")
def test_fedadam_moments_survive_a_checkpoint() -> None:
    # Prepare: two rounds, then the state as a checkpoint holds it
    original = cast(FedAdam, build_strategy(config("fedadam", sites=2)))
    fedadam_round(original, 1, 1.0)
    fedadam_round(original, 2, 0.5)
    saved_arrays, saved_json = strategy_state(original)

    # Execute: a fresh strategy (a restarted coordinator) takes the state back
    restored = cast(FedAdam, build_strategy(config("fedadam", sites=2)))
    load_strategy_state(restored, saved_arrays, saved_json)

    # Assert: the third round is the same as without the restart; a fresh one differs
    expected = fedadam_round(original, 3, 0.25)
    assert np.allclose(fedadam_round(restored, 3, 0.25)["w"], expected["w"])
    fresh = cast(FedAdam, build_strategy(config("fedadam", sites=2)))
    assert not np.allclose(fedadam_round(fresh, 3, 0.25)["w"], expected["w"])
    assert {"m_t", "v_t"} <= set(saved_arrays)


@pytest.mark.usefixtures("serverapp_identity")
def test_the_central_dp_accountant_survives_a_checkpoint() -> None:
    # Prepare: two released rounds of central DP
    cfg = central_config(sigma=1.0, clip=1.0, sites=3)
    original = cast(DifferentialPrivacyServerSideFixedClipping, build_strategy(cfg))
    for server_round in (1, 2):
        list(original.configure_train(server_round, arrays(GLOBAL), ConfigRecord(),
                                      cast(Grid, NodesGrid([1, 2, 3]))))  # fmt: skip
        replies = [unit_weight_reply(n, {"w": np.full(4, 0.1, np.float32)}, n=5) for n in (1, 2, 3)]
        original.aggregate_train(server_round, replies)
    spent = original.privacy_spent()
    saved_arrays, saved_json = strategy_state(original)

    # Execute
    restored = cast(DifferentialPrivacyServerSideFixedClipping, build_strategy(cfg))
    load_strategy_state(restored, saved_arrays, saved_json)

    # Assert: the site-level epsilon carries on from 2 releases, not from 0
    after = restored.privacy_spent()
    assert spent is not None and after is not None
    assert after.num_releases == spent.num_releases == 2
    assert after.epsilon == pytest.approx(spent.epsilon, rel=1e-12)


def test_state_the_strategy_cannot_take_is_refused() -> None:
    fedavg = build_strategy(config("fedavg", sites=2))

    with pytest.raises(ConfigError, match="cannot take: m_t"):
        load_strategy_state(fedavg, {"m_t": {"w": np.zeros(4)}}, {})


def test_report_records_come_back_after_a_resume() -> None:
    before = ReportingStrategy(build_strategy(config("fedavg", sites=2)), {})
    before.refusals[2] = {"a": "privacy budget exhausted"}
    before.failures[2] = {"a": "privacy budget exhausted"}

    after = ReportingStrategy(build_strategy(config("fedavg", sites=2)), {})
    load_report_state(after, report_state(before))

    assert after.refusals == {2: {"a": "privacy budget exhausted"}}
    assert after.failures == before.failures


def test_a_round_waits_for_missing_sites_only_until_its_deadline() -> None:
    # Prepare: 3 sites were known, only node 1 is still connected, 2 are needed
    reporting = ReportingStrategy(
        build_strategy(config("fedavg", sites=3, extra="min-sites = 2")),
        {1: "hospital-a", 2: "hospital-b", 3: "hospital-c"},
        min_sites=2,
        round_timeout=0.3,
    )

    # Execute / Assert: the round ends the run with the missing sites named, no hang
    with pytest.raises(FederationError) as raised:
        reporting.configure_train(4, arrays(GLOBAL), ConfigRecord(), cast(Grid, NodesGrid([1])))
    message = str(raised.value)
    assert "round 4 could not start: 1 site(s) connected, 2 needed" in message
    assert "not connected: hospital-b, hospital-c" in message
