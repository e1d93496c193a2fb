"""`fedvault simulate`: run the fedvault Flower App on Flower's Simulation Engine (Ray).

A private SuperLink in simulation mode is started on a free loopback port with its own
FLWR_HOME, and the app is submitted to it exactly as `fedvault run` submits it to a real
federation (server/runs.py); every process is stopped by PID at the end, whatever happens.
The run directory is locked for the whole run (common/locks.py): a second run or a resume
of a live run is refused, naming the PID that runs it. Ctrl-C (or SIGTERM) leaves an
``INTERRUPTED`` marker in the run directory and raises RunInterrupted, whose one line is the
exact `--resume` command.

The ServerApp leaves the plots and report.html to this command (``report-writer``): they are
drawn here from the run directory's files as soon as summary.json is written, while Flower
stops its simulation, instead of before it may start to.
"""

from __future__ import annotations

import logging
import shlex
import tempfile
import threading
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

from fedvault.common.checkpoint import CHECKPOINT_FILE
from fedvault.common.config import FedvaultConfig
from fedvault.common.errors import RunInterrupted
from fedvault.common.locks import RUN_LOCK, holding
from fedvault.common.report import (
    ERROR_FILE,
    FLOWER_LOG,
    LEDGER_RECORD_FILE,
    LEDGERS_DIR,
    REPORT_BY_COMMAND,
    REPORT_WRITER,
    ROUNDS_FILE,
    SITE_POLICY_FILE,
    SUMMARY_FILE,
    RunDirectory,
    read_jsonl,
)
from fedvault.common.site_privacy import SimulatedSitePolicy
from fedvault.runtime.processes import (
    ManagedProcess,
    flower_bin,
    free_port,
    wait_http_ready,
    write_connection,
)
from fedvault.server.runs import Echo, run_app

logger = logging.getLogger(__name__)

CONNECTION = "fedvault-simulation"
#: Written in a run directory that Ctrl-C or SIGTERM stopped: when, why, how to resume.
INTERRUPTED_FILE = "INTERRUPTED"


def simulate(
    cfg: FedvaultConfig,
    run_path: Path,
    *,
    echo: Echo,
    site_policy: SimulatedSitePolicy | None = None,
    clientapp: str = "fedvault.client.app:app",
    resume: bool = False,
) -> dict[str, Any]:
    """Run ``cfg`` in simulation, writing ``run_path``; returns the summary.

    The simulated sites keep their privacy ledgers in ``site_policy.ledger_dir``, by
    default a fresh ``ledgers/`` folder inside the run directory. ``clientapp`` (a
    ``module:attribute`` reference) is fedvault's ClientApp; only tests pass another, such
    as a deliberately misbehaving site (it is not reachable from the CLI or the config).
    """
    run_dir = RunDirectory(run_path.resolve())
    with holding(run_dir.file(RUN_LOCK), f"run directory {run_path}"):
        run_dir.file(INTERRUPTED_FILE).unlink(missing_ok=True)  # a resumed run is running
        try:
            return _simulate(
                cfg, run_dir, echo=echo, site_policy=site_policy, clientapp=clientapp,
                resume=resume,
            )  # fmt: skip
        except KeyboardInterrupt as err:
            raise interrupted(run_dir, reason=str(err) or "SIGINT") from None


def interrupted(run_dir: RunDirectory, *, reason: str) -> RunInterrupted:
    """Mark ``run_dir`` as interrupted (when, why, how to go on); the line to print."""
    finished = run_dir.file(SUMMARY_FILE).is_file()  # Ctrl-C came after the last round
    resumable = run_dir.file(CHECKPOINT_FILE).is_file() and not finished
    command = f"fedvault simulate --resume {shlex.quote(str(run_dir.path))}"
    how = (
        f"resume: {command}"
        if resumable
        else "resume: not needed, the run finished"
        if finished
        else "resume: not possible, no round finished; start the run again"
    )
    when = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    signal_name = {"SIGINT": "SIGINT (Ctrl-C)"}.get(reason, reason)
    run_dir.write_text(INTERRUPTED_FILE, f"interrupted: {when}\nreason: {signal_name}\n{how}\n")
    line = (
        f"interrupted ({signal_name}); everything started was stopped; resume with: {command}"
        if resumable
        else f"interrupted ({signal_name}) after the run finished; its results are in "
        f"{run_dir.path}"
        if finished
        else f"interrupted ({signal_name}) before any round finished; everything started was "
        "stopped; nothing to resume"
    )
    return RunInterrupted(line)


class ReportDrawer:
    """Draws the plots and report.html once the ServerApp has written summary.json.

    A thread watches for the summary while the run goes on (after a resume, only a summary
    written by this attempt counts); ``finish`` waits for the drawing, or draws now if the
    summary came last. As in the ServerApp, a report that fails does not fail the run.
    """

    def __init__(self, run_dir: RunDirectory, echo: Echo, poll_seconds: float = 0.1) -> None:
        self.run_dir = run_dir
        self.echo = echo
        self.poll_seconds = poll_seconds
        self._stop = threading.Event()
        self._drawn = False
        self._lock = threading.Lock()
        for stale in (SUMMARY_FILE, ERROR_FILE):  # an earlier attempt's (`--resume`)
            run_dir.file(stale).unlink(missing_ok=True)
        self._thread = threading.Thread(target=self._watch, name="report", daemon=True)
        self._thread.start()

    def _watch(self) -> None:
        while not self._stop.wait(self.poll_seconds):
            if self.run_dir.file(SUMMARY_FILE).is_file():
                self._draw()
                return

    def _draw(self) -> None:
        with self._lock:
            if self._drawn or not self.run_dir.file(SUMMARY_FILE).is_file():
                return
            self._drawn = True
            try:
                from fedvault.common.report_html import write_report  # matplotlib: only here

                self.run_dir.plot(read_jsonl(self.run_dir.file(ROUNDS_FILE)))
                write_report(self.run_dir)
            except Exception as err:  # the results are all written; say what is missing
                logger.exception("the report could not be drawn")
                self.echo(f"report.html could not be written: {err!r}")

    def finish(self) -> None:
        """Wait for the drawing (or draw now); call when the run has ended, however."""
        self._stop.set()
        self._thread.join()
        self._draw()


def _simulate(
    cfg: FedvaultConfig,
    run_dir: RunDirectory,
    *,
    echo: Echo,
    site_policy: SimulatedSitePolicy | None,
    clientapp: str,
    resume: bool,
) -> dict[str, Any]:
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
        drawer: ReportDrawer | None = None
        try:
            wait_http_ready(port, superlink)
            drawer = ReportDrawer(run_dir, echo)
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
                    REPORT_WRITER: REPORT_BY_COMMAND,
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
            if drawer is not None:
                drawer.finish()
