"""fedvault's command line: every typer command lives in this package and calls into the others.

``app`` is the root ``fedvault`` command; ``simulate``, ``deploy`` (``server``/``client``/``run``),
``provision`` and ``export`` hold its subcommands. Nothing outside this package imports typer.
"""

from __future__ import annotations

from fedvault.common.errors import EXIT_CODES

# Markdown bullets: Typer's markdown mode would join plain lines into one paragraph.
EXIT_HELP = "Exit codes:\n\n" + "\n\n".join(
    f"* {code}: {text}" for code, text in sorted(EXIT_CODES.items())
)
