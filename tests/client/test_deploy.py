"""Tests for client/deploy.py: a refused SuperNode activation, told apart by its own log."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

import fedvault.deploy_cli as deploy_cli
from client.deploy import REACTIVATION_WINDOW_S, refusal_reason
from server.launch import ManagedProcess

pytestmark = pytest.mark.integration  # starts (tiny) processes


def _finished(args: list[str], log: Path) -> ManagedProcess:
    process = ManagedProcess(args, log_path=log, env={})
    process.proc.wait(timeout=30)
    return process


def test_a_refusal_in_an_earlier_processs_log_is_not_this_ones(tmp_path: Path) -> None:
    # Prepare: an earlier SuperNode was refused; this one exited for another reason
    log = tmp_path / "supernode.log"
    refused = "[code: 2004] Failed to activate SuperNode"
    first = _finished([sys.executable, "-c", f"print({refused!r})"], log)
    second = _finished([sys.executable, "-c", "print('some other failure')"], log)

    # Execute / Assert: each process is judged by what it wrote itself
    reason = refusal_reason(first)
    assert reason is not None and "never provisioned, or" in reason
    assert refusal_reason(second) is None
    assert refused in log.read_text()  # the earlier line is still in the shared log


def test_the_clis_rejoin_default_is_the_deployment_codes() -> None:
    assert deploy_cli.REACTIVATION_WINDOW_S == REACTIVATION_WINDOW_S
