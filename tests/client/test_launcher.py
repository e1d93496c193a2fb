"""Tests for client/launcher.py: the bundle check, refusals, and the Flower names it relies on."""

from __future__ import annotations

import hashlib
import importlib
import importlib.metadata
import inspect
import io
import json
import os
import re
import stat
import subprocess
import sys
import time
import zipfile
from pathlib import Path
from typing import Any

import pytest
from flwr.app import Context, Message, RecordDict
from flwr.app.metadata import Metadata
from flwr.cli.build import build_fab_from_disk, build_fab_from_files

from fedvault.client.launcher import (
    FLWR_VERSION,
    REFUSALS_LOG,
    BundleGate,
    RefusingApp,
    check_bundle,
    install_gate,
    installed_version,
    write_launcher_script,
)
from fedvault.common.errors import POLICY_REFUSAL_CODE, SiteRefusal
from fedvault.runtime.processes import APP_PYPROJECT, write_app_dir

VERSION = installed_version()


def _fedvault_fab(tmp_path: Path, **replace: str) -> bytes:
    """The bundle `fedvault run` submits (fedvault.runtime.processes), built by Flower's builder."""
    app = write_app_dir(tmp_path / "app", VERSION)
    text = (app / "pyproject.toml").read_text()
    for old, new in replace.items():
        assert old in text
        text = text.replace(old, new)
    (app / "pyproject.toml").write_text(text)
    return build_fab_from_disk(app)


def _zip(files: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for name, data in files.items():
            archive.writestr(name, data)
    return buffer.getvalue()


def _reason(content: bytes) -> str:
    with pytest.raises(SiteRefusal) as info:
        check_bundle(content, version=VERSION)
    return str(info.value)


# --- the bundle check ----------------------------------------------------------------------


@pytest.mark.unit
def test_fedvaults_own_bundle_is_accepted(tmp_path: Path) -> None:
    fab = _fedvault_fab(tmp_path)
    names = zipfile.ZipFile(io.BytesIO(fab)).namelist()
    assert sorted(names) == [".info/CONTENT", "pyproject.toml"]  # what Flower 1.39 writes
    doc = check_bundle(fab, version=VERSION)
    assert doc["tool"]["flwr"]["app"]["components"]["clientapp"] == "fedvault.client.app:app"


@pytest.mark.unit
def test_a_bundle_with_code_files_is_refused(tmp_path: Path) -> None:
    # Prepare: fedvault's own pyproject, plus a module that would shadow fedvault's
    app = write_app_dir(tmp_path / "app", VERSION)
    (app / "fedvault" / "common").mkdir(parents=True)
    (app / "fedvault" / "common" / "site_privacy.py").write_text("open('/tmp/x', 'w')\n")
    fab = build_fab_from_disk(app)

    # Execute / Assert
    assert "fedvault/common/site_privacy.py" in _reason(fab)


@pytest.mark.unit
@pytest.mark.parametrize(
    ("old", "new", "said"),
    [
        ('clientapp = "fedvault.client.app:app"', 'clientapp = "foreign:app"', "components"),
        ('serverapp = "fedvault.server.app:app"', 'serverapp = "foreign:app"', "components"),
        (
            'clientapp = "fedvault.client.app:app"',
            'clientapp = "fedvault.client.app:app"\nagentapp = "x:app"',
            "components",
        ),
        ('publisher = "fedvault"', 'publisher = "mallory"', "publisher"),
        ('name = "fedvault"', 'name = "fedvault-evil"', "project"),
        (f'version = "{VERSION}"', 'version = "99.0.0"', "99.0.0"),
    ],
)
def test_a_bundle_not_naming_fedvaults_own_app_is_refused(
    tmp_path: Path, old: str, new: str, said: str
) -> None:
    assert said in _reason(_fedvault_fab(tmp_path, **{old: new}))


@pytest.mark.unit
def test_malformed_bundles_are_refused(tmp_path: Path) -> None:
    good = _fedvault_fab(tmp_path)
    config = zipfile.ZipFile(io.BytesIO(good)).read("pyproject.toml")
    assert "not a Flower App bundle" in _reason(b"not a zip")
    assert "no pyproject.toml" in _reason(_zip({".info/CONTENT": b""}))
    assert "CONTENT" in _reason(_zip({"pyproject.toml": config, ".info/CONTENT": b"x,y,z"}))
    assert "not valid TOML" in _reason(_zip({"pyproject.toml": b"[[["}))
    assert "bytes" in _reason(_zip({"pyproject.toml": b"#" * 70_000}))
    with pytest.warns(UserWarning):  # zipfile warns about the duplicate name
        twice = _duplicate(config)
    assert "twice" in _reason(twice)
    # and a bundle for no version at all is refused even when both sides are empty
    with pytest.raises(SiteRefusal):
        check_bundle(good, version="")


def _duplicate(config: bytes) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr("pyproject.toml", config)
        archive.writestr("pyproject.toml", b"[tool]\n")
    return buffer.getvalue()


# --- the gate ------------------------------------------------------------------------------


def _message() -> Message:
    """A train message as the SuperLink delivers it to node 1 (cf. tests/client/test_app.py)."""
    metadata = Metadata(
        run_id=7, message_id="m1", src_node_id=0, dst_node_id=1, reply_to_message_id="",
        group_id="", created_at=time.time(), ttl=3600.0, message_type="train",
    )  # fmt: skip
    return Message(RecordDict(), metadata=metadata)  # type: ignore[call-overload]


@pytest.mark.unit
def test_a_refused_bundle_is_logged_and_answered_with_a_refusal(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # Prepare
    foreign = build_fab_from_files(
        {
            "pyproject.toml": APP_PYPROJECT.replace("{version}", VERSION)
            .replace("{clientapp}", "foreign:app")
            .encode(),
            "foreign.py": b"app = None\n",
        }
    )[0]
    digest = hashlib.sha256(foreign).hexdigest()
    gate = BundleGate(site="hospital-a", state=tmp_path, version=VERSION)

    # Execute: Flower's loop calls these two, in this order
    gate.install_from_fab(foreign, skip_prompt=True)
    app = gate.get_load_client_app_fn(default_app_ref="", app_path=None, multi_app=True)(
        "fedvault/fedvault", VERSION, digest
    )
    reply = app(_message(), Context(1, 1, {}, RecordDict(), {}))

    # Assert: a refusal reply, a stderr line and a JSON line, all naming the bundle
    assert isinstance(app, RefusingApp)
    assert reply.has_error() and reply.error.code == POLICY_REFUSAL_CODE
    assert reply.error.reason.startswith(f"site hospital-a refused bundle {digest[:12]}: ")
    assert "foreign.py" in reply.error.reason
    assert digest in capsys.readouterr().err
    (record,) = [json.loads(line) for line in (tmp_path / REFUSALS_LOG).read_text().splitlines()]
    assert record["bundle_sha256"] == digest and "foreign.py" in record["reason"]
    assert set(record) == {"time", "site", "run_id", "bundle_sha256", "reason"}
    assert not (tmp_path / "fedvault").exists() and not any(tmp_path.glob("*.py"))


@pytest.mark.unit
def test_an_accepted_bundle_loads_the_installed_clientapp(tmp_path: Path) -> None:
    import fedvault.client.app

    fab = _fedvault_fab(tmp_path)
    gate = BundleGate(site="s", state=tmp_path, version=VERSION)
    gate.install_from_fab(fab, skip_prompt=True)
    load = gate.get_load_client_app_fn("", None, True)

    assert (
        load("fedvault/fedvault", VERSION, hashlib.sha256(fab).hexdigest())
        is fedvault.client.app.app
    )
    # a loader asked for another bundle than the one checked refuses (fail closed)
    assert isinstance(load("fedvault/fedvault", VERSION, "0" * 64), RefusingApp)
    assert "not the run's bundle" in (tmp_path / REFUSALS_LOG).read_text()


@pytest.mark.unit
def test_a_loader_without_a_check_refuses(tmp_path: Path) -> None:
    gate = BundleGate(site="s", state=tmp_path, version=VERSION)
    app = gate.get_load_client_app_fn("", None, True)("x", "y", "")
    assert isinstance(app, RefusingApp) and "not checked" in app.reason


# --- the script ----------------------------------------------------------------------------


@pytest.mark.integration  # starts a Python process
def test_the_launcher_script_runs_fedvaults_module_isolated(tmp_path: Path) -> None:
    # Prepare: a site name and a state folder a shell would split or expand
    state = tmp_path / "st ate $HOME"
    state.mkdir()
    script = write_launcher_script(state, site="site 'a'")

    # Execute: from a folder holding a `client` package that must not be imported
    decoy = tmp_path / "cwd"
    (decoy / "client").mkdir(parents=True)
    (decoy / "client" / "__init__.py").write_text("raise SystemExit('decoy imported')\n")
    (decoy / "client" / "launcher.py").write_text("raise SystemExit('decoy imported')\n")
    result = subprocess.run(
        [str(script), "--help"], cwd=decoy, capture_output=True, text=True, timeout=120,
        env={**os.environ, "PYTHONPATH": str(decoy)}, check=False,
    )  # fmt: skip

    # Assert
    assert stat.S_IMODE(script.stat().st_mode) == 0o700
    assert result.returncode == 0, result.stderr
    assert "--runtime-api-address" in result.stdout  # Flower's flwr-clientapp parser
    text = script.read_text()
    assert f"{sys.executable} -I -m fedvault.client.launcher" in text


# --- what this relies on in Flower ---------------------------------------------------------


def _params(fn: Any) -> list[tuple[str, Any]]:
    return [(p.name, p.kind) for p in inspect.signature(fn).parameters.values()]


@pytest.mark.unit
def test_flower_is_the_release_the_launcher_was_written_for() -> None:
    from flwr.cli.install import install_from_fab
    from flwr.clientapp.utils import get_load_client_app_fn
    from flwr.supercore.constant import TASK_TYPE_TO_COMMAND, TaskType
    from flwr.supercore.task_identity import TaskIdentity
    from flwr.supernode.runtime import run_clientapp as loop

    assert importlib.metadata.version("flwr") == FLWR_VERSION == "1.39.0"
    # the SuperExec starts the ClientApp process by this name, from its PATH
    assert TASK_TYPE_TO_COMMAND[TaskType.CLIENT_APP] == "flwr-clientapp"
    # the names replaced in the loop's module, with the signatures the gate mirrors
    assert loop.install_from_fab is install_from_fab or callable(loop.install_from_fab)
    gate = BundleGate(site="s", state=Path(), version="")
    assert _params(install_from_fab) == _params(gate.install_from_fab)
    assert _params(get_load_client_app_fn) == _params(gate.get_load_client_app_fn)
    assert hasattr(loop, "install_app_dependencies")
    assert isinstance(type(TaskIdentity).__dict__["run_id"], property)  # the gate reads it
    # the loop calls them, in this order, and imports the ClientApp nowhere else
    source = re.sub(r"\s+", " ", inspect.getsource(loop.run_clientapp))
    install = source.index("install_from_fab(fab.content, skip_prompt=True)")
    loader = source.index("load_client_app_fn = get_load_client_app_fn(")
    load = source.index("client_app: ClientApp = load_client_app_fn( run.fab_id,")
    run = source.index("reply_message = client_app(message=message, context=context)")
    assert install < loader < load < run
    assert "sys.path" not in source and "import_module" not in source
    # flwr-clientapp parses its arguments and hands them to this loop
    command = importlib.import_module("flwr.supernode.cli.flwr_clientapp")
    main = inspect.getsource(command.flwr_clientapp)
    assert "run_clientapp(" in main and "runtime_dependency_install=" in main


@pytest.mark.unit
def test_install_gate_replaces_the_loops_steps(tmp_path: Path) -> None:
    from flwr.supernode.runtime import run_clientapp as loop

    names = ("install_from_fab", "get_load_client_app_fn", "install_app_dependencies")
    saved = {name: getattr(loop, name) for name in names}
    try:
        gate = BundleGate(site="s", state=tmp_path, version=VERSION)
        install_gate(gate)
        assert loop.install_from_fab == gate.install_from_fab
        assert loop.get_load_client_app_fn == gate.get_load_client_app_fn
        with pytest.raises(SiteRefusal):
            loop.install_app_dependencies(tmp_path)
    finally:
        for name, value in saved.items():
            setattr(loop, name, value)
