"""fedvault's own `flwr-clientapp`: a site runs only the ClientApp it installed, never a bundle's.

Flower's SuperExec starts `flwr-clientapp` by name from its PATH for every message, and
Flower's own command installs the run's Flower App bundle (FAB) and imports its ClientApp,
with the bundle's folder first on ``sys.path``. `fedvault client start` puts a script of that
name first on the SuperNode's PATH (:func:`write_launcher_script`); it runs this module with
``python -I`` (no current folder, no ``PYTHON*`` variables on ``sys.path``), which runs
Flower's own ClientApp process loop (``flwr.supernode.runtime.run_clientapp``) with two of
its steps replaced:

- ``install_from_fab`` becomes :meth:`BundleGate.install_from_fab`: the bundle is checked
  (:func:`check_bundle`) and never installed or extracted;
- ``get_load_client_app_fn`` becomes :meth:`BundleGate.get_load_client_app_fn`: it returns
  ``fedvault.client.app.app`` from the site's installed package, or, for a refused bundle, a
  ClientApp that only answers with a refusal (error code ``POLICY_REFUSAL_CODE``).

A refusal is logged at the site: one line on stderr (the SuperNode's log) and a JSON line in
``<state>/refused-bundles.log``. tests/client/test_launcher.py pins the Flower names used here.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.metadata
import io
import json
import os
import shlex
import sys
import time
import tomllib
import zipfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedvault.common.errors import POLICY_REFUSAL_CODE, SiteRefusal

#: The one flwr release whose ClientApp process loop this module reuses (pinned in pyproject).
FLWR_VERSION = "1.39.0"

#: What a fedvault bundle may hold: the app description and Flower's content manifest.
BUNDLE_CONFIG = "pyproject.toml"
BUNDLE_MANIFEST = ".info/CONTENT"
#: fedvault's own components, exactly as fedvault/runtime/processes.py's APP_PYPROJECT names them.
COMPONENTS = {"serverapp": "fedvault.server.app:app", "clientapp": "fedvault.client.app:app"}
PUBLISHER = "fedvault"
PROJECT = "fedvault"
#: Largest pyproject.toml / manifest read from a bundle (checked before decompressing).
MAX_MEMBER_BYTES = 64 * 1024

#: Written by `fedvault client start` in the site's state folder.
REFUSALS_LOG = "refused-bundles.log"
SCRIPT_NAME = "flwr-clientapp"


# --- the bundle check ----------------------------------------------------------------------


def installed_version() -> str:
    """The fedvault version installed at this site (a bundle must name exactly this one)."""
    try:
        return importlib.metadata.version("fedvault")
    except importlib.metadata.PackageNotFoundError:
        return ""  # nothing is accepted: no bundle names an empty version


def _read_member(archive: zipfile.ZipFile, name: str) -> bytes:
    info = archive.getinfo(name)
    if info.file_size > MAX_MEMBER_BYTES:
        raise SiteRefusal(f"its {name} is {info.file_size} bytes (at most {MAX_MEMBER_BYTES})")
    with archive.open(info) as handle:
        data = handle.read(MAX_MEMBER_BYTES + 1)
    if len(data) > MAX_MEMBER_BYTES:
        raise SiteRefusal(f"its {name} is larger than {MAX_MEMBER_BYTES} bytes")
    return data


def _check_manifest(manifest: bytes, config: bytes) -> None:
    """Flower's ``.info/CONTENT``: one line ``pyproject.toml,<sha256>,<size in bits>``."""
    expected = f"{BUNDLE_CONFIG},{hashlib.sha256(config).hexdigest()},{len(config) * 8}"
    lines = [line.strip() for line in manifest.decode("utf-8", "replace").splitlines()]
    if [line for line in lines if line] != [expected]:
        raise SiteRefusal(f"its {BUNDLE_MANIFEST} does not describe its {BUNDLE_CONFIG} alone")


def _table(doc: dict[str, Any], *keys: str) -> dict[str, Any]:
    node: Any = doc
    for key in keys:
        node = node.get(key) if isinstance(node, dict) else None
    return node if isinstance(node, dict) else {}


def check_bundle(content: bytes, *, version: str) -> dict[str, Any]:
    """Check a Flower App bundle before anything in it is used; its pyproject if accepted.

    Accepted: a zip holding only ``pyproject.toml`` (and Flower's ``.info/CONTENT`` manifest
    of it), whose components are exactly fedvault's ServerApp and ClientApp, whose publisher
    and project name are ``fedvault`` and whose version is ``version``. Anything else raises
    :class:`SiteRefusal` with the reason: nothing is extracted, written or imported here.
    """
    try:
        archive = zipfile.ZipFile(io.BytesIO(content))
    except (zipfile.BadZipFile, ValueError) as err:
        raise SiteRefusal(f"it is not a Flower App bundle ({err})") from err
    with archive:
        names = [info.filename for info in archive.infolist()]
        extra = sorted({n for n in names if n not in (BUNDLE_CONFIG, BUNDLE_MANIFEST)})
        if extra:
            shown = ", ".join(extra[:5]) + (f" and {len(extra) - 5} more" if len(extra) > 5 else "")
            raise SiteRefusal(f"it ships files besides {BUNDLE_CONFIG}: {shown}")
        if len(names) != len(set(names)):
            raise SiteRefusal("it holds the same file name twice")
        if BUNDLE_CONFIG not in names:
            raise SiteRefusal(f"it has no {BUNDLE_CONFIG}")
        config = _read_member(archive, BUNDLE_CONFIG)
        if BUNDLE_MANIFEST in names:
            _check_manifest(_read_member(archive, BUNDLE_MANIFEST), config)
    try:
        doc = tomllib.loads(config.decode("utf-8"))
    except (UnicodeDecodeError, tomllib.TOMLDecodeError) as err:
        raise SiteRefusal(f"its {BUNDLE_CONFIG} is not valid TOML ({err})") from err
    components = _table(doc, "tool", "flwr", "app", "components")
    if components != COMPONENTS:
        named = ", ".join(f"{k} = {v!r}" for k, v in sorted(components.items())) or "none"
        raise SiteRefusal(f"its components are not fedvault's own ({named})")
    publisher = _table(doc, "tool", "flwr", "app").get("publisher")
    if publisher != PUBLISHER:
        raise SiteRefusal(f"its publisher is {publisher!r}, not {PUBLISHER!r}")
    project = _table(doc, "project")
    if project.get("name") != PROJECT:
        raise SiteRefusal(f"its project is {project.get('name')!r}, not {PROJECT!r}")
    if not version or project.get("version") != version:
        raise SiteRefusal(
            f"it is for fedvault {project.get('version')!r}; this site runs {version or 'none'!r}"
        )
    return doc


# --- refusals --------------------------------------------------------------------------------


def record_refusal(state: Path, *, site: str, run_id: int | None, bundle: str, reason: str) -> str:
    """Log a refused bundle at the site (stderr line + JSON line); the reply's reason text.

    A log file that cannot be written is said on stderr; the bundle stays refused.
    """
    message = f"site {site} refused bundle {bundle[:12]}: {reason}"
    print(
        f"fedvault: {message} (run {run_id}, bundle sha256 {bundle})", file=sys.stderr, flush=True
    )
    line = json.dumps(
        {
            "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "site": site,
            "run_id": run_id,
            "bundle_sha256": bundle,
            "reason": reason,
        }
    )
    try:
        fd = os.open(state / REFUSALS_LOG, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        try:
            os.write(fd, (line + "\n").encode("utf-8"))
        finally:
            os.close(fd)
    except OSError as err:
        print(f"fedvault: could not write {state / REFUSALS_LOG}: {err}", file=sys.stderr)
    return message


class RefusingApp:
    """Stands in for the ClientApp of a refused bundle: every message gets a refusal reply."""

    def __init__(self, reason: str) -> None:
        self.reason = reason

    def __call__(self, message: Any, context: Any) -> Any:
        from flwr.app import Message
        from flwr.app.error import Error

        return Message(Error(code=POLICY_REFUSAL_CODE, reason=self.reason), reply_to=message)


def installed_client_app() -> Any:
    """fedvault's ClientApp, imported from the package this launcher was imported from."""
    module = importlib.import_module("fedvault.client.app")
    home = Path(__file__).resolve().parent
    where = Path(str(module.__file__)).resolve().parent
    if where != home:  # nothing on sys.path may stand in for the installed package
        raise SiteRefusal(f"fedvault.client.app was found at {where}, not in the installed {home}")
    return module.app


# --- the gate: Flower's install and load steps, replaced -----------------------------------


@dataclass
class BundleGate:
    """Replaces the install and load steps of Flower's ClientApp process for one task."""

    site: str
    state: Path
    version: str
    bundle: str = ""  # sha256 of the bundle checked
    refusal: str | None = None  # the reply's reason, once refused
    checked: bool = False

    def _run_id(self) -> int | None:
        from flwr.supercore.task_identity import TaskIdentity

        try:
            return int(TaskIdentity.run_id)
        except (RuntimeError, TypeError, ValueError):  # not set: no task input pulled
            return None

    def _refuse(self, reason: str) -> None:
        if self.refusal is None:
            self.refusal = record_refusal(
                self.state, site=self.site, run_id=self._run_id(), bundle=self.bundle,
                reason=reason,
            )  # fmt: skip

    def install_from_fab(
        self, fab_file: Path | bytes, install_dir: Path | None = None, skip_prompt: bool = False
    ) -> Path:
        """Check the bundle; install nothing (the ClientApp is the installed fedvault's)."""
        del install_dir, skip_prompt
        content = fab_file if isinstance(fab_file, bytes) else b""
        self.bundle = hashlib.sha256(content).hexdigest()
        try:
            check_bundle(content, version=self.version)
        except SiteRefusal as err:
            self._refuse(str(err))
        self.checked = True
        return Path(__file__).resolve().parent

    def get_load_client_app_fn(
        self, default_app_ref: str, app_path: str | None, multi_app: bool
    ) -> Callable[[str, str, str], Any]:
        """A loader that returns fedvault's installed ClientApp, or a refusing one."""
        del default_app_ref, app_path, multi_app

        def load(fab_id: str, fab_version: str, fab_hash: str) -> Any:
            if not self.checked:
                self._refuse("the bundle was not checked before loading")
            elif fab_hash != self.bundle:
                self._refuse(f"the bundle checked is not the run's bundle {fab_hash[:12]}")
            if self.refusal is not None:
                return RefusingApp(self.refusal)
            return installed_client_app()

        return load


def _no_dependency_installation(*args: object, **kwargs: object) -> None:
    raise SiteRefusal("a fedvault site installs no dependencies for a run")


def install_gate(gate: BundleGate) -> None:
    """Put ``gate`` in place of Flower's install and load steps (and its dependency step)."""
    from flwr.supernode.runtime import run_clientapp as loop

    setattr(loop, "install_from_fab", gate.install_from_fab)  # noqa: B010
    setattr(loop, "get_load_client_app_fn", gate.get_load_client_app_fn)  # noqa: B010
    setattr(loop, "install_app_dependencies", _no_dependency_installation)  # noqa: B010


# --- the command ---------------------------------------------------------------------------


DISPATCH_NAME = "fedvault-dispatch.py"


def write_launcher_script(state: Path, *, site: str, worker_socket: Path | None = None) -> Path:
    """Write ``<state>/bin/flwr-clientapp`` (0700); its folder goes first on the SuperNode's PATH.

    Without ``worker_socket`` the script runs this module (a cold launch per task). With it,
    the script runs client/dispatch.py (copied beside it, standard library only), which hands
    each task to the site's warm worker (client/worker.py) and falls back to this module
    when no worker answers. The site name and state folder are written into the script,
    never taken from anything the coordinator controls.
    """
    folder = state / "bin"
    folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    script = folder / SCRIPT_NAME
    cold = [sys.executable, "-I", "-m", "fedvault.client.launcher", "--site", site,
            "--state", str(state.resolve()), "--"]  # fmt: skip
    words = cold
    if worker_socket is not None:
        dispatch = folder / DISPATCH_NAME
        _write_private(dispatch, Path(__file__).with_name("dispatch.py").read_text("utf-8"), 0o600)
        words = [sys.executable, "-I", "-S", str(dispatch.resolve()),
                 str(worker_socket.resolve()), str(len(cold)), *cold]  # fmt: skip
    text = (
        "#!/bin/sh\n"
        f"# fedvault's {SCRIPT_NAME} for site {site!r} (written by `fedvault client start`):\n"
        "# checks each run's bundle and runs only the ClientApp installed with fedvault.\n"
        f'exec {" ".join(shlex.quote(word) for word in words)} "$@"\n'
    )
    _write_private(script, text, 0o700)
    return script


def _write_private(path: Path, text: str, mode: int) -> None:
    """Write ``path`` atomically with ``mode`` (never readable by another user)."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.unlink(missing_ok=True)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    with os.fdopen(fd, "w", encoding="utf-8") as handle:
        handle.write(text)
    os.replace(tmp, path)


def run_flower_clientapp(flower_args: Sequence[str], *, site: str, state: Path) -> None:
    """Flower's `flwr-clientapp` with this site's gate in place (a cold launch or a warm
    worker's task process, client/worker.py); Flower's loop ends it with SystemExit."""
    from flwr.supernode.cli.flwr_clientapp import flwr_clientapp

    from fedvault.client.supernode import (
        plain_flower_logs,
        shorten_pull_backoff,
        shorten_task_heartbeat,
    )

    install_gate(BundleGate(site=site, state=state, version=installed_version()))
    shorten_pull_backoff()  # the task's first pulls often come before the SuperNode has them
    shorten_task_heartbeat()  # its SuperNode gives a silent task 30 s, not Flower's 60 s
    plain_flower_logs()

    # A site never installs a run's dependencies, whatever its SuperExec was told.
    kept = [a for a in flower_args if a != "--allow-runtime-dependency-installation"]
    sys.argv = [SCRIPT_NAME, *kept]
    flwr_clientapp()


def main(argv: Sequence[str] | None = None) -> None:
    """``--site NAME --state DIR -- <flwr-clientapp arguments>``, from the launcher script."""
    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) < 5 or args[0] != "--site" or args[2] != "--state" or args[4] != "--":
        print("usage: python -I -m fedvault.client.launcher --site NAME --state DIR -- ARGS...",
              file=sys.stderr)  # fmt: skip
        raise SystemExit(2)
    run_flower_clientapp(args[5:], site=args[1], state=Path(args[3]))


if __name__ == "__main__":
    main()
