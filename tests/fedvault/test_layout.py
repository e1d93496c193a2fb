"""Import rules: common/ never imports Flower nor a role; client/ and server/ never each other,
and the role-neutral fedvault/runtime/ neither.

Statically (every import statement of every module, function-level ones included) and, for
common/, dynamically in a fresh interpreter: a module that pulls Flower in through a
third-party import would pass the first check and fail the second.
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

import fedvault.client
import fedvault.common
import fedvault.runtime
import fedvault.server

pytestmark = pytest.mark.unit

#: What common/, the framework-free core, must never import.
COMMON_FORBIDDEN = (
    "flwr",
    "fedvault.server",
    "fedvault.client",
    "fedvault.cli",
    "fedvault.runtime",
)


def _folder(package: object) -> Path:
    return Path(package.__file__).resolve().parent  # type: ignore[attr-defined]


def _modules(package: object) -> dict[str, Path]:
    """Dotted module name -> source file, for every module directly in the package's folder."""
    name = package.__name__  # type: ignore[attr-defined]
    return {
        (name if path.stem == "__init__" else f"{name}.{path.stem}"): path
        for path in sorted(_folder(package).glob("*.py"))
    }


def imported_names(module: str, path: Path) -> set[str]:
    """Every module an import statement anywhere in the file names, relative ones resolved."""
    package = module if path.stem == "__init__" else module.rpartition(".")[0]
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                stem = ".".join([*base, node.module] if node.module else base)
            else:
                stem = node.module or ""
            names.add(stem)
            names.update(f"{stem}.{alias.name}" for alias in node.names)
    return names


def offending(package: object, forbidden: tuple[str, ...]) -> dict[str, list[str]]:
    """Module -> the forbidden modules it imports (empty when the rule holds)."""
    found: dict[str, list[str]] = {}
    for module, path in _modules(package).items():
        bad = sorted(
            name
            for name in imported_names(module, path)
            if any(name == f or name.startswith(f"{f}.") for f in forbidden)
        )
        if bad:
            found[module] = bad
    return found


def test_the_scan_finds_absolute_relative_and_function_level_imports(tmp_path: Path) -> None:
    # Prepare: the scan must see what a rule-breaking module would write, or it cannot fail
    source = tmp_path / "sample.py"
    source.write_text(
        "import flwr.common\n"
        "from . import sibling\n"
        "from ..server import strategy\n"
        "def late():\n"
        "    from fedvault.client.app import app\n",
        encoding="utf-8",
    )

    # Execute
    names = imported_names("fedvault.common.sample", source)

    # Assert
    assert {"flwr.common", "fedvault.common.sibling", "fedvault.server.strategy"} <= names
    assert "fedvault.client.app" in names


def test_every_package_scanned_has_its_modules() -> None:
    # A glob that found nothing would make every rule below pass.
    assert {"fedvault.common.privacy", "fedvault.common.ledger"} <= _modules(fedvault.common).keys()
    assert "fedvault.client.app" in _modules(fedvault.client)
    assert "fedvault.server.app" in _modules(fedvault.server)
    assert "fedvault.runtime.kits" in _modules(fedvault.runtime)


def test_no_common_module_imports_flower_or_a_role() -> None:
    assert offending(fedvault.common, COMMON_FORBIDDEN) == {}


def test_importing_every_common_module_loads_no_flower() -> None:
    # Prepare: a fresh, isolated interpreter (no PYTHONPATH, no user site, no cwd on the path)
    modules = sorted(_modules(fedvault.common))
    code = (
        "import importlib, json, sys\n"
        f"for name in {modules!r}:\n"
        "    importlib.import_module(name)\n"
        "print(json.dumps(sorted(m for m in sys.modules if m == 'flwr' or m.startswith("
        "('flwr.', 'fedvault.server', 'fedvault.client', 'fedvault.cli', 'fedvault.runtime')))))\n"
    )

    # Execute
    done = subprocess.run(
        [sys.executable, "-I", "-c", code], capture_output=True, text=True, timeout=300, check=False
    )

    # Assert
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout.splitlines()[-1]) == []


@pytest.mark.parametrize(
    ("package", "forbidden"),
    [
        (fedvault.client, ("fedvault.server",)),
        (fedvault.server, ("fedvault.client",)),
        (fedvault.runtime, ("fedvault.server", "fedvault.client", "fedvault.cli")),
    ],
    ids=["client", "server", "runtime"],
)
def test_a_role_never_imports_the_other(package: object, forbidden: tuple[str, ...]) -> None:
    assert offending(package, forbidden) == {}
