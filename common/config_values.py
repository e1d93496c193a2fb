"""Reading one setting of a raw configuration: its type and range, named in the user's words.

A message about a setting names it as the user wrote it: the command-line flag when the value
came from one (``--delta``), else the TOML key in its table (``[privacy] target-delta``); its
hint says where to fix it and what the default is (common/defaults.toml).
"""

from __future__ import annotations

import difflib
import functools
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from importlib import resources
from typing import Any

from fedvault.common.errors import ConfigError

#: The table of common/defaults.toml that holds a deployed site's own defaults, not a scenario's.
SITE_TABLE = "site"


def _read_defaults_file() -> dict[str, Any]:
    text = resources.files("fedvault.common").joinpath("defaults.toml").read_text(encoding="utf-8")
    return tomllib.loads(text)


def load_defaults() -> dict[str, Any]:
    """The scenario defaults shipped in common/defaults.toml, as a raw dict (no [site] table)."""
    defaults = _read_defaults_file()
    defaults.pop(SITE_TABLE, None)
    return defaults


@functools.cache
def site_default(key: str) -> Any:
    """A deployed site's default ``key`` from the [site] table of common/defaults.toml."""
    return _read_defaults_file()[SITE_TABLE][key]


#: The `fedvault simulate`/`run` flag that sets a setting. A message about a setting names
#: what the user wrote: the flag when the value came from one, else the TOML key in its table.
FLAG_OF: dict[tuple[str, str], str] = {
    ("", "seed"): "--seed",
    ("federation", "sites"): "--sites",
    ("federation", "rounds"): "--rounds",
    ("federation", "min-sites"): "--min-sites",
    ("federation", "strategy"): "--strategy",
    ("data", "dataset"): "--dataset",
    ("data", "label-column"): "--label-column",
    ("data", "partition"): "--partition",
    ("data", "alpha"): "--alpha",
    ("model", "name"): "--model",
    ("privacy", "target-epsilon"): "--epsilon",
    ("privacy", "noise-multiplier"): "--noise-multiplier",
    ("privacy", "target-delta"): "--delta",
    ("privacy", "central"): "--central-dp",
    ("privacy", "central-noise-multiplier"): "--central-noise-multiplier",
    ("privacy", "central-clipping-norm"): "--central-clipping-norm",
}

_KIND_WORDS: dict[type, str] = {
    int: "an integer",
    float: "a number",
    str: "a string",
    bool: "true or false",
    list: "a list",
}


def toml_key(section: str, key: str) -> str:
    """A setting as a scenario file spells it: ``[privacy] target-delta`` (``seed`` at the top)."""
    return f"[{section}] {key}" if section else key


@dataclass(frozen=True)
class Origins:
    """Which settings came from command-line flags (the rest from TOML or the defaults)."""

    from_flags: frozenset[tuple[str, str]] = frozenset()

    @classmethod
    def of_flags(cls, flags: Mapping[str, Any] | None) -> Origins:
        """The settings a flags layer (``fedvault.cli.options.flags_layer``) sets."""
        keys: set[tuple[str, str]] = set()
        for key, value in (flags or {}).items():
            if isinstance(value, Mapping):
                keys.update((key, inner) for inner in value)
            else:
                keys.add(("", key))
        return cls(frozenset(keys))

    def flag(self, section: str, key: str) -> str | None:
        """The flag that set this setting, or None if it came from TOML or the defaults."""
        return FLAG_OF.get((section, key)) if (section, key) in self.from_flags else None

    def name(self, section: str, key: str) -> str:
        """The setting in the user's words: ``--delta`` or ``[privacy] target-delta``."""
        return self.flag(section, key) or toml_key(section, key)


def show(value: Any) -> str:
    """A value as the user typed it: 2 and 0.5 for numbers, quoted text."""
    if isinstance(value, float) and not isinstance(value, bool):
        return f"{value:g}"
    return repr(value) if not isinstance(value, int) or isinstance(value, bool) else str(value)


class Problems:
    """Every bad setting of one configuration, collected so that all are reported at once."""

    def __init__(self) -> None:
        self.errors: list[ConfigError] = []

    def add(self, err: ConfigError) -> None:
        self.errors.append(err)

    def raise_if_any(self) -> None:
        """Raise the one error, or one ConfigError naming them all with each one's hint."""
        if not self.errors:
            return
        if len(self.errors) == 1:
            raise self.errors[0]
        raise ConfigError(
            f"{len(self.errors)} settings are invalid: " + "; ".join(map(str, self.errors)),
            hint=" ".join(dict.fromkeys(err.hint for err in self.errors)),
            setting=", ".join(err.setting for err in self.errors if err.setting),
        )


class Section:
    """Typed, range-checked access to one TOML table; unknown keys are errors.

    Messages name each setting as the user set it (``Origins.name``); hints say where to fix
    it: the flag, or the key in its table of the scenario file, with the shipped default. A
    bad value is added to ``problems`` and read as its default, so that checking goes on and
    every bad setting is reported together.
    """

    def __init__(
        self,
        raw: Mapping[str, Any],
        name: str,
        known: tuple[str, ...],
        origins: Origins,
        problems: Problems,
    ) -> None:
        self.raw, self.name, self.origins, self.problems = raw, name, origins, problems
        where = f"[{name}]" if name else "the top level"
        unknown = sorted(set(raw) - set(known))
        if unknown:  # one problem per table, naming each unknown key once
            keys = ", ".join(f"'{key}'" for key in unknown)
            problems.add(
                ConfigError(
                    f"unknown setting{'s' if len(unknown) > 1 else ''} {keys} in {where}; "
                    f"known: {', '.join(known)}",
                    hint=_unknown_keys_hint(name, unknown, known),
                    setting=", ".join(toml_key(name, key) for key in unknown),
                )
            )

    def words(self, key: str) -> str:
        return self.origins.name(self.name, key)

    def error(self, key: str, message: str, rule: str) -> ConfigError:
        """A ConfigError about ``key``: ``message`` names it, the hint says where to fix it."""
        flag = self.origins.flag(self.name, key)
        default = default_of(self.name, key)
        has_default = default not in (None, "", [])
        if flag:
            shown = f" (default {show(default)})" if has_default else ""
            hint = f"Give {flag} a value {rule}{shown}."
        else:
            table = f"the [{self.name}] table" if self.name else "the top level"
            hint = f"Set {key} in {table} of the scenario file to a value {rule}" + (
                f", or remove it to use the default ({show(default)})." if has_default else "."
            )
        return ConfigError(message, hint=hint, setting=self.words(key))

    def reject(self, key: str, message: str, rule: str, *, hint: str | None = None) -> Any:
        """Add the error about ``key`` to the problems; its default stands in for it."""
        err = self.error(key, message, rule)
        if hint is not None:
            err.hint = hint
        self.problems.add(err)
        return default_of(self.name, key)

    def _typed(self, key: str, kind: type | tuple[type, ...]) -> tuple[bool, Any]:
        if key not in self.raw:
            raise ConfigError(
                f"setting {toml_key(self.name, key)} is missing",
                hint="common/defaults.toml lists every setting with its default.",
                setting=toml_key(self.name, key),
            )
        value = self.raw[key]
        ok = isinstance(value, kind) and not (isinstance(value, bool) and kind in (int, float))
        if kind is float and isinstance(value, int) and not isinstance(value, bool):
            value, ok = float(value), True
        if not ok:
            kinds = kind if isinstance(kind, tuple) else (kind,)
            expected = " or ".join(_KIND_WORDS.get(k, k.__name__) for k in kinds)
            message = f"{self.words(key)} must be {expected}, got {show(value)}"
            return False, self.reject(key, message, f"that is {expected}")
        return True, value

    def get(self, key: str, kind: type | tuple[type, ...]) -> Any:
        return self._typed(key, kind)[1]

    def number(
        self,
        key: str,
        kind: type,
        *,
        low: float,
        low_open: bool = False,
        high: float | None = None,
        high_open: bool = False,
    ) -> Any:
        ok, value = self._typed(key, kind)
        if not ok:
            return value
        bad_low = value <= low if low_open else value < low
        bad_high = high is not None and (value >= high if high_open else value > high)
        if bad_low or bad_high:
            if high is None:
                rule = f"> {low:g}" if low_open else f">= {low:g}"
            else:
                left, right = "(" if low_open else "[", ")" if high_open else "]"
                rule = f"in {left}{low:g}, {high:g}{right}"
            return self.reject(key, f"{self.words(key)} must be {rule}, got {show(value)}", rule)
        return value

    def choice(self, key: str, choices: tuple[str, ...]) -> str:
        ok, value = self._typed(key, str)
        if not ok:
            return str(value)
        if value not in choices:
            listed = ", ".join(choices)
            close = difflib.get_close_matches(value, choices, n=1)
            err = self.error(
                key,
                f"unknown {self.words(key)} {value!r}; choose one of: {listed}",
                f"among {listed}",
            )
            if close:
                err.hint = f"Did you mean '{close[0]}'? " + err.hint
            self.problems.add(err)
            return str(default_of(self.name, key))
        return str(value)


def _unknown_keys_hint(section: str, keys: list[str], known: tuple[str, ...]) -> str:
    """Where unknown keys belong: another table that has one, or the known key it is close to;
    the rest are to be removed."""
    advice: list[str] = []
    rest: list[str] = []
    for key in keys:
        home = next(
            (
                table
                for table, values in _defaults().items()
                if isinstance(values, Mapping) and table != section and key in values
            ),
            None,
        )
        close = difflib.get_close_matches(key, known, n=1)
        if home is not None:
            advice.append(f"{key} goes in the [{home}] table: put it under a [{home}] line.")
        elif close:
            named = f" (for '{key}')" if len(keys) > 1 else ""
            advice.append(f"Did you mean '{close[0]}'{named}?")
        else:
            rest.append(key)
    if any(line.startswith("Did you mean") for line in advice):
        advice.append("Settings are kebab-case keys in their table.")
    if rest:
        them = "it" if len(keys) == 1 else ", ".join(f"'{key}'" for key in rest)
        advice.append(
            f"Remove {them} from the scenario file; common/defaults.toml lists every setting."
        )
    return " ".join(advice)


@functools.cache
def _defaults() -> dict[str, Any]:
    return load_defaults()


def default_of(section: str, key: str) -> Any:
    """The default of ``[section] key`` in common/defaults.toml (None when it has none)."""
    table = _defaults().get(section, {}) if section else _defaults()
    return table.get(key) if isinstance(table, Mapping) else None


def table(raw: Mapping[str, Any], key: str, problems: Problems) -> Mapping[str, Any]:
    """The TOML table ``key`` of ``raw``; one that is not a table is a problem (its defaults
    stand in for it)."""
    value = raw.get(key, {})
    if not isinstance(value, Mapping):
        problems.add(
            ConfigError(
                f"'{key}' must be a TOML table ([{key}]), got {show(value)}",
                hint=f"Put its settings under a [{key}] line in the scenario file.",
                setting=f"[{key}]",
            )
        )
        return dict(_defaults()[key])
    return value
