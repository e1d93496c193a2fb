"""`fedvault simulate`: run the fedvault Flower App on Flower's Simulation Engine (Ray).

A private SuperLink in simulation mode is started on a free loopback port with its own
FLWR_HOME, and the app is submitted to it exactly as `fedvault run` submits it to a real
federation (server/runs.py); every process is stopped by PID at the end, whatever happens.
"""

from __future__ import annotations

import tempfile
from dataclasses import replace
from pathlib import Path
from typing import Any

from common.config import FedvaultConfig
from common.report import (
    FLOWER_LOG,
    LEDGER_RECORD_FILE,
    LEDGERS_DIR,
    SITE_POLICY_FILE,
    RunDirectory,
)
from common.site_privacy import SimulatedSitePolicy
from server.launch import (
    ManagedProcess,
    flower_bin,
    free_port,
    wait_http_ready,
    write_connection,
)
from server.runs import Echo, run_app

CONNECTION = "fedvault-simulation"


def simulate(
    cfg: FedvaultConfig,
    run_path: Path,
    *,
    echo: Echo,
    site_policy: SimulatedSitePolicy | None = None,
    clientapp: str = "client.app:app",
    resume: bool = False,
) -> dict[str, Any]:
    """Run ``cfg`` in simulation, writing ``run_path``; returns the summary.

    The simulated sites keep their privacy ledgers in ``site_policy.ledger_dir``, by
    default a fresh ``ledgers/`` folder inside the run directory. ``clientapp`` (a
    ``module:attribute`` reference) is fedvault's ClientApp; only tests pass another, such
    as a deliberately misbehaving site (it is not reachable from the CLI or the config).
    """
    run_dir = RunDirectory(run_path.resolve())
    policy = site_policy or SimulatedSitePolicy()
    if not policy.ledger_dir:
        policy = replace(policy, ledger_dir=str(run_dir.file(LEDGERS_DIR)))
    run_dir.write_json(SITE_POLICY_FILE, policy.run_config())
    with tempfile.TemporaryDirectory(prefix="fedvault-sim-") as tmp_name:
        home = Path(tmp_name) / "flwr-home"
        port = free_port()
        write_connection(home, CONNECTION, f"127.0.0.1:{port}", root_cert=None)
        env = {"FLWR_HOME": str(home)}
        log_path = run_dir.file(FLOWER_LOG)
        superlink = ManagedProcess(
            [
                flower_bin("flower-superlink"),
                "--insecure",
                "--simulation",
                "--host",
                "127.0.0.1",
                "--port",
                str(port),
                "--disable-runtime-dependency-installation",
            ],
            log_path=log_path,
            env=env,
        )
        try:
            wait_http_ready(port, superlink)
            return run_app(
                cfg,
                run_dir,
                flwr_home=home,
                connection=CONNECTION,
                watched=[superlink],
                echo=echo,
                site_run_config={
                    **policy.run_config(),
                    # The coordinator's record of each site's ledger head, kept beside the
                    # ledgers so that a reused --ledger-dir is checked across runs too.
                    "ledger-record": str(Path(policy.ledger_dir) / LEDGER_RECORD_FILE),
                },
                clientapp=clientapp,
                resume=resume,
                federation_config=(
                    f"num-supernodes={cfg.federation.sites} "
                    f"client-resources-num-cpus={cfg.simulation.cpus_per_site:g}"
                ),
            )
        finally:
            superlink.stop()
