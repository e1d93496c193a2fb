"""`pip install .` puts one top-level name, `fedvault`, into site-packages, and nothing else.

A partner's machine may already have packages called `common`, `server` or `client`; fedvault's
folders of those names install as `fedvault.common`, `fedvault.server`, … (pyproject.toml's
package mapping). The wheel is built from this checkout and installed without dependencies
into a folder of its own: what lands there is exactly what a partner's site-packages gets.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
#: The design's top-level folders that install under fedvault.*.
MAPPED = ("common", "server", "client", "simulations")

pytestmark = pytest.mark.integration


def tracked_copy(target: Path) -> Path:
    """The checkout's tracked files (symlinks kept as symlinks): what a fresh clone holds.

    pip builds a local folder in place and setuptools leaves ``build/`` there, so the wheel
    is built from this copy, never from the checkout itself.
    """
    listed = subprocess.run(
        ["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True
    ).stdout.decode()
    for name in filter(None, listed.split("\0")):
        source = ROOT / name
        if not source.exists() and not source.is_symlink():
            continue  # deleted in the working tree, not yet committed
        (target / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(source, target / name, follow_symlinks=False)
    return target


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """`pip install --no-deps .` of a copy of this checkout into a fresh target folder."""
    source = tracked_copy(tmp_path_factory.mktemp("checkout"))
    target = tmp_path_factory.mktemp("site-packages")
    env = {**os.environ, "PIP_DISABLE_PIP_VERSION_CHECK": "1"}
    done = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation",
         "--target", str(target), str(source)],
        capture_output=True, text=True, env=env, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    return target


def test_only_fedvault_is_a_top_level_name(installed: Path) -> None:
    # Execute
    tops = {p.name for p in installed.iterdir() if p.name not in ("bin", "__pycache__")}

    # Assert
    names = {name for name in tops if not name.endswith(".dist-info")}
    assert names == {"fedvault"}, sorted(tops)
    (dist_info,) = installed.glob("fedvault-*.dist-info")
    assert (dist_info / "entry_points.txt").read_text().count("fedvault.cli.app:main") == 1


def test_the_mapped_folders_are_real_files_with_their_data(installed: Path) -> None:
    # Execute
    package = installed / "fedvault"

    # Assert: copies, not the checkout's symlinks, and the TOML data files travel with them
    for folder in MAPPED:
        assert (package / folder).is_dir() and not (package / folder).is_symlink(), folder
        sources = {p.name for p in (ROOT / folder).glob("*.py")}
        assert sources <= {p.name for p in (package / folder).glob("*.py")}, folder
    assert (package / "common" / "defaults.toml").is_file()
    assert (package / "simulations" / "hospitals.toml").is_file()
    assert (package / "cli" / "app.py").is_file()
    assert (package / "runtime" / "processes.py").is_file()


def test_every_package_folder_is_declared() -> None:
    # A package folder missing from pyproject's list would be left out of the wheel silently.
    # Prepare
    declared = set(
        tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]
    )

    # Execute: walk through the checkout's symlinks (fedvault/common -> ../common, …)
    found = {
        "fedvault" + folder.removeprefix(str(ROOT / "fedvault")).replace(os.sep, ".")
        for folder, _dirs, files in os.walk(ROOT / "fedvault", followlinks=True)
        if "__init__.py" in files
    }

    # Assert
    assert declared == found
    assert {f"fedvault.{name}" for name in MAPPED} <= found


def test_the_installed_package_imports_without_the_checkout(
    installed: Path, tmp_path: Path
) -> None:
    # Prepare: the target folder first on the path (-I: no checkout, no PYTHONPATH)
    code = (
        "import sys, fedvault, fedvault.common.config_values as c, fedvault.cli.app\n"
        "print(fedvault.__file__)\n"
        "print(c.load_defaults()['privacy']['target-delta'])\n"
        "import importlib.util\n"
        "print([n for n in ('common', 'server', 'client', 'simulations')"
        " if importlib.util.find_spec(n)])\n"
    )

    # Execute
    done = subprocess.run(
        [sys.executable, "-I", "-c", f"import sys; sys.path[:0] = [{str(installed)!r}]\n{code}"],
        capture_output=True, text=True, cwd=tmp_path, timeout=120,
    )  # fmt: skip

    # Assert
    assert done.returncode == 0, done.stderr
    where, delta, stray = done.stdout.splitlines()
    assert where.startswith(str(installed))
    assert float(delta) == 1e-5
    assert stray == "[]"
