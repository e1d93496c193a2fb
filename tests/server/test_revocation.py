"""Revocation: a site key revoked at a running coordinator is refused at its next connection."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fedvault.runtime.kits import load_kit, ssh_fingerprint
from fedvault.runtime.processes import descendants
from fedvault.server.deploy import list_nodes
from fedvault.server.runs import coordinator_run_config
from tests.deployment import (
    fedvault_env,
    fedvault_process,
    ledger_entries,
    provision,
    wait_for,
    write_site_csvs,
)

SITES = ["site-a", "site-b", "site-c"]
REFUSED_WITHIN_S = 60.0


def fedvault(args: list[str], timeout: float) -> tuple[subprocess.CompletedProcess[str], float]:
    start = time.monotonic()
    result = subprocess.run(
        [sys.executable, "-m", "fedvault", *args],
        capture_output=True, text=True, timeout=timeout, env=fedvault_env(), check=False,
    )  # fmt: skip
    return result, time.monotonic() - start


def client_args(kit: Path, csv: Path) -> list[str]:
    return ["client", "start", "--kit", str(kit), "--data", str(csv),
            "--label-column", "diagnosis", "--device", "cpu", "--rejoin-wait", "0"]  # fmt: skip


def server_nodes(server_kit: Path) -> dict[str, int]:
    info = json.loads((server_kit / "state" / "server.json").read_text())
    return {site: int(node) for site, node in info["nodes"].items()}


def process_tree(pid: int) -> str:
    """One line per process of ``pid``'s tree: pid, state, kernel wait channel, command."""
    lines = []
    for member in [pid, *descendants(pid)]:
        proc = Path(f"/proc/{member}")
        try:
            state = (proc / "stat").read_text().rsplit(")", 1)[1].split()[0]
            wchan = (proc / "wchan").read_text()
            command = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode()[:200]
        except OSError:
            continue
        lines.append(f"{member} {state} {wchan} {command}")
    return "\n".join(lines)


def node_status(server_kit: Path) -> dict[str, str]:
    """Key fingerprint -> status of every node the running SuperLink knows (ListNodes)."""
    control = json.loads((server_kit / "state" / "server.json").read_text())["control"]
    return {n.fingerprint: n.status for n in list_nodes(load_kit(server_kit), control)}


@pytest.mark.unit
def test_coordinator_run_config_maps_node_ids_to_sites(tmp_path: Path) -> None:
    config = coordinator_run_config({"b": 7, "a": 2**64 - 1}, tmp_path / "x" / ".." / "r.json")

    assert json.loads(config["site-nodes"]) == {"7": "b", str(2**64 - 1): "a"}
    assert config["ledger-record"] == str((tmp_path / "r.json").resolve())
    assert config["progress-record"] == str((tmp_path / "progress.jsonl").resolve())


@pytest.mark.integration
@pytest.mark.timeout(900)
def test_a_revoked_site_is_refused_at_its_next_connection(tmp_path: Path) -> None:
    # Prepare: three sites; a and b hold copies of their kits (as real sites do) and train.
    federation, port = provision(tmp_path, SITES)
    server_kit = federation / "server"
    csvs = write_site_csvs(tmp_path, 2)
    kits = {s: shutil.copytree(federation / "sites" / s, tmp_path / f"kit-{s}") for s in SITES[:2]}
    key_a = ssh_fingerprint((kits["site-a"] / "site.pub").read_bytes())
    key_c = ssh_fingerprint((federation / "sites" / "site-c" / "site.pub").read_bytes())
    server_log = tmp_path / "server.log"
    with fedvault_process(
        ["server", "start", "--kit", str(server_kit), "--listen", f"127.0.0.1:{port}"], server_log
    ) as server:
        wait_for(server_log, r"^ready:", server, timeout=120)
        nodes = server_nodes(server_kit)
        a_log, b_log = tmp_path / "a.log", tmp_path / "b.log"
        with (
            fedvault_process(client_args(kits["site-a"], csvs[0]), a_log) as site_a,
            fedvault_process(client_args(kits["site-b"], csvs[1]), b_log) as site_b,
        ):
            wait_for(a_log, r"fedvault client site", site_a, timeout=120)
            wait_for(b_log, r"fedvault client site", site_b, timeout=120)
            run, _ = fedvault(
                ["run", "--kit", str(server_kit), "--sites", "2", "--rounds", "1",
                 "--epsilon", "1", "--out", str(tmp_path / "run")],
                timeout=400,
            )  # fmt: skip
            assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
            assert ledger_entries(kits["site-a"] / "state" / "privacy-ledger.sqlite")

            # Execute: revoke site-a while the coordinator runs and site-a is connected.
            revoke, _ = fedvault(
                ["provision", "revoke-site", "--out", str(federation), "--site", "site-a"], 60
            )
            revoked_at = time.monotonic()
            try:
                site_a.wait(timeout=REFUSED_WITHIN_S)
            except subprocess.TimeoutExpired:
                supernode_log = kits["site-a"] / "state" / "supernode.log"
                pytest.fail(
                    f"site-a still ran {REFUSED_WITHIN_S:g} s after its key was revoked\n"
                    f"--- a.log\n{a_log.read_text()[-3000:]}\n"
                    f"--- supernode.log\n{supernode_log.read_text()[-6000:]}\n"
                    f"--- site-a's process tree\n{process_tree(site_a.pid)}"
                )
            dropped_after = time.monotonic() - revoked_at
            print(f"site-a dropped {dropped_after:.1f} s after the revocation")
            # The restarted site is turned away at activation, within a bounded time.
            restart, restart_seconds = fedvault(
                client_args(kits["site-a"], csvs[0]), timeout=REFUSED_WITHIN_S
            )
            site_b_alive = site_b.poll() is None
            listed = node_status(server_kit)
    # Site-c's key is revoked while the coordinator is down; a fresh start registers neither.
    revoke_c, _ = fedvault(
        ["provision", "revoke-site", "--out", str(federation), "--site", "site-c"], 60
    )
    second_log = tmp_path / "server-2.log"
    with fedvault_process(
        ["server", "start", "--kit", str(server_kit), "--listen", f"127.0.0.1:{port}"], second_log
    ) as server:
        second = wait_for(second_log, r"^ready:", server, timeout=120)
        nodes_again = server_nodes(server_kit)
        listed_again = node_status(server_kit)
        later, _ = fedvault(client_args(kits["site-a"], csvs[0]), timeout=REFUSED_WITHIN_S)

    # Assert: what revoke-site did at the running coordinator.
    assert revoke.returncode == 0, revoke.stderr
    assert f"unregistered node {nodes['site-a']} at the running coordinator" in revoke.stdout
    assert listed[key_a] == "unregistered"
    # The connected site was dropped at its next request, and said why.
    assert site_a.returncode not in (0, None) and dropped_after < REFUSED_WITHIN_S
    assert re.search(r"refused this site's key .*revoked", a_log.read_text()), a_log.read_text()
    # Its restart was refused with a clear line, not a traceback.
    assert restart.returncode == 7, restart.stdout + restart.stderr
    assert "did not accept this site's key: it was revoked" in restart.stderr
    assert "Traceback" not in restart.stdout + restart.stderr
    assert restart_seconds < REFUSED_WITHIN_S
    assert site_b_alive  # the other site stayed connected
    # A fresh start registers neither revoked key; site-b keeps its node id.
    assert revoke_c.returncode == 0 and "no running coordinator" in revoke_c.stdout
    assert "1 site(s) registered: site-b" in second
    assert "revoked, not registered: site-a, site-c (unregistered now: site-c)" in second
    assert nodes_again == {"site-b": nodes["site-b"]}
    assert listed_again[key_a] == listed_again[key_c] == "unregistered"
    assert later.returncode == 7 and "it was revoked" in later.stderr
