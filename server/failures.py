"""Failure bookkeeping: per round, the sites that failed, refused, were rejected or alerted."""

from __future__ import annotations

import logging

from flwr.app import Message

from fedvault.common.errors import BUDGET_REFUSAL_CODE, LEDGER_REFUSAL_CODE, POLICY_REFUSAL_CODE

logger = logging.getLogger(__name__)

#: Error codes of a site's deliberate refusal (its budget, its ledger, its policy): the
#: site is well and protects its data; recorded apart from failures.
REFUSAL_CODES = frozenset({BUDGET_REFUSAL_CODE, LEDGER_REFUSAL_CODE, POLICY_REFUSAL_CODE})

#: A site's record per round: round → site → reason.
PerRound = dict[int, dict[str, str]]


class FailureBook:
    """What went wrong in each round, site by site (round → site → reason).

    ``failures`` holds every site that sent no usable reply; ``refusals`` (the site refused:
    its budget, ledger or policy) and ``rejections`` (its update failed validation) are
    subsets of it. ``ledger_alerts`` holds the sites whose ledger forgot, rewrote its
    history, declared a new dataset, or that refused because their own ledger is broken.
    """

    def __init__(self) -> None:
        self.failures: PerRound = {}
        self.refusals: PerRound = {}
        self.rejections: PerRound = {}
        self.ledger_alerts: PerRound = {}

    def missed(self, server_round: int, site: str) -> None:
        """``site`` sent no reply before the round's deadline."""
        reason = "no reply before the round's deadline (round-timeout)"
        self.failures.setdefault(server_round, {})[site] = reason
        logger.warning("round %d: site %s failed: %s", server_round, site, reason)

    def error_reply(self, server_round: int, site: str, reply: Message) -> None:
        """``site`` answered with an error: a failure, a refusal, or a ledger refusal."""
        reason = reply.error.reason or f"error code {reply.error.code}"
        self.failures.setdefault(server_round, {})[site] = reason
        if reply.error.code in REFUSAL_CODES:
            self.refusals.setdefault(server_round, {})[site] = reason
            logger.warning("round %d: site %s refused: %s", server_round, site, reason)
        else:
            logger.warning("round %d: site %s failed: %s", server_round, site, reason)
        if reply.error.code == LEDGER_REFUSAL_CODE:
            self.ledger_alerts.setdefault(server_round, {})[site] = reason

    def reject(self, server_round: int, site: str, reason: str) -> None:
        """``site``'s update failed validation and is left out of the aggregate."""
        self.rejections.setdefault(server_round, {})[site] = reason
        self.failures.setdefault(server_round, {})[site] = f"update rejected: {reason}"
        logger.warning("round %d: update from site %s rejected: %s", server_round, site, reason)

    def ledger_alert(self, server_round: int, site: str, alert: str) -> None:
        """The coordinator's view of ``site``'s ledger does not add up."""
        self.ledger_alerts.setdefault(server_round, {})[site] = alert

    def why(self, server_round: int) -> str:
        """``site: reason; …`` for every site that failed in ``server_round``."""
        failed = self.failures.get(server_round, {})
        return "; ".join(f"{site}: {reason}" for site, reason in sorted(failed.items()))
