"""The one fedvault exception tree, each error carrying a CLI exit code and a hint.

    FedvaultError                  (exit 1)   base class: something fedvault refused or could not do
     ├── ConfigError               (exit 3)   a setting is missing, malformed or out of range
     ├── DataError                 (exit 4)   a dataset or data file cannot be used
     ├── PrivacyBudgetExceeded     (exit 5)   training would spend more epsilon than allowed
     ├── UpdateRejected            (exit 6)   a site's model update failed validation
     ├── ProvisioningError         (exit 7)   keys, certificates or startup kits are unusable
     ├── FederationError           (exit 8)   the Flower runtime (SuperLink, simulation) failed
     ├── LedgerError               (exit 9)   a site's privacy ledger is unusable, tampered with or
     │                                        inconsistent with its data (never silently reset)
     ├── SiteRefusal               (exit 10)  a site refused a run under its own policy (foreign
     │                                        code, another δ or accountant, a model or round cap)
     └── InUseError                (exit 11)  a run folder or kit is in use by another running
                                              fedvault command (named by its PID)

The CLI prints ``str(err)`` as one red line and ``err.hint`` below it, then exits with
``err.exit_code``; it never shows a traceback for these.
"""

from __future__ import annotations

from pathlib import Path


class FedvaultError(Exception):
    """Base class of every error fedvault raises on purpose."""

    exit_code: int = 1
    default_hint: str = "Run the command with --help to see the accepted options."

    def __init__(self, message: str, *, hint: str | None = None) -> None:
        super().__init__(message)
        self.hint = hint if hint is not None else self.default_hint


class ConfigError(FedvaultError):
    """A configuration value (TOML or CLI flag) is missing, malformed or out of range."""

    exit_code = 3
    default_hint = "Check the scenario file and flags; `fedvault simulate --help` lists them."

    def __init__(self, message: str, *, setting: str = "", hint: str | None = None) -> None:
        super().__init__(message, hint=hint)
        #: The setting at fault as the user wrote it: a flag (``--delta``) or a TOML key in
        #: its table (``[privacy] target-delta``); empty when no one setting is.
        self.setting = setting


class DataError(FedvaultError):
    """A dataset or data file cannot be loaded or is unsuitable for training."""

    exit_code = 4
    default_hint = "Check the data file: numeric feature columns and one label column."


class PrivacyBudgetExceeded(FedvaultError):
    """Training would spend more privacy budget (epsilon) than a site allows."""

    exit_code = 5
    default_hint = "Lower the number of rounds or raise the site's maximum epsilon."


class UpdateRejected(FedvaultError):
    """A site's model update failed validation and was excluded from aggregation."""

    exit_code = 6
    default_hint = "Inspect the site's logs; the update was not aggregated."


class ProvisioningError(FedvaultError):
    """Keys, certificates or startup kits are missing, invalid or unsafe."""

    exit_code = 7
    default_hint = "Re-run `fedvault provision` or check the kit folder's contents."


class FederationError(FedvaultError):
    """The Flower runtime (SuperLink, SuperNode or simulation) failed or stopped."""

    exit_code = 8
    default_hint = "See flower.log in the run directory for the Flower runtime's own log."


class LedgerError(FedvaultError):
    """A site's privacy ledger is unusable, was tampered with, or no longer matches its data."""

    exit_code = 9
    default_hint = (
        "Never delete or edit a privacy ledger: restore it from a backup, and check it with "
        "`fedvault client budget --verify`."
    )

    def __init__(self, message: str, *, path: Path | str = "", hint: str | None = None) -> None:
        super().__init__(message, hint=hint)
        #: The ledger (or its anchor) file at fault; empty when no one file is.
        self.path = Path(path) if path else None


class SiteRefusal(FedvaultError):
    """A site refused what the coordinator asked, under the site's own policy."""

    exit_code = 10
    default_hint = "The site's settings (`fedvault client start`) decide what it accepts."


class InUseError(FedvaultError):
    """A run folder or startup kit is held by another fedvault command that is still running."""

    exit_code = 11
    default_hint = "Wait for that command to finish, or stop it (Ctrl-C in its terminal)."

    def __init__(
        self, message: str, *, path: str = "", pid: int = 0, hint: str | None = None
    ) -> None:
        super().__init__(message, hint=hint)
        self.path = path
        self.pid = pid


class RunInterrupted(KeyboardInterrupt):
    """Ctrl-C or SIGTERM stopped a run; ``str()`` is the one line the CLI prints (how to resume)."""


#: A site's refusal travels to the coordinator as an error reply with this code plus the
#: error's exit code (e.g. 1005: privacy budget exhausted), and its message as the reason.
REFUSAL_CODE_BASE = 1000
BUDGET_REFUSAL_CODE = REFUSAL_CODE_BASE + PrivacyBudgetExceeded.exit_code
LEDGER_REFUSAL_CODE = REFUSAL_CODE_BASE + LedgerError.exit_code
POLICY_REFUSAL_CODE = REFUSAL_CODE_BASE + SiteRefusal.exit_code

#: Exit codes the CLI uses besides the error classes above.
EXIT_OK = 0
EXIT_USAGE = 2  # typer/click's own code for a bad command line
EXIT_INTERRUPTED = 130

ERROR_CLASSES: tuple[type[FedvaultError], ...] = (
    FedvaultError,
    ConfigError,
    DataError,
    PrivacyBudgetExceeded,
    UpdateRejected,
    ProvisioningError,
    FederationError,
    LedgerError,
    SiteRefusal,
    InUseError,
)

#: Every exit code the CLI can return, with the help text `fedvault --help` shows.
EXIT_CODES: dict[int, str] = {
    EXIT_OK: "success",
    FedvaultError.exit_code: "fedvault failed (an internal error is reported as a bug)",
    EXIT_USAGE: "bad command line (unknown option, wrong type)",
    ConfigError.exit_code: "invalid configuration (scenario file or flag value)",
    DataError.exit_code: "unusable dataset or data file",
    PrivacyBudgetExceeded.exit_code: "privacy budget exhausted or target unreachable",
    UpdateRejected.exit_code: "a model update was rejected",
    ProvisioningError.exit_code: "keys, certificates or startup kit unusable",
    FederationError.exit_code: "the Flower runtime failed (SuperLink, simulation, sites)",
    LedgerError.exit_code: "a privacy ledger is unusable, tampered with, or unlike its data",
    SiteRefusal.exit_code: "a site refused the run under its own policy",
    InUseError.exit_code: "the run folder or kit is in use by another running fedvault command",
    EXIT_INTERRUPTED: "interrupted (Ctrl-C); partial results are kept in the run directory",
}
