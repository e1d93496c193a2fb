"""Registries of fedvault's mode names (accountants, strategies): one per set, each listing the
valid names when given a wrong one (as Opacus' ``accountants/registry.py``).

Only names, one-line descriptions and defaults live here, so that ``fedvault --help`` can
read them without importing Opacus, torch or Flower; the implementations bind their tables
to a registry (``Registry.bind``), which refuses a table that does not name exactly its
names.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import TypeVar

from fedvault.common.config_values import default_of
from fedvault.common.errors import ConfigError

T = TypeVar("T")


@dataclass(frozen=True, kw_only=True)
class Registry:
    """A set of mode names: each with a one-line description, one of them the default."""

    kind: str  # what a name names, as a message says it: "accountant"
    entries: Mapping[str, str]  # name -> what it is, for help texts
    default: str
    hint: str = ""

    def __post_init__(self) -> None:
        if self.default not in self.entries:
            raise ValueError(f"the default {self.kind} {self.default!r} is not registered")

    @property
    def names(self) -> tuple[str, ...]:
        """The valid names, in registration order."""
        return tuple(self.entries)

    def __iter__(self) -> Iterator[str]:
        return iter(self.entries)

    def __contains__(self, name: object) -> bool:
        return name in self.entries

    def __len__(self) -> int:
        return len(self.entries)

    def check(self, name: str, *, setting: str = "") -> str:
        """Return ``name`` if it is registered, else raise ConfigError listing the names."""
        if name in self.entries:
            return name
        hint = self.hint
        close = difflib.get_close_matches(str(name), self.names, n=1)
        if close:
            hint = f"Did you mean '{close[0]}'? {hint}".strip()
        raise ConfigError(
            f"unknown {setting or self.kind} {name!r}; choose one of: {', '.join(self.names)}",
            hint=hint or None,
            setting=setting,
        )

    def help_text(self) -> str:
        """``prv (tight, the default) or rdp (a looser upper bound)``, for a CLI option."""
        described = [
            f"{name} ({text}{', the default' if name == self.default else ''})"
            if text
            else name + (" (the default)" if name == self.default else "")
            for name, text in self.entries.items()
        ]
        if len(described) < 2:
            return "".join(described)
        return ", ".join(described[:-1]) + " or " + described[-1]

    def bind(self, table: Mapping[str, T]) -> dict[str, T]:
        """``table`` (name -> implementation) after checking it names exactly these names."""
        if set(table) != set(self.entries):
            raise ValueError(
                f"the {self.kind} table names {sorted(table)}, the registry {sorted(self.entries)}"
            )
        return {name: table[name] for name in self.entries}


#: Privacy accountants; names as in Opacus' accountant registry (opacus.accountants.registry).
ACCOUNTANTS = Registry(
    kind="accountant",
    entries={"prv": "tight", "rdp": "a looser upper bound"},
    default=str(default_of("privacy", "accountant")),  # a site's: site_default("accountant")
    hint="prv is tight and the default; rdp is a looser upper bound.",
)

#: Flower strategies a run may aggregate with (server/strategy.py binds their factories).
STRATEGIES = Registry(
    kind="strategy",
    entries={
        "fedavg": "",
        "fedprox": "",
        "fedadam": "",
        "trimmed-mean": "robust aggregation",
        "median": "robust aggregation",
        "krum": "robust aggregation",
    },
    default=str(default_of("federation", "strategy")),
)
