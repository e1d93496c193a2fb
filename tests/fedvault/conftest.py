"""The CLI helpers (fedvault_cli, CliResult) live in tests/conftest.py: others use them too."""

from __future__ import annotations

from tests.conftest import PLAIN_ENV, CliResult

__all__ = ["PLAIN_ENV", "CliResult"]
