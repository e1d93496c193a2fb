"""The coordinator's per-round checkpoint: everything a resumed run needs to go on.

After every round the coordinator writes ``checkpoint.pt`` in the run directory in one
atomic step (temporary file, fsync, rename): the round number, the global model, the
strategy's own state (e.g. FedAdam's moments, the central-DP accountant), the hash of the
run's configuration, and what the run report has recorded so far (failures, refusals,
rejections). ``metrics.jsonl`` and ``rounds.jsonl`` hold the metrics; a resumed run drops
any row of a round the checkpoint does not cover (that round is run again).
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import pickle
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from fedvault.common.errors import ConfigError
from fedvault.common.report import (
    METRICS_FILE,
    ROUNDS_FILE,
    RunDirectory,
    atomic_write_bytes,
    read_jsonl,
)

# torch is imported where a checkpoint is written or read: `fedvault simulate` and
# `fedvault run` name CHECKPOINT_FILE and drop rows without paying for torch's import.
if TYPE_CHECKING:
    import torch

logger = logging.getLogger(__name__)

CHECKPOINT_FILE = "checkpoint.pt"
CHECKPOINT_FORMAT = 1

#: Named groups of numpy arrays (e.g. {"m_t": {...}, "v_t": {...}}).
ArrayGroups = dict[str, dict[str, np.ndarray]]


def config_digest(config_toml: str) -> str:
    """SHA-256 of the run's effective configuration: a resumed run must use the same one."""
    return "sha256:" + hashlib.sha256(config_toml.encode("utf-8")).hexdigest()


@dataclass(frozen=True, kw_only=True)
class Checkpoint:
    """The state of a run after ``round`` of ``total_rounds`` rounds (round 0: not started)."""

    round: int
    total_rounds: int
    config_sha256: str
    model: dict[str, torch.Tensor]
    strategy_arrays: ArrayGroups = field(default_factory=dict)
    strategy_json: dict[str, Any] = field(default_factory=dict)
    report: dict[str, Any] = field(default_factory=dict)

    @property
    def finished(self) -> bool:
        return self.round >= self.total_rounds


def save_checkpoint(run_dir: RunDirectory, checkpoint: Checkpoint) -> Path:
    """Write ``checkpoint`` atomically; a crash leaves the previous one intact."""
    import torch

    payload = {
        "format": CHECKPOINT_FORMAT,
        "round": checkpoint.round,
        "total_rounds": checkpoint.total_rounds,
        "config_sha256": checkpoint.config_sha256,
        "model": {k: v.detach().cpu() for k, v in checkpoint.model.items()},
        "strategy_arrays": {
            group: {k: torch.from_numpy(np.array(v, copy=True)) for k, v in arrays.items()}
            for group, arrays in checkpoint.strategy_arrays.items()
        },
        # JSON text, so loading never unpickles anything (torch.load weights_only=True).
        "strategy_json": json.dumps(checkpoint.strategy_json, sort_keys=True),
        "report": json.dumps(checkpoint.report, sort_keys=True),
    }
    buffer = io.BytesIO()
    torch.save(payload, buffer)
    path = run_dir.file(CHECKPOINT_FILE)
    atomic_write_bytes(path, buffer.getvalue())
    logger.info("checkpoint: round %d of %d", checkpoint.round, checkpoint.total_rounds)
    return path


def load_checkpoint(run_path: Path) -> Checkpoint:
    """The run's last checkpoint; ConfigError (one line, with a hint) if there is none."""
    path = run_path / CHECKPOINT_FILE
    if not path.is_file():
        raise ConfigError(
            f"{run_path} has no {CHECKPOINT_FILE}: nothing to resume",
            hint="Give the run directory of a fedvault run (it checkpoints after every round).",
        )
    import torch

    try:
        raw = torch.load(path, map_location="cpu", weights_only=True)
        if raw.get("format") != CHECKPOINT_FORMAT:
            raise ConfigError(
                f"{path} has checkpoint format {raw.get('format')!r}; this fedvault reads "
                f"format {CHECKPOINT_FORMAT}"
            )
        return Checkpoint(
            round=int(raw["round"]),
            total_rounds=int(raw["total_rounds"]),
            config_sha256=str(raw["config_sha256"]),
            model=dict(raw["model"]),
            strategy_arrays={
                group: {k: v.numpy() for k, v in arrays.items()}
                for group, arrays in raw["strategy_arrays"].items()
            },
            strategy_json=json.loads(raw["strategy_json"]),
            report=json.loads(raw["report"]),
        )
    except ConfigError:
        raise
    except (OSError, EOFError, pickle.UnpicklingError, RuntimeError, KeyError, TypeError,
            ValueError, AttributeError) as err:  # fmt: skip
        raise ConfigError(
            f"{path} is not a readable fedvault checkpoint: {err}",
            hint="The checkpoint is written atomically; a damaged file was changed by hand.",
        ) from err


def drop_rows_after(run_dir: RunDirectory, last_round: int) -> int:
    """Drop metrics/rounds rows of rounds after ``last_round`` (atomically); how many went."""
    dropped = 0
    for name in (METRICS_FILE, ROUNDS_FILE):
        rows = read_jsonl(run_dir.file(name))
        kept = [r for r in rows if int(r.get("round", 0)) <= last_round]
        if len(kept) != len(rows):
            dropped += len(rows) - len(kept)
            text = "".join(json.dumps(r, sort_keys=True) + "\n" for r in kept)
            atomic_write_bytes(run_dir.file(name), text.encode("utf-8"))
    return dropped


def report_to_json(records: Mapping[str, Mapping[int, Mapping[str, str]]]) -> dict[str, Any]:
    """Per-round records (round -> site -> reason) as JSON (round keys become strings)."""
    return {
        name: {str(rnd): dict(per) for rnd, per in per_round.items()}
        for name, per_round in records.items()
    }


def report_from_json(data: Mapping[str, Any], name: str) -> dict[int, dict[str, str]]:
    """One record group back from ``report_to_json``."""
    return {int(rnd): dict(per) for rnd, per in dict(data.get(name, {})).items()}
