"""Waiting for sites: a round starts once enough sites are connected, or the run ends."""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass

from flwr.serverapp import Grid

from fedvault.common.errors import FederationError


@dataclass(kw_only=True)
class SiteWait:
    """Wait at most ``round_timeout`` seconds for ``required_sites`` connected sites."""

    required_sites: int
    round_timeout: float
    #: node id → site name of the sites known at the start of the run (names the missing).
    site_names: Mapping[int, str]

    def wait(self, server_round: int, grid: Grid, poll: float = 1.0) -> None:
        """Return once ``required_sites`` are connected; FederationError after the timeout."""
        deadline = time.monotonic() + self.round_timeout
        while len(nodes := set(grid.get_node_ids())) < self.required_sites:
            if time.monotonic() > deadline:
                missing = sorted(n for node, n in self.site_names.items() if node not in nodes)
                raise FederationError(
                    f"round {server_round} could not start: {len(nodes)} site(s) connected, "
                    f"{self.required_sites} needed, after waiting {self.round_timeout:g} s"
                    + (f"; not connected: {', '.join(missing)}" if missing else ""),
                    hint="A site that restarts `fedvault client start` rejoins at the next "
                    "round; the rounds so far are checkpointed (--resume RUN_DIR).",
                )
            time.sleep(poll)
