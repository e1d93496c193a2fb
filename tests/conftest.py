"""Helpers for every test package: `fedvault ARGS` in this process, through its entry point."""

from __future__ import annotations

import signal
import sys
from collections.abc import Callable
from dataclasses import dataclass

import pytest

#: Plain, wide output: no colour codes, and error lines never wrapped.
PLAIN_ENV = {"NO_COLOR": "1", "COLUMNS": "200"}


@dataclass(frozen=True)
class CliResult:
    """What `fedvault ARGS` left: its exit code, stdout and stderr."""

    code: int
    out: str
    err: str

    @property
    def err_lines(self) -> list[str]:
        return [line.strip() for line in self.err.splitlines() if line.strip()]


@pytest.fixture
def fedvault_cli(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> Callable[..., CliResult]:
    """Run `fedvault ARGS` through fedvault.cli.app.main, as the console script does."""
    from fedvault.cli.app import main

    def run(*args: str) -> CliResult:
        monkeypatch.setattr(sys, "argv", ["fedvault", *args])
        monkeypatch.setattr(signal, "signal", lambda *_: None)  # keep pytest's own handlers
        for name, value in PLAIN_ENV.items():
            monkeypatch.setenv(name, value)
        capsys.readouterr()
        code = 0
        try:
            main()
        except SystemExit as done:
            code = done.code if isinstance(done.code, int) else (0 if done.code is None else 1)
        out, err = capsys.readouterr()
        return CliResult(code=code, out=out, err=err)

    return run
