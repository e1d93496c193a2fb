"""fedvault's `flower-supernode`: Flower's own SuperNode with its fixed waits shortened.

Flower 1.39.0's SuperNode loop (``flwr.supernode.start_client_internal``) waits a fixed time
in three places, none of them configurable:

- ``time.sleep(3)`` after each pull of the SuperLink that brought no message: an idle site
  notices a new message 1.5 s late on average, and a round waits for the slowest of its
  sites, twice (train, evaluate);
- ``time.sleep(0.5)`` in ``_push_messages`` while the ClientApp has not replied yet, and
- ``time.sleep(0.5)`` there while a reply's object content is not yet in the object store:
  every reply is sent up to 0.5 s after the ClientApp produced it.

This module replaces that module's global ``time`` by :class:`ShortWaits`, which stands in
for the ``time`` module (every attribute is the real module's) except that ``sleep(0.5)``
becomes a reply poll of :data:`REPLY_POLL_S` and ``sleep(3)`` an idle poll of
:data:`ACTIVE_POLL_S` for :data:`ACTIVE_WINDOW_S` after the site last handled a message (a
run's next message is noticed at once) and of :data:`IDLE_POLL_S` otherwise (a site with no
run asks the SuperLink twice a second, not 20 times); any other duration is slept as asked.
It also shortens the heartbeats (:func:`shorten_node_heartbeat`): the SuperNode declares
Flower's floor of 10 s to the SuperLink, not 30 s, so a dead site is seen offline (and its
round's messages answered "Node Unavailable") after 20 s, not 60 s; and a task process that
sends no heartbeat for 30 s, not 60 s, is failed, so a killed ClientApp ends its message
sooner. Task processes, fedvault's own (client/launcher.py), heartbeat every 4 s
(:func:`shorten_task_heartbeat`).
Then it runs Flower's own ``flower-supernode`` command
(``flwr.supernode.cli.flower_supernode``, the console script of that name) with the given
arguments, so the SuperNode is Flower's in every other respect.

`fedvault client start` runs it as
``python -I -m fedvault.client.supernode <flower-supernode args>``
(:func:`supernode_command`). The patch is applied only to the Flower release it was read
from (:data:`FLWR_VERSION`); on any other the SuperNode runs with Flower's own waits and says
so on stderr. tests/client/test_supernode.py pins the calls replaced here, as
tests/client/test_launcher.py does for client/launcher.py (fedvault's `flwr-clientapp`).
"""

from __future__ import annotations

import importlib
import sys
import time
import types
from collections.abc import Mapping, Sequence
from typing import Any

#: The one flwr release whose SuperNode loop this module patches (pinned in pyproject).
FLWR_VERSION = "1.39.0"
#: The module whose global ``time`` is replaced.
PATCHED_MODULE = "flwr.supernode.start_client_internal"
COMMAND = "flower-supernode"

#: Flower's wait after a pull that brought no message, and fedvault's: while a run is
#: active (a message handled in the last ACTIVE_WINDOW_S seconds), and otherwise.
FLOWER_IDLE_WAIT_S = 3.0
ACTIVE_POLL_S = 0.05
ACTIVE_WINDOW_S = 30.0
IDLE_POLL_S = 0.5
#: Flower's wait for a ClientApp's reply (and its content), and fedvault's.
FLOWER_REPLY_WAIT_S = 0.5
REPLY_POLL_S = 0.02

#: Flower's fixed waits → fedvault's, with no run active and while one is.
WAITS: Mapping[float, float] = {FLOWER_IDLE_WAIT_S: IDLE_POLL_S, FLOWER_REPLY_WAIT_S: REPLY_POLL_S}
ACTIVE_WAITS: Mapping[float, float] = {FLOWER_IDLE_WAIT_S: ACTIVE_POLL_S}


class ShortWaits:
    """Stands in for the ``time`` module: the same clocks, shorter fixed waits.

    ``sleep(s)`` sleeps ``waits[s]`` where ``s`` is one of Flower's fixed waits, else ``s``;
    within ``active_window`` seconds of a sleep of ``activity`` seconds (Flower's wait for a
    ClientApp's reply: the site is handling a message) ``active_waits[s]`` comes first. Every
    other attribute (``time``, ``monotonic``, ...) is the real module's.
    """

    def __init__(
        self,
        waits: Mapping[float, float],
        real: types.ModuleType = time,
        *,
        active_waits: Mapping[float, float] | None = None,
        active_window: float = ACTIVE_WINDOW_S,
        activity: float = FLOWER_REPLY_WAIT_S,
    ) -> None:
        self.waits = dict(waits)
        self.active_waits = dict(active_waits or {})
        self.active_window = active_window
        self.activity = activity
        self.real = real
        self.active_at: float | None = None

    def sleep(self, seconds: float) -> None:
        now = self.real.monotonic()
        if seconds == self.activity:
            self.active_at = now
        active = self.active_at is not None and now - self.active_at < self.active_window
        if active and seconds in self.active_waits:
            self.real.sleep(self.active_waits[seconds])
        else:
            self.real.sleep(self.waits.get(seconds, seconds))

    def __getattr__(self, name: str) -> Any:
        return getattr(self.real, name)

    def __repr__(self) -> str:
        return f"<fedvault ShortWaits over {self.real!r}: {self.waits}>"


def shorten_waits() -> ShortWaits | None:
    """Put :class:`ShortWaits` in place of Flower's SuperNode loop's ``time``; it, or None.

    None (nothing replaced, a line on stderr) where Flower is not :data:`FLWR_VERSION` or its
    loop has no module global ``time``. Applying it twice changes nothing.
    """
    import flwr

    module = importlib.import_module(PATCHED_MODULE)
    current = getattr(module, "time", None)
    if isinstance(current, ShortWaits):
        return current
    reason = None
    if flwr.__version__ != FLWR_VERSION:
        reason = f"flwr {flwr.__version__} is not {FLWR_VERSION}, whose SuperNode loop it knows"
    elif current is not time:
        reason = f"{PATCHED_MODULE} has no module global `time`"
    if reason is not None:
        print(
            f"fedvault: SuperNode waits not shortened: {reason}; Flower's own waits apply",
            file=sys.stderr,
            flush=True,
        )
        return None
    shim = ShortWaits(WAITS, real=time, active_waits=ACTIVE_WAITS)
    setattr(module, "time", shim)  # noqa: B010
    return shim


#: Flower's first wait before pulling an object again that is not there yet, and fedvault's.
FLOWER_PULL_BACKOFF_S = 1.0
PULL_BACKOFF_S = 0.02
#: Flower's object pulls; both read the first backoff from a keyword default.
PULL_FUNCTIONS = ("pull_objects", "pull_and_inflate_object_from_tree")


def shorten_pull_backoff() -> bool:
    """Make Flower's object pulls retry after :data:`PULL_BACKOFF_S`, not 1 s; True if done.

    A SuperNode stores a message before its objects have arrived, and Flower's SuperExec starts
    the ClientApp as soon as the message is stored; so the task's first pull finds an object
    missing and Flower waits ``PULL_INITIAL_BACKOFF`` (1 s, doubling to 10 s) before it asks
    again. The same happens to a SuperNode pulling a message whose objects the SuperLink is
    still receiving. Only the first backoff changes (it still doubles, to the same cap, within
    the same 500 tries and 2-hour limit), and only on :data:`FLWR_VERSION`.
    """
    import flwr
    from flwr.supercore.inflatable import inflatable_utils

    if flwr.__version__ != FLWR_VERSION:
        return False
    for name in PULL_FUNCTIONS:
        defaults = getattr(inflatable_utils, name).__kwdefaults__ or {}
        if defaults.get("initial_backoff") not in (FLOWER_PULL_BACKOFF_S, PULL_BACKOFF_S):
            return False
        defaults["initial_backoff"] = PULL_BACKOFF_S
    return True


#: Flower 1.39's heartbeat interval (s), for a SuperNode's link to the SuperLink and for a
#: task process's link to its SuperNode; a peer is given up after HEARTBEAT_PATIENCE (2) of
#: them, and a task claimed by SuperExec must start within one.
FLOWER_HEARTBEAT_S = 30
#: fedvault's interval for the SuperNode's heartbeat: the SuperLink's floor
#: (``HEARTBEAT_MIN_INTERVAL``), so a dead site is seen offline after 20 s, not 60 s. A
#: heartbeat goes every (interval - 5 s) x 0.7-0.9, about every 4 s.
NODE_HEARTBEAT_S = 10
#: fedvault's interval for a task process's heartbeat (about every 4 s), and how long the
#: SuperNode lets a running task go without one before it fails the task (Flower: 60 s): a
#: killed task is noticed in at most this long. A claimed task still has Flower's 30 s to
#: start (a cold launch imports torch).
TASK_HEARTBEAT_S = 10
TASK_LIFETIME_S = 30
#: Where each interval is read: the SuperNode's Fleet connection (activation and heartbeat
#: requests), the heartbeat sender's period (SuperNode and task processes alike), and the
#: SuperNode's task store (its ``HEARTBEAT_PATIENCE * HEARTBEAT_DEFAULT_INTERVAL``).
NODE_HEARTBEAT_MODULES = ("flwr.client.grpc_rere_client.connection", "flwr.supercore.heartbeat")
TASK_HEARTBEAT_MODULES = ("flwr.supercore.heartbeat",)
TASK_STORE_MODULES = (
    "flwr.supercore.corestate.in_memory_corestate",
    "flwr.supercore.corestate.sql_corestate",
)


def _set_interval(modules: Sequence[str], seconds: float) -> bool:
    """Set ``HEARTBEAT_DEFAULT_INTERVAL`` in ``modules`` (all or none); True if done."""
    import flwr

    found = [importlib.import_module(name) for name in modules]
    known = (FLOWER_HEARTBEAT_S, seconds)
    if flwr.__version__ != FLWR_VERSION or any(
        getattr(m, "HEARTBEAT_DEFAULT_INTERVAL", None) not in known for m in found
    ):
        return False
    for module in found:
        setattr(module, "HEARTBEAT_DEFAULT_INTERVAL", seconds)  # noqa: B010
    return True


def shorten_node_heartbeat() -> bool:
    """In the SuperNode: heartbeat the SuperLink every :data:`NODE_HEARTBEAT_S`-based period
    and let a running task go :data:`TASK_LIFETIME_S` without a heartbeat; True if done.

    Only on :data:`FLWR_VERSION`. The task store's lifetime is its ``HEARTBEAT_PATIENCE``
    times Flower's interval, which also bounds a claimed task's start; so the patience is
    scaled (30 s x 1 = 30 s) and the start bound stays Flower's.
    """
    import flwr

    stores = [importlib.import_module(name) for name in TASK_STORE_MODULES]
    patience = TASK_LIFETIME_S / FLOWER_HEARTBEAT_S
    if flwr.__version__ != FLWR_VERSION or any(
        getattr(m, "HEARTBEAT_DEFAULT_INTERVAL", None) != FLOWER_HEARTBEAT_S
        or getattr(m, "HEARTBEAT_PATIENCE", None) not in (2, patience)
        for m in stores
    ):
        return False
    if not _set_interval(NODE_HEARTBEAT_MODULES, NODE_HEARTBEAT_S):
        return False
    for module in stores:
        setattr(module, "HEARTBEAT_PATIENCE", patience)  # noqa: B010
    return True


def shorten_task_heartbeat() -> bool:
    """In a task process: heartbeat the SuperNode about every 4 s (:data:`TASK_HEARTBEAT_S`),
    well inside the :data:`TASK_LIFETIME_S` its SuperNode allows; True if done."""
    return _set_interval(TASK_HEARTBEAT_MODULES, TASK_HEARTBEAT_S)


def supernode_command(args: Sequence[str]) -> list[str]:
    """The command line that runs fedvault's SuperNode with ``flower-supernode`` ``args``."""
    return [sys.executable, "-I", "-m", "fedvault.client.supernode", *args]


def plain_flower_logs() -> None:
    """Turn Flower's log colours off unless stderr is a terminal (a log file needs none)."""
    if not sys.stderr.isatty():
        from flwr.supercore.logger import update_console_handler

        update_console_handler(colored=False)


def main(argv: Sequence[str] | None = None) -> None:
    """Shorten the waits, then run Flower's ``flower-supernode`` with ``argv``."""
    args = list(sys.argv[1:] if argv is None else argv)
    shorten_waits()
    shorten_pull_backoff()
    if not shorten_node_heartbeat():
        print(
            "fedvault: SuperNode heartbeats not shortened (not the Flower release fedvault "
            "knows); Flower's own apply",
            file=sys.stderr,
            flush=True,
        )
    plain_flower_logs()
    from flwr.supernode.cli import flower_supernode

    sys.argv = [COMMAND, *args]  # Flower's parser reads sys.argv (and names itself after it)
    flower_supernode()


if __name__ == "__main__":
    main()
