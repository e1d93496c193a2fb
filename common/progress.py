"""Live progress for operators: events appended as JSON lines, followed and printed as lines.

A deployed site's ClientApp appends one event per message it handled to the site's own
``state/progress.jsonl`` (round, kind, rows, seconds, ε spent and the site's cap, or the
refusal and why); the coordinator's ServerApp appends one per run start, round and run end
to the coordinator kit's ``state/progress.jsonl``. `fedvault client start` and `fedvault
server start` follow their file and print each event as one line. Nothing here holds a
data row, a gradient or a weight: counts, seconds, ε and names only.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

PROGRESS_FILE = "progress.jsonl"


def append_event(path: Path | str | None, **event: Any) -> None:
    """Append one event (with its time) to ``path``; a progress file never fails the work."""
    if not path:
        return
    line = json.dumps({"time": time.time(), **event}, sort_keys=True, default=str) + "\n"
    try:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        try:
            os.write(fd, line.encode("utf-8"))
        finally:
            os.close(fd)
    except OSError:
        pass


class Follower:
    """Reads the events appended to a file since the last call (from its end at creation)."""

    def __init__(self, path: Path, *, from_start: bool = False) -> None:
        self.path = path
        self.offset = 0 if from_start or not path.is_file() else path.stat().st_size
        self._partial = b""

    def new_events(self) -> list[dict[str, Any]]:
        try:
            with self.path.open("rb") as handle:
                if os.fstat(handle.fileno()).st_size < self.offset:
                    self.offset = 0  # the file was replaced
                handle.seek(self.offset)
                data = handle.read()
        except OSError:
            return []
        self.offset += len(data)
        data = self._partial + data
        lines = data.split(b"\n")
        self._partial = lines.pop()
        events = []
        for line in lines:
            try:
                event = json.loads(line)
            except ValueError:
                continue
            if isinstance(event, dict):
                events.append(event)
        return events


def _number(value: Any, fmt: str) -> str:
    return "n/a" if value is None else format(value, fmt)


def format_site_event(event: Mapping[str, Any]) -> str:
    """One line per message a site handled, as `fedvault client start` prints it."""
    label = f"round {event.get('round', 0)}" if event.get("round") else "run setup"
    line = f"{label:<9} {event.get('kind', '?'):<8}"
    if event.get("refused"):
        return f"{line} REFUSED: {event['refused']}"
    if event.get("failed"):
        return f"{line} FAILED: {event['failed']}"
    line += f" {event.get('rows', 0):>6} rows  {_number(event.get('seconds'), '.2f')} s"
    if event.get("epsilon") is not None:
        cap = event.get("max_epsilon")
        line += f"  ε {event['epsilon']:.3f}" + (f" / cap {cap:g}" if cap else "")
    if event.get("accuracy") is not None:
        line += f"  accuracy {event['accuracy']:.3f}"
    return line


def format_coordinator_event(event: Mapping[str, Any]) -> str:
    """One line per run start, round and run end, as `fedvault server start` prints it."""
    run = event.get("run", "?")
    kind = event.get("event")
    if kind == "start":
        sites = ", ".join(event.get("sites", [])) or "none yet"
        return f"run {run} started: {event.get('rounds', '?')} rounds; sites {sites}"
    if kind == "end":
        return (
            f"run {run} ended: {event.get('outcome', 'finished')}, max ε "
            f"{_number(event.get('epsilon'), '.3f')}, accuracy "
            f"{_number(event.get('accuracy'), '.3f')}"
        )
    return f"run {run}: {event.get('line', '')}"
