"""A deployed site's progress: one event per message its ClientApp handled (common/progress.py).

The event goes to the file named by the node config's ``progress-path`` (``fedvault client
start`` sets it to ``kit/state/progress.jsonl`` and prints each event as one line); a
simulated site has none and writes nothing. An event holds the round, the message kind, the
number of rows used, seconds, the site's ε and cap, and for a refusal its reason.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable
from typing import Any, cast

from flwr.app import Context, Message

from fedvault.common.errors import REFUSAL_CODE_BASE
from fedvault.common.progress import append_event

Handler = Callable[[Message, Context], Message]
PROGRESS_PATH_KEY = "progress-path"


def _round(msg: Message) -> int:
    config = msg.content.config_records.get("config")
    if config is None:
        return 0
    try:
        return int(cast(int, config.get("server-round", 0)))
    except (TypeError, ValueError):
        return 0


def site_event(msg: Message, reply: Message | None, seconds: float) -> dict[str, Any]:
    """What the site tells its operator about one message (no rows, no weights)."""
    event: dict[str, Any] = {
        "kind": msg.metadata.message_type.removeprefix("query."),
        "round": _round(msg),
        "run": msg.metadata.run_id,
        "seconds": round(seconds, 3),
    }
    if reply is None:
        event["failed"] = "the handler raised an error (see state/supernode.log)"
    elif reply.has_error():
        reason = reply.error.reason
        key = "refused" if reply.error.code >= REFUSAL_CODE_BASE else "failed"
        event[key] = reason
    elif (metrics := reply.content.metric_records.get("metrics")) is not None:
        event["rows"] = int(cast(int, metrics.get("num-examples", 0)))
        if "max-epsilon" in metrics:
            event["epsilon"] = float(cast(float, metrics.get("epsilon", 0.0)))
            event["max_epsilon"] = float(cast(float, metrics["max-epsilon"]))
        if "accuracy" in metrics:
            event["accuracy"] = float(cast(float, metrics["accuracy"]))
    elif (schema := reply.content.config_records.get("schema")) is not None:
        event["rows"] = int(cast(int, schema.get("train-rows", 0)))
    return event


def reports_progress(handler: Handler) -> Handler:
    """Append a progress event for every message ``handler`` answers (deployed sites only)."""

    @functools.wraps(handler)
    def wrapper(msg: Message, context: Context) -> Message:
        path = context.node_config.get(PROGRESS_PATH_KEY)
        started = time.perf_counter()
        reply: Message | None = None
        try:
            reply = handler(msg, context)
            return reply
        finally:
            if path:
                append_event(str(path), **site_event(msg, reply, time.perf_counter() - started))

    return wrapper
