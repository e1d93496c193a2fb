"""Tests for client/supernode.py: the shortened waits, the entry point, the Flower code patched."""

from __future__ import annotations

import importlib
import importlib.metadata
import inspect
import os
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from fedvault.client.supernode import (
    ACTIVE_POLL_S,
    ACTIVE_WAITS,
    ACTIVE_WINDOW_S,
    FLOWER_HEARTBEAT_S,
    FLOWER_IDLE_WAIT_S,
    FLOWER_PULL_BACKOFF_S,
    FLOWER_REPLY_WAIT_S,
    FLWR_VERSION,
    IDLE_POLL_S,
    NODE_HEARTBEAT_MODULES,
    NODE_HEARTBEAT_S,
    PATCHED_MODULE,
    PULL_BACKOFF_S,
    PULL_FUNCTIONS,
    REPLY_POLL_S,
    TASK_HEARTBEAT_MODULES,
    TASK_HEARTBEAT_S,
    TASK_LIFETIME_S,
    TASK_STORE_MODULES,
    WAITS,
    ShortWaits,
    plain_flower_logs,
    shorten_node_heartbeat,
    shorten_pull_backoff,
    shorten_task_heartbeat,
    shorten_waits,
    supernode_command,
)


class _Recorder:
    """A stand-in ``time`` module that records what it was asked to sleep."""

    def __init__(self) -> None:
        self.slept: list[float] = []
        self.now = 42.0

    def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)

    def monotonic(self) -> float:
        return self.now


def _shim(recorder: _Recorder) -> ShortWaits:
    return ShortWaits(WAITS, real=recorder, active_waits=ACTIVE_WAITS)  # type: ignore[arg-type]


# --- the shim ------------------------------------------------------------------------------


@pytest.mark.unit
def test_flowers_fixed_waits_are_shortened() -> None:
    recorder = _Recorder()
    shim = _shim(recorder)

    shim.sleep(3)  # the idle poll, as Flower writes it (an int), before any message
    shim.sleep(0.5)  # the reply waits: the site handles a message

    assert recorder.slept == [IDLE_POLL_S, REPLY_POLL_S] == [0.5, 0.02]
    assert (FLOWER_IDLE_WAIT_S, FLOWER_REPLY_WAIT_S) == (3, 0.5)


@pytest.mark.unit
def test_the_idle_poll_is_short_while_a_run_is_active_and_slow_after() -> None:
    recorder = _Recorder()
    shim = _shim(recorder)

    shim.sleep(3)  # no message yet: slow
    shim.sleep(0.5)  # a message is handled at t = 42
    recorder.now += ACTIVE_WINDOW_S - 1
    shim.sleep(3)  # the run's next message may come any moment: fast
    recorder.now += 2
    shim.sleep(3)  # nothing for longer than the window: slow again
    shim.sleep(0.5)  # the next message
    shim.sleep(3)

    assert recorder.slept == [IDLE_POLL_S, REPLY_POLL_S, ACTIVE_POLL_S, IDLE_POLL_S,
                              REPLY_POLL_S, ACTIVE_POLL_S]  # fmt: skip
    assert ACTIVE_POLL_S < IDLE_POLL_S


@pytest.mark.unit
@pytest.mark.parametrize("seconds", [0, 0.1, 1, 2.9, 3.0001, 0.49, 10])
def test_other_durations_are_slept_as_asked(seconds: float) -> None:
    recorder = _Recorder()
    _shim(recorder).sleep(seconds)
    assert recorder.slept == [seconds]


@pytest.mark.unit
def test_the_shim_is_the_time_module_otherwise() -> None:
    # Prepare
    shim = ShortWaits(WAITS)
    before = time.time()

    # Execute
    now, tick, tock = shim.time(), shim.monotonic(), shim.monotonic()

    # Assert: the real clocks, and the real module's attributes
    assert before <= now <= time.time()
    assert tick <= tock <= time.monotonic()
    assert shim.perf_counter is time.perf_counter and shim.struct_time is time.struct_time
    assert _shim(_Recorder()).monotonic() == 42.0  # delegates to whatever it wraps
    with pytest.raises(AttributeError):
        shim.no_such_function  # noqa: B018
    # a real sleep is really shortened
    started = time.monotonic()
    shim.sleep(0.5)
    assert time.monotonic() - started < 0.4


# --- the patch -----------------------------------------------------------------------------


@pytest.fixture
def flower_loop() -> Any:
    """Flower's SuperNode loop module, with its own ``time`` put back afterwards."""
    module = importlib.import_module(PATCHED_MODULE)
    saved = module.time
    yield module
    module.time = saved


@pytest.mark.unit
def test_shorten_waits_replaces_the_loops_time_once(flower_loop: Any) -> None:
    assert flower_loop.time is time

    shim = shorten_waits()

    assert shim is not None and flower_loop.time is shim and shim.real is time
    assert shim.waits == {3.0: 0.5, 0.5: 0.02} and shim.active_waits == {3.0: 0.05}
    assert shorten_waits() is shim  # applying it twice wraps nothing twice
    assert time.sleep is not shim.sleep  # the real module is untouched


class _NoReplyYet:
    """A NodeState whose ClientApp has not replied by the third look."""

    def __init__(self) -> None:
        self.looks = 0

    def get_messages(self, *, is_reply: bool) -> list[Any]:
        self.looks += 1
        if self.looks == 3:
            raise KeyboardInterrupt  # stops Flower's wait loop here
        return []


@pytest.mark.unit
def test_flowers_own_reply_wait_goes_through_the_shim(flower_loop: Any) -> None:
    # Prepare: the shim installed, over a recorder instead of the real clock
    assert shorten_waits() is not None
    recorder = _Recorder()
    flower_loop.time.real = recorder
    state = _NoReplyYet()

    # Execute: Flower's own _push_messages, waiting for a reply that does not come
    with pytest.raises(KeyboardInterrupt):
        flower_loop._push_messages(state=state, object_store=None, send=None, push_object=None)

    # Assert: Flower's 0.5 s waits were 0.02 s ones
    assert recorder.slept == [REPLY_POLL_S, REPLY_POLL_S]


@pytest.mark.unit
def test_another_flower_release_keeps_its_own_waits(
    flower_loop: Any, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import flwr

    monkeypatch.setattr(flwr, "__version__", "1.40.0")

    assert shorten_waits() is None

    assert flower_loop.time is time
    assert "flwr 1.40.0 is not 1.39.0" in capsys.readouterr().err


@pytest.mark.unit
def test_supernode_command_runs_this_module_isolated() -> None:
    args = ["--superlink", "127.0.0.1:9092", "--node-config", "a b"]
    assert supernode_command(args) == [
        sys.executable,
        "-I",
        "-m",
        "fedvault.client.supernode",
        *args,
    ]


# --- the entry point -----------------------------------------------------------------------


@pytest.mark.integration  # starts a Python process
def test_the_entry_point_runs_flowers_supernode_command(tmp_path: Path) -> None:
    # Prepare: from a folder holding a `client` package that must not be imported
    decoy = tmp_path / "cwd"
    (decoy / "client").mkdir(parents=True)
    (decoy / "client" / "__init__.py").write_text("raise SystemExit('decoy imported')\n")
    (decoy / "client" / "supernode.py").write_text("raise SystemExit('decoy imported')\n")
    env = {**os.environ, "PYTHONPATH": str(decoy), "FLWR_HOME": str(tmp_path / "flwr-home"),
           "FLWR_DISABLE_UPDATE_CHECK": "1"}  # fmt: skip

    # Execute
    result = subprocess.run(
        [*supernode_command(["--help"])], cwd=decoy, capture_output=True, text=True,
        timeout=120, env=env, check=False,
    )  # fmt: skip

    # Assert: Flower's own parser answered, under Flower's command name
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("usage: flower-supernode ")
    assert "--superlink" in result.stdout and "--isolation" in result.stdout
    assert "not shortened" not in result.stderr


class _Stderr:
    def __init__(self, *, tty: bool) -> None:
        self.tty = tty

    def isatty(self) -> bool:
        return self.tty

    def write(self, text: str) -> int:
        return len(text)


@pytest.mark.unit
@pytest.mark.parametrize("tty", [False, True])
def test_flower_logs_are_coloured_only_on_a_terminal(
    tty: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Prepare: Flower's console handler as it starts (coloured)
    from flwr.supercore.logger import console_handler

    monkeypatch.setattr(console_handler, "colored", True)
    monkeypatch.setattr(sys, "stderr", _Stderr(tty=tty))

    # Execute
    plain_flower_logs()

    # Assert: colours stay for a terminal, go for a log file
    assert console_handler.colored is tty


# --- what this relies on in Flower ---------------------------------------------------------


@pytest.mark.unit
def test_flower_is_the_release_the_supernode_patch_was_written_for() -> None:
    import flwr
    from flwr.supernode.cli import flower_supernode

    loop = importlib.import_module(PATCHED_MODULE)
    assert flwr.__version__ == FLWR_VERSION == "1.39.0"
    # the loop reaches `time` as a module global, so replacing it reaches every call
    assert loop.time is time
    assert re.search(r"^import time$", inspect.getsource(loop), re.MULTILINE)
    # exactly the waits replaced: one idle poll in the loop, two reply waits in the push
    source = inspect.getsource(loop)
    calls = re.findall(r"\btime\.sleep\(([^)]*)\)", source)
    assert sorted(calls) == ["0.5", "0.5", "3"]
    assert "time.sleep(3)" in inspect.getsource(loop.start_client_internal)
    assert inspect.getsource(loop._push_messages).count("time.sleep(0.5)") == 2
    # no other use of `time` in the module (whatever it were, the shim delegates it)
    assert set(re.findall(r"\btime\.(\w+)", source)) == {"sleep"}
    # and the idle poll is the `run_id is None` branch of the pull loop
    pull = inspect.getsource(loop.start_client_internal)
    assert pull.index("if run_id is None:") < pull.index("time.sleep(3)") < pull.index("continue")
    # the command is Flower's console script, which runs this loop
    entry = importlib.metadata.entry_points(group="console_scripts", name="flower-supernode")
    assert [e.value for e in entry] == ["flwr.supernode.cli:flower_supernode"]
    assert "start_client_internal(" in inspect.getsource(flower_supernode)
    assert "parse_args()" in inspect.getsource(
        importlib.import_module("flwr.supernode.cli.flower_supernode")
    )


# --- object pulls: the first retry ------------------------------------------------------------


@pytest.fixture
def pull_defaults() -> Any:
    """Flower's pull functions' keyword defaults, restored after the test."""
    from flwr.supercore.inflatable import inflatable_utils

    saved = {name: dict(getattr(inflatable_utils, name).__kwdefaults__)
             for name in PULL_FUNCTIONS}  # fmt: skip
    yield inflatable_utils
    for name, defaults in saved.items():
        getattr(inflatable_utils, name).__kwdefaults__.update(defaults)


@pytest.mark.unit
def test_flowers_pulls_retry_after_one_second_and_every_caller_takes_the_default(
    pull_defaults: Any,
) -> None:
    from flwr.supercore.constant import PULL_INITIAL_BACKOFF
    from flwr.superlink.grid import http_grid
    from flwr.supernode import start_client_internal
    from flwr.supernode.runtime import run_clientapp

    # What the patch replaces: both pull functions default to Flower's 1 s first backoff
    assert PULL_INITIAL_BACKOFF == FLOWER_PULL_BACKOFF_S == 1
    for name in PULL_FUNCTIONS:
        source = inspect.getsource(getattr(pull_defaults, name))
        assert "initial_backoff: float = PULL_INITIAL_BACKOFF," in source, name
    # and no caller on a message's path passes its own backoff
    for module in (run_clientapp, start_client_internal, http_grid):
        source = inspect.getsource(module)
        assert re.search(r"pull_(objects|and_inflate_object_from_tree)\(", source), module
        assert "initial_backoff" not in source, module


@pytest.mark.unit
def test_the_first_retry_is_shortened_and_nothing_else(pull_defaults: Any) -> None:
    before = {n: dict(getattr(pull_defaults, n).__kwdefaults__) for n in PULL_FUNCTIONS}

    assert shorten_pull_backoff() is True
    assert shorten_pull_backoff() is True  # twice changes nothing

    for name in PULL_FUNCTIONS:
        after = getattr(pull_defaults, name).__kwdefaults__
        assert after["initial_backoff"] == PULL_BACKOFF_S
        assert {k: v for k, v in after.items() if k != "initial_backoff"} == {
            k: v for k, v in before[name].items() if k != "initial_backoff"
        }


@pytest.mark.unit
def test_a_missing_object_is_asked_for_again_within_the_short_backoff(
    pull_defaults: Any,
) -> None:
    from flwr.supercore.inflatable.inflatable_utils import ObjectUnavailableError, pull_objects

    shorten_pull_backoff()
    asked: list[float] = []

    def pull(object_id: str) -> bytes:
        asked.append(time.monotonic())
        if len(asked) < 3:  # not there yet twice, as when the SuperNode is still receiving it
            raise ObjectUnavailableError(object_id)
        return b"content"

    started = time.monotonic()
    assert pull_objects(["o1"], pull) == {"o1": b"content"}

    # two retries after 0.02 s and 0.04 s (±20 %); Flower's own would take at least 2.4 s
    assert len(asked) == 3 and asked[-1] - started < 2.0


# --- heartbeats ------------------------------------------------------------------------------


@pytest.fixture
def heartbeat_modules() -> Any:
    """Every module whose heartbeat constants the patch sets, restored after the test."""
    names = {*NODE_HEARTBEAT_MODULES, *TASK_HEARTBEAT_MODULES, *TASK_STORE_MODULES}
    modules = [importlib.import_module(name) for name in sorted(names)]
    saved = [(m, dict(vars(m))) for m in modules]
    yield {m.__name__: m for m in modules}
    for module, values in saved:
        for key in ("HEARTBEAT_DEFAULT_INTERVAL", "HEARTBEAT_PATIENCE"):
            if key in values:
                setattr(module, key, values[key])


@pytest.mark.unit
def test_flower_reads_its_heartbeat_constants_where_the_patch_sets_them() -> None:
    from flwr.client.grpc_rere_client import connection
    from flwr.common import constant
    from flwr.supercore import heartbeat
    from flwr.supercore.corestate import in_memory_corestate, sql_corestate

    assert constant.HEARTBEAT_DEFAULT_INTERVAL == FLOWER_HEARTBEAT_S == 30
    assert constant.HEARTBEAT_PATIENCE == 2
    # the SuperLink accepts fedvault's node interval (it refuses one under its floor)
    assert constant.HEARTBEAT_MIN_INTERVAL == NODE_HEARTBEAT_S
    # the SuperNode declares its interval at activation and in every heartbeat
    source = inspect.getsource(connection)
    assert source.count("heartbeat_interval=HEARTBEAT_DEFAULT_INTERVAL") == 2
    # the sender (SuperNode and task alike) paces itself by the module global
    assert "HEARTBEAT_DEFAULT_INTERVAL - HEARTBEAT_CALL_TIMEOUT" in inspect.getsource(
        heartbeat.HeartbeatSender._run
    )
    # the task stores: a claim lasts one interval; a running task, patience x interval
    for store in (in_memory_corestate, sql_corestate):
        source = inspect.getsource(store)
        assert source.count("seconds=HEARTBEAT_DEFAULT_INTERVAL)") == 1, store
        assert len(re.findall(r"HEARTBEAT_PATIENCE \* HEARTBEAT_DEFAULT_INTERVAL", source)) == 2


@pytest.mark.unit
def test_the_supernode_heartbeats_every_few_seconds_and_fails_a_silent_task_in_30_s(
    heartbeat_modules: Any,
) -> None:
    from datetime import timedelta

    from flwr.supercore.date import now
    from flwr.supercore.object_store import ObjectStoreFactory
    from flwr.supernode.nodestate.in_memory_nodestate import InMemoryNodeState

    assert shorten_node_heartbeat() is True
    assert shorten_node_heartbeat() is True  # twice changes nothing

    connection = heartbeat_modules["flwr.client.grpc_rere_client.connection"]
    assert connection.HEARTBEAT_DEFAULT_INTERVAL == NODE_HEARTBEAT_S == 10
    # Act on a real SuperNode task store: claim, start, heartbeat
    state = InMemoryNodeState(ObjectStoreFactory().store())
    task_id = state.create_task("clientapp", run_id=1)
    assert task_id is not None
    start = now()
    assert state.claim_task(task_id) is not None
    claimed = state.task_token_store[task_id].active_until - start
    assert state.activate_task(task_id)
    running = state.task_token_store[task_id].active_until - start
    assert state.acknowledge_task_heartbeat(task_id)
    beaten = state.task_token_store[task_id].active_until - start

    slack = timedelta(seconds=2)
    assert abs(claimed - timedelta(seconds=FLOWER_HEARTBEAT_S)) < slack  # a start: Flower's
    assert abs(running - timedelta(seconds=TASK_LIFETIME_S)) < slack
    assert abs(beaten - timedelta(seconds=TASK_LIFETIME_S)) < slack
    assert TASK_LIFETIME_S == 30


@pytest.mark.unit
def test_a_task_heartbeats_well_inside_the_lifetime_its_supernode_allows(
    heartbeat_modules: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    from flwr.common.constant import HEARTBEAT_BASE_MULTIPLIER, HEARTBEAT_CALL_TIMEOUT
    from flwr.common.constant import HEARTBEAT_RANDOM_RANGE as RANGE

    assert shorten_task_heartbeat() is True

    sender = heartbeat_modules["flwr.supercore.heartbeat"]
    interval = sender.HEARTBEAT_DEFAULT_INTERVAL
    longest_gap = (interval - HEARTBEAT_CALL_TIMEOUT) * (HEARTBEAT_BASE_MULTIPLIER + RANGE[1])
    assert interval == TASK_HEARTBEAT_S
    assert longest_gap + HEARTBEAT_CALL_TIMEOUT < TASK_LIFETIME_S / 3  # three misses allowed
    # Flower's own pace would still fit (a task process the patch missed is not failed)
    flower_gap = (FLOWER_HEARTBEAT_S - HEARTBEAT_CALL_TIMEOUT) * (
        HEARTBEAT_BASE_MULTIPLIER + RANGE[1]
    )
    assert flower_gap + HEARTBEAT_CALL_TIMEOUT < TASK_LIFETIME_S


@pytest.mark.unit
def test_another_flower_release_keeps_its_own_heartbeats(
    heartbeat_modules: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    import flwr

    monkeypatch.setattr(flwr, "__version__", "1.40.0")

    assert shorten_node_heartbeat() is False
    assert shorten_task_heartbeat() is False
    for module in heartbeat_modules.values():
        assert module.HEARTBEAT_DEFAULT_INTERVAL == FLOWER_HEARTBEAT_S
        assert getattr(module, "HEARTBEAT_PATIENCE", 2) == 2


@pytest.mark.unit
def test_a_task_process_shortens_its_heartbeat_before_flowers_loop_runs(
    monkeypatch: pytest.MonkeyPatch, heartbeat_modules: Any
) -> None:
    from fedvault.client import launcher

    seen: list[int] = []
    sender = heartbeat_modules["flwr.supercore.heartbeat"]
    flower = importlib.import_module("flwr.supernode.cli.flwr_clientapp")
    monkeypatch.setattr(
        flower, "flwr_clientapp", lambda: seen.append(sender.HEARTBEAT_DEFAULT_INTERVAL)
    )
    monkeypatch.setattr(launcher, "install_gate", lambda gate: None)
    monkeypatch.setattr(sys, "argv", list(sys.argv))

    launcher.run_flower_clientapp([], site="a", state=Path("/nonexistent"))

    assert seen == [TASK_HEARTBEAT_S]
