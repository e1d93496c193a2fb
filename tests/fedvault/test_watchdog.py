"""Every process a fedvault command starts dies with that command, even when it is SIGKILLed.

Flower starts its helpers in sessions of their own, so they never hear that the command
died; the command's watchdog (fedvault/runtime/watchdog.py) stops them. Each test SIGKILLs only the
command's own process, then waits (bounded) until no process of the tree remembered from
/proc before the kill is left, following orphans by PID and session as they appear.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from fedvault.common.errors import InUseError
from tests.deployment import (
    ProcessTrees,
    fedvault_env,
    fedvault_process,
    process_label,
    provision,
    wait_for,
    wait_until,
    write_site_csvs,
)

pytestmark = [pytest.mark.integration, pytest.mark.timeout(600)]

#: Upper bound on the watchdog's clean-up (it gives SIGTERM 3 s before SIGKILL).
GONE_WITHIN_S = 60.0


def _gone_after_kill(trees: ProcessTrees, *pids: int) -> list[str]:
    """SIGKILL ``pids`` only; wait until nothing remembered (or born of it) runs; leftovers."""
    for pid in pids:
        trees.remember(pid)
        os.kill(pid, signal.SIGKILL)

    def nothing_left() -> bool:
        for pid in list(trees.seen):  # orphans' new children and session members too
            if trees._still_ours(pid):
                trees.remember(pid)
        return not trees.alive()

    try:
        wait_until(nothing_left, "every process of the killed command to stop", GONE_WITHIN_S)
    except AssertionError:
        return trees.kill_survivors()
    return []


def _labels(trees: ProcessTrees, root: int) -> list[str]:
    return [process_label(pid) for pid in trees.remember(root)]


#: The grandchild's arguments after its interpreter, as /proc/PID/cmdline holds them.
GRANDCHILD = [b"-c", b"import time; time.sleep(600)"]


def test_a_sigkilled_command_takes_its_children_and_their_own_sessions_along(
    tmp_path: Path,
) -> None:
    # Prepare: a command whose child starts a grandchild in a session of its own, as Flower does
    code = (
        "import subprocess, sys, time\n"
        "from pathlib import Path\n"
        "from fedvault.runtime.processes import ManagedProcess\n"
        "inner = ('import subprocess, sys, time; subprocess.Popen([sys.executable, \"-c\", '\n"
        "         '\"import time; time.sleep(600)\"], start_new_session=True); time.sleep(600)')\n"
        "ManagedProcess([sys.executable, '-c', inner], log_path=Path(sys.argv[1]), env={})\n"
        "time.sleep(600)\n"
    )
    command = subprocess.Popen([sys.executable, "-c", code, str(tmp_path / "child.log")])
    trees = ProcessTrees()
    # (the command's own code names "sleep" too: wait for the whole tree, grandchild included)
    wait_until(
        lambda: any(
            Path(f"/proc/{p}/cmdline").read_bytes().split(b"\0")[1:3] == GRANDCHILD
            for p in trees.remember(command.pid) if Path(f"/proc/{p}/cmdline").exists()
        )
        and len(trees.remember(command.pid)) >= 4,
        "the watchdog, the child and the grandchild", timeout=60, procs=[command],
    )  # fmt: skip

    # Execute
    left = _gone_after_kill(trees, command.pid)
    command.wait(timeout=10)

    # Assert
    assert left == []
    assert len(trees.seen) >= 4  # the command, its watchdog, the child, the grandchild


def test_a_sigkilled_simulate_leaves_no_superlink_superexec_or_simulation(
    tmp_path: Path,
) -> None:
    short_tmp = Path(tempfile.mkdtemp(prefix="fvwd-"))  # Ray's socket paths must be short
    log = tmp_path / "simulate.txt"
    with log.open("w") as handle:
        proc = subprocess.Popen(
            [sys.executable, "-m", "fedvault", "simulate", "--rounds", "10",
             "--out", str(tmp_path / "run")],
            stdout=handle, stderr=subprocess.STDOUT,
            env={**fedvault_env(), "TMPDIR": str(short_tmp)},
        )  # fmt: skip
    trees = ProcessTrees()
    try:
        wait_for(log, r"round 1/10", proc, timeout=400)
        labels = " ".join(_labels(trees, proc.pid))
        assert all(p in labels for p in ("flower-superlink", "flower-superexec")), labels

        left = _gone_after_kill(trees, proc.pid)
        proc.wait(timeout=10)

        assert left == [], left
    finally:
        if proc.poll() is None:
            trees.kill(proc.pid)
        trees.kill_survivors()


def test_sigkilled_server_and_site_commands_leave_nothing_and_a_kit_runs_once(
    tmp_path: Path,
) -> None:
    # Prepare: a federation of one site, its coordinator and the site running
    federation, port = provision(tmp_path, ["hospital-a"])
    (csv,) = write_site_csvs(tmp_path, 1)
    kit = federation / "sites" / "hospital-a"
    site_args = ["client", "start", "--kit", str(kit), "--data", str(csv),
                 "--label-column", "diagnosis", "--device", "cpu"]  # fmt: skip
    trees = ProcessTrees()
    with (
        fedvault_process(
            [
                "server",
                "start",
                "--kit",
                str(federation / "server"),
                "--listen",
                f"127.0.0.1:{port}",
            ],
            tmp_path / "server.log",
        ) as server,  # fmt: skip
        fedvault_process(site_args, tmp_path / "site.log") as site,
    ):
        try:
            wait_for(tmp_path / "server.log", r"^ready:", server, timeout=120)
            wait_for(tmp_path / "site.log", r"connecting to", site, timeout=120)

            # Execute: the same kit again, while its site runs
            again = subprocess.run(
                [sys.executable, "-m", "fedvault", *site_args],
                capture_output=True, text=True, timeout=300, env=fedvault_env(), check=False,
            )  # fmt: skip
            server_tree = " ".join(_labels(trees, server.pid))
            site_tree = " ".join(_labels(trees, site.pid))
            left = _gone_after_kill(trees, server.pid, site.pid)
        finally:
            trees.kill_survivors()

    # Assert
    assert again.returncode == InUseError.exit_code, again.stderr
    assert f"PID {site.pid}" in again.stderr
    assert "never provisioned" not in again.stderr + again.stdout
    assert "flower-superlink" in server_tree, server_tree
    assert "fedvault.client.supernode" in site_tree and "fedvault.client.worker" in site_tree, (
        site_tree
    )
    assert left == [], left
