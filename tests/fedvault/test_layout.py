"""The design's import boundaries: client/ and server/ never import each other, and the
role-neutral fedvault/runtime/ imports neither (checked on the source, statically)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[2]


def imported_modules(folder: Path) -> dict[str, set[str]]:
    """Every module each .py file under ``folder`` imports (absolute names, lazy ones too)."""
    found: dict[str, set[str]] = {}
    for path in sorted(folder.glob("*.py")):
        names: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                names.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
                names.add(node.module)
        found[path.name] = names
    return found


@pytest.mark.parametrize(
    ("folder", "forbidden"),
    [
        ("client", ("fedvault.server",)),
        ("server", ("fedvault.client",)),
        ("fedvault/runtime", ("fedvault.server", "fedvault.client")),
    ],
)
def test_a_package_never_imports_what_it_must_not(folder: str, forbidden: tuple[str, ...]) -> None:
    modules = imported_modules(ROOT / folder)

    offending = {
        file: sorted(n for n in names if n.startswith(forbidden))
        for file, names in modules.items()
        if any(n.startswith(forbidden) for n in names)
    }

    assert modules, f"no modules found in {folder}"
    assert offending == {}


def test_the_check_sees_an_import_it_must_refuse(tmp_path: Path) -> None:
    (tmp_path / "bad.py").write_text("def f():\n    from fedvault.server.provision import Kit\n")

    assert imported_modules(tmp_path) == {"bad.py": {"fedvault.server.provision"}}
