"""The README's deployment commands, exactly as written, run against real processes on loopback.

Only what cannot run here is substituted: the server address (fl.example.org:9092 becomes a
free loopback port, through `provision --server-address`) and the site's data path
(/secure/patients.csv becomes patients.csv in the site's working folder, laid out as the
README says: the kit copied to ``kit``; /backup/privacy-ledger.sqlite becomes a copy of the
site's ledger in that folder).
"""

from __future__ import annotations

import json
import re
import shutil
import signal
import subprocess
import sys
import tomllib
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch

from fedvault.runtime.processes import free_port
from tests.deployment import fedvault_env, wait_for, write_site_csvs
from tests.readme import README, bash_commands, run_fedvault

pytestmark = [pytest.mark.integration, pytest.mark.timeout(900)]

ROOT = README.parent
README_ADDRESS = "fl.example.org:9092"
README_DATA = "/secure/patients.csv"
README_BACKUP = "/backup/privacy-ledger.sqlite"


def find(commands: list[list[str]], *prefix: str) -> list[str]:
    """The first command that starts with ``prefix`` (and has every word of it)."""
    for words in commands:
        if words[: len(prefix)] == list(prefix):
            return words
    raise AssertionError(f"the README no longer has a `{' '.join(prefix)}` command")


def option(words: list[str], flag: str) -> str:
    return words[words.index(flag) + 1]


def test_the_readme_deployment_commands_run_as_written(tmp_path: Path) -> None:
    # Prepare: the README's commands, and working folders for the coordinator and each site.
    server_cmds = [w for block in bash_commands("## Run a federation server") for w in block]
    site_cmds = [w for block in bash_commands("## Deploy a partner site") for w in block]
    provision_cmd = find(server_cmds, "fedvault", "provision")
    start_cmd = find(server_cmds, "fedvault", "server", "start")
    run_cmd = find(server_cmds, "fedvault", "run")
    scenario_run_cmd = next(w for w in server_cmds if w[:2] == ["fedvault", "run"] and w != run_cmd)
    status_cmd = find(server_cmds, "fedvault", "server", "status")
    chmod_line = next(" ".join(w) for w in site_cmds if w[0] == "chmod")
    client_cmd = find(site_cmds, "fedvault", "client", "start")
    # The other `client start` lines: one per site (the first site gets the first line; on a
    # machine with a GPU the --device line replaces it, elsewhere it must fail in one line).
    variants = [w for w in site_cmds if w[:3] == ["fedvault", "client", "start"]][1:]
    cuda_cmd = next(w for w in variants if "--device" in w)
    cap_cmd = next(w for w in variants if "--max-epsilon" in w)
    threads_cmd = next(w for w in variants if "--threads" in w)
    assert len(variants) == 3
    assert option(provision_cmd, "--server-address") == README_ADDRESS
    assert option(client_cmd, "--data") == README_DATA
    assert start_cmd == ["fedvault", "server", "start", "--kit", "federation/server"]
    port = free_port()
    provision_here = [w.replace(README_ADDRESS, f"127.0.0.1:{port}") for w in provision_cmd]
    client_here = [w.replace(README_DATA, "patients.csv") for w in client_cmd]
    gpu = torch.cuda.is_available()
    site_words = [cuda_cmd if gpu else client_here, cap_cmd, threads_cmd]
    coordinator = tmp_path / "coordinator"
    coordinator.mkdir()

    # Execute: provision, start the coordinator, deploy every site, submit the run.
    provisioned = run_fedvault(provision_here, coordinator, timeout=120)
    assert provisioned.returncode == 0, provisioned.stdout + provisioned.stderr
    federation = coordinator / option(provision_cmd, "--out")
    sites = option(provision_cmd, "--sites").split(",")
    csvs = write_site_csvs(tmp_path, len(sites))
    site_dirs = []
    for site, csv in zip(sites, csvs, strict=True):
        folder = tmp_path / site
        shutil.copytree(federation / "sites" / site, folder / "kit")
        shutil.copy(csv, folder / "patients.csv")
        chmod = subprocess.run(chmod_line, shell=True, cwd=folder, check=False)
        assert chmod.returncode == 0
        site_dirs.append(folder)
    shutil.copy(ROOT / "simulations" / "hospitals.toml", coordinator / scenario_run_cmd[-1])
    if not gpu:  # no GPU here: the --device cuda:0 line says so in one line, before connecting
        no_gpu = run_fedvault(cuda_cmd, site_dirs[0], timeout=120)
        assert no_gpu.returncode == 3, no_gpu.stdout + no_gpu.stderr
        assert "no CUDA GPU visible" in no_gpu.stdout + no_gpu.stderr
        assert "Traceback" not in no_gpu.stdout + no_gpu.stderr
    server_log = tmp_path / "server.log"
    with process_in(coordinator, start_cmd, server_log) as server:
        ready = wait_for(server_log, r"^ready:", server, timeout=180)
        site_procs = []
        try:
            for folder, words in zip(site_dirs, site_words, strict=True):
                log = folder / "client.log"
                ctx = process_in(folder, words, log)
                site_procs.append((ctx, ctx.__enter__(), log))
            for _, proc, log in site_procs:
                wait_for(log, r"connected to the coordinator as node \d+", proc, timeout=180)
            wait_for(server_log, rf"\({len(sites)}/{len(sites)} online\)", server, timeout=60)
            status = run_fedvault(status_cmd, coordinator, timeout=120)
            run = run_fedvault(run_cmd, coordinator, timeout=600)
            wait_for(server_log, r"ended: finished", server, timeout=60)
            record = json.loads(
                (coordinator / start_cmd[-1] / "state" / "site-ledgers.json").read_text()
            )
            scenario_run = run_fedvault(scenario_run_cmd, coordinator, timeout=600)
        finally:
            for ctx, _, _ in reversed(site_procs):
                ctx.__exit__(None, None, None)

    # Assert: the coordinator listened where the README says, and the run finished.
    assert f"on 0.0.0.0:{port}, {len(sites)} site(s) registered" in ready
    assert server.returncode == 0, server_log.read_text()
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    rounds = int(option(run_cmd, "--rounds"))
    assert re.search(rf"round {rounds}/{rounds}\s+accuracy \d\.\d{{3}}", run.stdout)
    summary = json.loads((coordinator / option(run_cmd, "--out") / "summary.json").read_text())
    assert summary["rounds"] == rounds and sorted(summary["site_epsilon"]) == sorted(sites)
    assert 0 < summary["epsilon"] <= float(option(run_cmd, "--epsilon"))
    assert [proc.returncode for _, proc, _ in site_procs] == [0] * len(sites)
    # Live progress: the coordinator saw the sites connect and printed the run's rounds;
    # `server status` listed every site online; each site printed its messages with its ε.
    coordinator_lines = server_log.read_text()
    for site in sites:
        assert re.search(rf"^site {site} connected \(\d/{len(sites)} online\)$",
                         coordinator_lines, re.MULTILINE)  # fmt: skip
    assert re.search(rf"^run \S+ started: {rounds} rounds; sites {', '.join(sorted(sites))}$",
                     coordinator_lines, re.MULTILINE)  # fmt: skip
    assert re.search(rf"^run \S+: round {rounds}/{rounds}\s+accuracy", coordinator_lines, re.M)
    assert status.returncode == 0, status.stdout + status.stderr
    assert f"{len(sites)}/{len(sites)} site(s) online" in status.stdout
    caps = [option(w, "--max-epsilon") if "--max-epsilon" in w else "10" for w in site_words]
    for site, (_, _, log), cap in zip(sites, site_procs, caps, strict=True):
        lines = log.read_text()
        assert re.search(rf"^site {site}: round 1\s+train\s+\d+ rows\s+[\d.]+ s\s+ε [\d.]+ / "
                         rf"cap {cap}$", lines, re.M), lines  # fmt: skip
        assert re.search(rf"^site {site}: round {rounds}\s+evaluate\s+\d+ rows", lines, re.M)
    # The ServerApp got the authenticated node map and kept every site's ledger head.
    assert summary["ledger_alerts"] == {}
    assert {site: seen["count"] for site, seen in record["sites"].items()} == {
        site: rounds for site in sites
    }
    # The scenario run: its rounds and privacy from my_scenario.toml, at the same sites,
    # each site's ε composed over both runs (and under the cap that site set).
    assert scenario_run.returncode == 0, scenario_run.stdout[-3000:] + scenario_run.stderr[-3000:]
    scenario = tomllib.loads((coordinator / scenario_run_cmd[-1]).read_text())
    more = int(scenario["federation"]["rounds"])
    assert re.search(rf"round {more}/{more}\s+accuracy \d\.\d{{3}}", scenario_run.stdout)
    first_out = (coordinator / option(run_cmd, "--out")).resolve()
    (last_path,) = [p for p in (coordinator / "runs").glob("*/summary.json")
                    if p.parent.resolve() != first_out]  # fmt: skip
    last = json.loads(last_path.read_text())
    assert (
        last["rounds"] == more and last["target_epsilon"] == scenario["privacy"]["target-epsilon"]
    )
    for site, cap in zip(sites, caps, strict=True):
        assert summary["site_epsilon"][site] < last["site_epsilon"][site] <= float(cap), site
    rounds += more  # what each site's ledger now holds

    # The README's budget commands, at the first site after the run.
    folder = site_dirs[0]
    ledger = folder / "kit" / "state" / "privacy-ledger.sqlite"
    shutil.copy(ledger, folder / "privacy-ledger.sqlite")
    shutil.copy(ledger.with_name(ledger.name + ".anchor"), folder / "privacy-ledger.sqlite.anchor")
    budget_cmds = [w for w in site_cmds if w[:3] == ["fedvault", "client", "budget"]]
    assert len(budget_cmds) == 3, budget_cmds
    answers = [
        run_fedvault(
            [w.replace(README_BACKUP, "privacy-ledger.sqlite") for w in words], folder, 120
        )
        for words in budget_cmds
    ]
    assert [a.returncode for a in answers] == [0, 0, 0], [a.stdout + a.stderr for a in answers]
    assert "privacy ledger" in answers[0].stdout and "max ε = 10 per dataset" in answers[0].stdout
    assert answers[1].stdout.startswith(f"ledger intact: {rounds} entries")
    report = json.loads(answers[2].stdout)
    assert report["max_epsilon"] == 8 and len(report["datasets"]) == 1
    assert 0 < report["datasets"][0]["epsilon"] <= 8


@contextmanager
def process_in(folder: Path, words: list[str], log: Path) -> Iterator[subprocess.Popen[bytes]]:
    """A long-running README command typed in ``folder``; SIGTERM (then SIGKILL) at the end."""
    assert words[0] == "fedvault"
    with log.open("wb") as handle:
        proc = subprocess.Popen(
            [sys.executable, "-m", "fedvault", *words[1:]],
            cwd=folder, stdout=handle, stderr=subprocess.STDOUT, env=fedvault_env(),
        )  # fmt: skip
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=10)
